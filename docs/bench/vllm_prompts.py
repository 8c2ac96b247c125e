"""Write a JSON list of bench prompts for `vllm_earlyexit.py`: the 8 varied bench prompts, then the questions of
held-out PIQA items (no shipped heads saw them) up to `--count`. Run in the hf-earlyexit venv:

    python docs/bench/vllm_prompts.py --data_dir ../shared/data --count 32 --output prompts32.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_earlyexit.evaluation.bench import BENCH_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the folder holding piqa/valid.jsonl")
    parser.add_argument("--count", type=int, default=32, help="how many prompts in all")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    source = Path(args.data_dir) / "piqa" / "valid.jsonl"
    if not source.is_file():
        raise SystemExit(f"--data_dir {args.data_dir}: expected piqa/valid.jsonl there")
    prompts = list(BENCH_PROMPTS)
    with source.open(encoding="utf-8") as f:
        for line in f:
            if len(prompts) >= args.count:
                break
            goal = json.loads(line)["goal"].strip()
            if goal:
                prompts.append(goal)
    if len(prompts) < args.count:
        raise SystemExit(f"{source} gave only {len(prompts)} prompts; --count is {args.count}")
    Path(args.output).write_text(json.dumps(prompts[:args.count], indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
