"""`hf-earlyexit ship`: make a trained, calibrated heads folder of the embedded model the package's shipped heads
(`hf_earlyexit/shipped_heads/`, loaded by `load("shipped")`), with a re-rendered card and a SHA-256 manifest."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..loading import MANIFEST, file_digest, shipped_dir
from ..modeling.folder_earlyexit import CARD_FILE, replace_dir
from .card import BENCH_FILE, SWEEP_FILE, render_card
from .hub import check_heads_folder

# what a heads folder holds that the shipped copy leaves out: the tokenizer (the embedded package has it; Gemma's
# tokenizer.json alone is 33 MB) and the portable code (the installed package is the code; `save_pretrained` of a
# loaded model writes a self-contained folder for `trust_remote_code=True`)
LEFT_OUT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
            "chat_template.jinja", "added_tokens.json")


def write_manifest(folder: Path, command: list[str], seconds: dict[str, float] | None = None) -> dict:
    """Record the SHA-256 of every file in `folder` and how it was made, in `folder/MANIFEST.json`."""
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, "command": command, "seconds": seconds or {}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class ShipArgs:
    """Copy a trained, calibrated heads folder of the embedded model into the package as its shipped heads."""

    model: str = field(default="", metadata={"help": "heads folder written by train + calibrate"})
    bench_file: str | None = field(default=None, metadata={"help": "bench.json of `hf-earlyexit bench`, for the card"})
    eval_file: str | None = field(default=None, metadata={"help": "sweep.json of `hf-earlyexit sweep`, for the card"})
    overwrite: bool = field(default=False, metadata={"help": "replace the heads shipped now"})
    target: str | None = field(default=None, metadata={"help": "where to write (default: the package's folder)"})


def ship(args: ShipArgs) -> dict:
    """Write the shipped folder from `args.model`: its own files minus `LEFT_OUT` and the code, the result files,
    a re-rendered card and the manifest, atomically. Returns the manifest.

    Raises:
        ValueError: the folder is not trained and calibrated heads of the embedded model.
        FileExistsError: shipped heads exist and `overwrite` is off.
    """
    source = Path(args.model)
    config = check_heads_folder(source)
    if config.base_model_name_or_path != "embedded" or not config.thresholds:
        raise ValueError(f"{source} holds heads for {config.base_model_name_or_path!r} with thresholds "
                         f"{'set' if config.thresholds else 'missing'}; the shipped heads are calibrated heads of "
                         "'embedded'")
    target = Path(args.target) if args.target else shipped_dir()
    if target.exists() and any(target.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{target} holds shipped heads already; pass --overwrite to replace them")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the package folder is read by everyone
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in LEFT_OUT and not path.name.endswith("_earlyexit.py"):
                shutil.copyfile(path, staging / path.name)
        for name, extra in ((BENCH_FILE, args.bench_file), (SWEEP_FILE, args.eval_file)):
            if extra:
                shutil.copyfile(extra, staging / name)
        (staging / CARD_FILE).write_text(render_card(staging, title=target.name), encoding="utf-8")
        manifest = write_manifest(staging, ["hf-earlyexit", "ship", *sys.argv[2:]] if sys.argv[1:2] == ["ship"]
                                  else ["hf-earlyexit", "ship", "--model", str(source)])
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
