"""Writes ee_sequences.jsonl: 40 "continue the sequence" questions (counting by steps, days, months, number words,
letters), each answered by the sequence's next item. Deterministic (seeded); rerun to regenerate the file."""

import json
import random
from pathlib import Path

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
WORDS = "one two three four five six seven eight nine ten eleven twelve".split()
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def make(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    docs, seen = [], set()

    def add(items: list[str], shown: int, kind: str) -> bool:
        question = "Continue the sequence: " + ", ".join(items[:shown]) + ","
        if question in seen:
            return False
        seen.add(question)
        docs.append({"question": question, "answer": items[shown], "kind": kind})
        return True

    while len(docs) < 16:
        step, start = rng.choice([1, 2, 3, 5, 10]), rng.randrange(0, 60)
        add([str(start + step * i) for i in range(6)], rng.choice([4, 5]), "numbers")
    for kind, items, count in [("days", DAYS, 6), ("months", MONTHS, 7), ("words", WORDS, 5), ("letters", LETTERS, 6)]:
        made = 0
        while made < count:
            first = rng.randrange(0, len(items) if kind == "days" else len(items) - 4)
            made += add((items * 2)[first:first + 5], 4, kind)
    return docs


if __name__ == "__main__":
    path = Path(__file__).resolve().parent / "ee_sequences.jsonl"
    path.write_text("".join(json.dumps(doc) + "\n" for doc in make()))
    print(f"wrote {path}")
