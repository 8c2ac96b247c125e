"""`hf-earlyexit push <folder> <repo_id>`: upload a heads folder as it is, after checking it.

The folder is checked without loading any model (it is a heads folder in a format this version reads, holds no
base weights unless `--merged`, was trained unless `--force`), staged with its card re-rendered for the repo id
(a hand-written `README.md` is kept), the card's metadata is validated, and everything goes up in one commit.
`EarlyExitForCausalLM.push_to_hub` does the same for a model in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.configuration_earlyexit import EarlyExitConfig
from ..modeling.folder_earlyexit import CARD_FILE, check_folder_files
from ..modeling.hub_earlyexit import CARD_MARKER, check_pushable, check_repo_id, upload_heads_folder
from .card import BENCH_FILE, EVAL_FILE, SWEEP_FILE, render_card, validate_card

logger = logging.getLogger(__name__)
PORTABLE_ENTRY_FILES = ("configuration_earlyexit.py", "modeling_earlyexit.py")


@dataclass
class PushArgs:
    """Upload a heads folder to the Hugging Face Hub in one commit."""

    model: str | None = field(default=None, metadata={
        "help": "heads folder written by train / calibrate / save_pretrained (or the first positional argument)"})
    repo_id: str | None = field(default=None, metadata={
        "help": "Hub repo id, 'user/name' or 'org/name' (or the second positional argument)"})
    private: bool = field(default=False, metadata={"help": "create the repo as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to (created when absent)"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: your saved login or HF_TOKEN)"})
    force: bool = field(default=False, metadata={"help": "push heads that were never trained"})
    merged: bool = field(default=False, metadata={
        "help": "also upload the folder's full copy of the base model (base/); off: base weights never go up"})
    bench_file: str | None = field(default=None, metadata={"help": "bench.json of `hf-earlyexit bench`, for the card"})
    eval_file: str | None = field(default=None, metadata={
        "help": "lm-eval results JSON or `hf-earlyexit sweep` sweep.json, for the card"})
    license: str | None = field(default=None, metadata={"help": "Hub license id for the card (default: the base's)"})

    def __post_init__(self) -> None:
        if not self.model or not self.repo_id:
            raise ValueError("give the heads folder and the Hub repo id: hf-earlyexit push <folder> <user/name>")
        check_repo_id(self.repo_id)


def check_heads_folder(folder: str | Path, force: bool = False, merged: bool = False) -> EarlyExitConfig:
    """Check a heads folder for upload without loading a model; returns its config.

    Raises `ValueError` (or `UnsupportedFormatError`) naming the problem: not a folder, a base model rather than
    heads, a newer format, missing code or head weights, base weights without `merged`, untrained without `force`.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a heads folder (no config.json)")
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != EarlyExitConfig.model_type:
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not early-exit heads (model_type {EarlyExitConfig.model_type!r})"
        )
    config = EarlyExitConfig.from_pretrained(folder)  # refuses newer formats first
    missing = [name for name in PORTABLE_ENTRY_FILES if not (folder / name).is_file()]
    if missing or not getattr(config, "auto_map", None):
        raise ValueError(f"{folder} lacks the portable code ({missing or 'auto_map'}); re-save it with save_pretrained")
    check_folder_files(folder, merged)
    check_pushable(config, force)
    return config


def stage_folder(folder: Path, staging: Path, bench_file: str | None = None, eval_file: str | None = None) -> None:
    """Link (or copy) `folder` into `staging`, without caches or hidden files, and add the result files."""
    shutil.copytree(folder, staging, ignore=shutil.ignore_patterns("__pycache__", ".*"), copy_function=_link_or_copy)
    if bench_file:
        _replace_file(Path(bench_file), staging / BENCH_FILE)
    if eval_file:
        payload = json.loads(Path(eval_file).read_text(encoding="utf-8"))
        _replace_file(Path(eval_file), staging / (SWEEP_FILE if isinstance(payload, list) else EVAL_FILE))


def push_folder(args: PushArgs):
    """Check, stage, re-render the card, validate it and upload; returns huggingface_hub's `CommitInfo`."""
    folder = Path(args.model)
    check_heads_folder(folder, force=args.force, merged=args.merged)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / folder.name
        stage_folder(folder, staging, args.bench_file, args.eval_file)
        card = staging / CARD_FILE
        if not card.exists() or CARD_MARKER in card.read_text(encoding="utf-8"):
            card.unlink(missing_ok=True)  # a link to the original: never write through it
            card.write_text(render_card(staging, repo_id=args.repo_id, license=args.license), encoding="utf-8")
        validate_card(card)
        return upload_heads_folder(
            staging, args.repo_id, private=True if args.private else None, token=args.token, revision=args.revision,
            commit_message=args.commit_message, merged=args.merged,
        )


def run_push(args: PushArgs) -> None:
    info = push_folder(args)
    print(f"pushed {args.model} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _replace_file(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)  # may be a link to a file of the original folder
    shutil.copyfile(source, target)
