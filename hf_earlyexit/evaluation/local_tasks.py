"""lm-eval's own benchmark tasks on local files: `hf-earlyexit tasks --data_dir DIR --output_dir OUT`.

The harness's built-in `arc_easy`, `arc_challenge`, `hellaswag`, `winogrande`, `mmlu_<subject>` and `piqa` read the
Hub copies of their datasets. Where the Hub is out of reach, this module reads the benchmarks' *official* file
formats (as their authors publish them), rewrites each record in the schema of the Hub dataset the built-in task
reads (`OUT/data/<task>/<split>.jsonl`), and writes one task YAML per task (`OUT/<task>_local.yaml`) that
`include`s the built-in YAML and overrides only where the data comes from: `dataset_path: json`, the local
`data_files`, and the split names (a split the local copy lacks is set to null, so lm-eval evaluates the split it
falls back to). Prompts, choices, `process_docs`, metrics and version stay the built-in task's; its tags are
replaced so that the local tasks never join the built-in groups (`mmlu_stem` & co.).

    hf-earlyexit tasks --data_dir ../shared/data --output_dir local_tasks
    lm_eval --model hf --model_args pretrained=... --tasks arc_easy_local,hellaswag_local --include_path local_tasks

Official formats read from `DIR/<benchmark>/`:

- `arc/ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl`: `{"id", "question": {"stem", "choices": [{"text", "label"}]},
  "answerKey"}` -> `{"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}`.
- `hellaswag/hellaswag_{train,val}*.jsonl`: `{"activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"}`. A
  copy that keeps only `ctx` (= `ctx_a + " " + ctx_b`) is split back at its last sentence end (`ctx_b` is the
  lower-cased start of the next sentence in ActivityNet items and empty in WikiHow items, which end a sentence).
- `winogrande/dev*.jsonl`, `winogrande/train_xl.jsonl`: `{"qID", "sentence", "option1", "option2", "answer"}`
  (already the Hub schema).
- `mmlu/{test,dev,val}/<subject>_{test,dev,val}.csv`: no header, `question,A,B,C,D,answer_letter` ->
  `{"question", "subject", "choices": [4], "answer": 0-3}`.
- `piqa/{train,valid}.jsonl` + `{train,valid}-labels.lst`: `{"goal", "sol1", "sol2"}` + one 0/1 per line ->
  `{"goal", "sol1", "sol2", "label"}`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SUFFIX = "_local"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# built-in task -> its YAML inside lm_eval/tasks (mmlu: one per subject)
BUILTIN_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "piqa": "piqa/piqa.yaml",
}
MMLU_YAML = "mmlu/default/mmlu_{subject}.yaml"
Records = list[dict]
Splits = dict[str, Records]  # split name -> records in the Hub schema


@dataclass
class TasksArgs:
    """Write task YAMLs that run lm-eval's built-in benchmark tasks on local files in their official formats."""

    data_dir: str = field(metadata={"help": "folder with arc/, hellaswag/, winogrande/, mmlu/, piqa/ (any of them)"})
    output_dir: str = field(metadata={"help": "where the task YAMLs and converted data go (pass as --include_path)"})
    benchmarks: list[str] | None = field(default=None, metadata={
        "help": "only these of arc, hellaswag, winogrande, mmlu, piqa (default: every one found in --data_dir)"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.benchmarks or ()) - set(READERS))
        if unknown:
            raise ValueError(f"benchmarks={unknown} are not among {', '.join(READERS)}")


# -- readers: official files -> {built-in task: {split: records in the Hub schema}} ----------------------------------


def _jsonl(path: Path) -> Records:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not a JSON object ({err.msg})") from None
    return rows


def _field(row: dict, key: str, path: Path, number: int):
    if key not in row:
        raise ValueError(f"{path}:{number} has no field {key!r} (fields: {', '.join(row)})")
    return row[key]


def read_arc(folder: Path) -> dict[str, Splits]:
    splits = {"Train": "train", "Dev": "validation", "Test": "test"}
    tasks: dict[str, Splits] = {}
    for path in sorted(folder.glob("ARC-*.jsonl")):
        match = re.fullmatch(r"ARC-(Easy|Challenge)-(Train|Dev|Test)\.jsonl", path.name)
        if not match:
            continue
        records = []
        for number, row in enumerate(_jsonl(path), 1):
            question = _field(row, "question", path, number)
            choices = _field(question, "choices", path, number)
            labels = [c["label"] for c in choices]
            answer = _field(row, "answerKey", path, number)
            if answer not in labels:
                raise ValueError(f"{path}:{number}: answerKey={answer!r} is not one of the choice labels {labels}")
            records.append({"id": row.get("id", ""), "question": _field(question, "stem", path, number),
                            "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": answer})
        tasks.setdefault(f"arc_{match[1].lower()}", {})[splits[match[2]]] = records
    return tasks


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """`ctx` -> `(ctx_a, ctx_b)`: `ctx_b` is what follows the last sentence end (empty when `ctx` ends one)."""
    ctx = ctx.strip()
    ends = list(_SENTENCE_END.finditer(ctx))
    if re.search(r"[.!?][\"')\]]*$", ctx) or not ends:
        return ctx, ""
    cut = ends[-1]
    return ctx[: cut.start() + len(cut.group().rstrip())], ctx[cut.end():]


def read_hellaswag(folder: Path) -> dict[str, Splits]:
    splits: Splits = {}
    for path in sorted(folder.glob("hellaswag_*.jsonl")):
        split = {"train": "train", "val": "validation"}.get(path.stem.split("_")[1])
        if split is None:
            continue  # the test file has no labels
        records = []
        for number, row in enumerate(_jsonl(path), 1):
            if "ctx_a" in row and "ctx_b" in row:
                ctx_a, ctx_b = row["ctx_a"], row["ctx_b"]
            else:
                ctx_a, ctx_b = split_hellaswag_ctx(_field(row, "ctx", path, number))
            endings = _field(row, "endings", path, number)
            label = _field(row, "label", path, number)
            if str(label) not in {str(i) for i in range(len(endings))}:
                raise ValueError(f"{path}:{number}: label={label!r} is not an index of its {len(endings)} endings")
            records.append({"activity_label": _field(row, "activity_label", path, number), "ctx_a": ctx_a,
                            "ctx_b": ctx_b, "ctx": row.get("ctx", f"{ctx_a} {ctx_b}"), "endings": endings,
                            "label": str(label)})
        splits.setdefault(split, []).extend(records)
    return {"hellaswag": splits} if splits else {}


def read_winogrande(folder: Path) -> dict[str, Splits]:
    splits: Splits = {}
    for path in sorted(folder.glob("*.jsonl")):
        split = "validation" if path.name.startswith("dev") else "train" if path.name == "train_xl.jsonl" else None
        if split is None:
            continue
        records = []
        for number, row in enumerate(_jsonl(path), 1):
            answer = str(_field(row, "answer", path, number))
            if answer not in ("1", "2"):
                raise ValueError(f"{path}:{number}: answer={answer!r} is not '1' or '2'")
            if "_" not in _field(row, "sentence", path, number):
                raise ValueError(f"{path}:{number}: sentence has no '_' blank to fill")
            records.append({"sentence": row["sentence"], "option1": _field(row, "option1", path, number),
                            "option2": _field(row, "option2", path, number), "answer": answer})
        splits.setdefault(split, []).extend(records)
    return {"winogrande": splits} if splits else {}


def read_mmlu(folder: Path) -> dict[str, Splits]:
    tasks: dict[str, Splits] = {}
    for path in sorted(folder.glob("*/*.csv")):
        match = re.fullmatch(r"(\w+)_(test|dev|val)\.csv", path.name)
        if not match:
            continue
        subject, split = match[1], {"val": "validation"}.get(match[2], match[2])
        records = []
        with path.open(newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                    raise ValueError(f"{path}:{number}: expected question,A,B,C,D,answer_letter (A-D), got "
                                     f"{len(row)} fields ending in {row[-1] if row else ''!r}")
                records.append({"question": row[0], "subject": subject, "choices": row[1:5],
                                "answer": "ABCD".index(row[5].strip())})
        tasks.setdefault(f"mmlu_{subject}", {})[split] = records
    return tasks


def read_piqa(folder: Path) -> dict[str, Splits]:
    splits: Splits = {}
    for name, split in (("train", "train"), ("valid", "validation")):
        data, labels_path = folder / f"{name}.jsonl", folder / f"{name}-labels.lst"
        if not data.exists():
            continue
        if not labels_path.exists():
            raise ValueError(f"{data} has no labels file {labels_path.name} beside it")
        rows = _jsonl(data)
        labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
        if len(labels) != len(rows):
            raise ValueError(f"{labels_path} has {len(labels)} labels for the {len(rows)} items of {data.name}")
        bad = next((label for label in labels if label not in ("0", "1")), None)
        if bad is not None:
            raise ValueError(f"{labels_path}: label {bad!r} is not 0 or 1")
        splits[split] = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
                         for r, label in zip(rows, labels, strict=True)]
    return {"piqa": splits} if splits else {}


READERS: dict[str, Callable[[Path], dict[str, Splits]]] = {
    "arc": read_arc, "hellaswag": read_hellaswag, "winogrande": read_winogrande, "mmlu": read_mmlu,
    "piqa": read_piqa,
}


# -- task YAMLs ------------------------------------------------------------------------------------------------------


def builtin_yaml(task: str) -> Path:
    """The installed lm-eval's YAML of built-in `task`."""
    import lm_eval.tasks

    relative = BUILTIN_YAML.get(task) or (MMLU_YAML.format(subject=task[len("mmlu_"):])
                                          if task.startswith("mmlu_") else None)
    path = Path(lm_eval.tasks.__file__).parent / relative if relative else None
    if path is None or not path.is_file():
        raise ValueError(f"lm-eval has no built-in task {task!r} (looked for {path or 'a YAML for it'})")
    return path


def local_task_config(task: str, data_files: dict[str, Path]) -> dict:
    """The YAML of `<task>_local`: the built-in task, reading `data_files` (split -> JSONL in the Hub schema)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = builtin_yaml(task)
    builtin = load_yaml(path, resolve_func=False)
    config = {"include": str(path), "task": f"{task}{SUFFIX}",
              "tag": ["mmlu_local"] if task.startswith("mmlu_") else [],
              "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {split: str(p) for split, p in data_files.items()}}}
    for key in SPLIT_KEYS:  # a split the local copy lacks: null, so lm-eval never asks for it
        if builtin.get(key) is not None and builtin[key] not in data_files:
            config[key] = None
    evaluated = [builtin.get(k) for k in ("test_split", "validation_split") if builtin.get(k) in data_files]
    if not evaluated:
        raise ValueError(f"{task}: the local copy has splits {sorted(data_files)} but the built-in task evaluates "
                         f"{builtin.get('test_split') or builtin.get('validation_split')!r}")
    return config


def write_local_tasks(args: TasksArgs) -> dict[str, dict]:
    """Convert every benchmark found under `args.data_dir` and write its task YAMLs; returns `{local task name:
    {"builtin": name, "splits": {split: documents}}}`."""
    data_dir, out = Path(args.data_dir), Path(args.output_dir).resolve()
    if not data_dir.is_dir():
        raise ValueError(f"data_dir={str(data_dir)!r} is not a folder (expected one holding {', '.join(READERS)})")
    wanted = args.benchmarks or list(READERS)
    found: dict[str, Splits] = {}
    for name in wanted:
        if (data_dir / name).is_dir():
            found.update(READERS[name](data_dir / name))
    if not found:
        raise ValueError(f"data_dir={str(data_dir)!r} holds no benchmark files in the official formats under "
                         f"{', '.join(f'{n}/' for n in wanted)}")
    written = {}
    for task, splits in sorted(found.items()):
        files = {}
        for split, records in splits.items():
            path = out / "data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            files[split] = path
        config = local_task_config(task, files)
        header = (f"# lm-eval's built-in {task} on local files (written by `hf-earlyexit tasks`): only the data "
                  "source differs\n")
        (out / f"{config['task']}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        written[config["task"]] = {"builtin": task, "splits": {s: len(r) for s, r in splits.items()}}
    return written
