"""The heads folder, PEFT-like: its file layout, reading it back, and checking it against a base model.

Portable: stdlib, torch, transformers, safetensors and siblings. A folder holds only what the heads own:
`config.json` (base id + revision + weight fingerprint, exits, thresholds, provenance, `format_version`, `auto_map`),
`exit_heads.safetensors` (head weights and the draft vocabulary ids), `calibration.safetensors` (per-token
calibration statistics), the tokenizer, the portable code and `README.md`. A merged folder adds a full copy of the
base model under `base/`. Never `adapter_config.json`: when peft is installed, transformers' Auto classes treat any
folder holding one as a PEFT adapter and fail on our type.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel
from transformers.utils import cached_file
from transformers.utils.hub import resolve_revision

from .base_earlyexit import (
    EMBEDDED,
    canonical_name,
    fingerprint_mismatch,
    fingerprint_part_names,
    is_legacy_fingerprint,
    legacy_weight_fingerprint,
    load_base_model,
    weight_fingerprint,
)
from .configuration_earlyexit import EarlyExitConfig

logger = logging.getLogger(__name__)

HEADS_FILE = "exit_heads.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
CARD_FILE = "README.md"
BASE_SUBFOLDER = "base"
OWN_TENSOR_FILES = (HEADS_FILE, CALIBRATION_FILE)
PEFT_TRAP = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# endings of serialized tensors of any framework; only OWN_TENSOR_FILES may sit outside `base/`
TENSOR_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".npy",
    ".ot", ".safetensors.index.json", ".bin.index.json",
)
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


class HeadsMismatchError(ValueError):
    """Heads were saved for a different base model than the one they are attached to."""


def read_heads(source: str, revision: str | None = None, **hub) -> dict[str, Tensor]:
    """Read `exit_heads.safetensors` from a folder or Hub repo; refuse pickles, report corrupt files clearly."""
    local = Path(source)
    if local.is_file():
        raise ValueError(f"{source} is a file; pass the heads folder that contains {HEADS_FILE}")
    path = cached_file(source, HEADS_FILE, revision=revision, _raise_exceptions_for_missing_entries=False, **hub)
    if path is None:
        pickles = sorted(p.name for p in local.glob("*") if p.suffix in PICKLE_SUFFIXES) if local.is_dir() else []
        if pickles:
            raise ValueError(
                f"{source} holds {pickles} but no {HEADS_FILE}: hf-earlyexit loads head weights from safetensors "
                "only and never unpickles"
            )
        raise FileNotFoundError(f"{source} has no {HEADS_FILE}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"head file {path} is corrupt or not a safetensors file ({err})") from err


def read_calibration(source: str, revision: str | None = None, **hub) -> dict[str, Tensor] | None:
    """The calibration statistics of a heads folder, or `None` when it was never calibrated."""
    path = cached_file(source, CALIBRATION_FILE, revision=revision, _raise_exceptions_for_missing_entries=False, **hub)
    if path is None:
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"calibration file {path} is corrupt or not a safetensors file ({err})") from err


def load_recorded_base(
    config: EarlyExitConfig, source: str, revision: str | None, hub: dict, base_model_revision: str | None,
    ignore_base_mismatch: bool, **kwargs,
) -> PreTrainedModel:
    """The base the heads record: the folder's merged `base/` copy, else `base_model_name_or_path` at its revision."""
    base_hub = {k: v for k, v in hub.items() if k != "subfolder"}
    if config.base_subfolder:
        sub = "/".join(p for p in (hub.get("subfolder"), config.base_subfolder) if p)
        return load_base_model(source, revision, subfolder=sub, **base_hub, **kwargs)
    recorded = config.base_revision
    if base_model_revision is not None and base_model_revision != recorded:
        _mismatch(
            f"heads were trained on revision {recorded!r} of {config.base_model_name_or_path!r}, but "
            f"base_model_revision={base_model_revision!r} was asked for", ignore_base_mismatch,
        )
        recorded = base_model_revision
    base = load_base_model(config.base_model_name_or_path, recorded, **base_hub, **kwargs)
    if config.base_model_name_or_path == EMBEDDED:
        check_revision(config, canonical_name(base)[1], ignore_base_mismatch)
    return base


def check_revision(config: EarlyExitConfig, current: str | None, ignore: bool) -> None:
    """Refuse a base whose known revision differs from the recorded one (comparable: two commit hashes, or two
    versions of the embedded default; a base loaded elsewhere carries no revision, the fingerprint checks it)."""
    recorded = config.base_revision
    if recorded is None or current is None or recorded == current:
        return
    comparable = config.base_model_name_or_path == EMBEDDED or (
        _COMMIT_HASH.match(recorded) is not None and _COMMIT_HASH.match(current) is not None
    )
    if comparable:
        _mismatch(
            f"heads were trained on revision {recorded!r} of {config.base_model_name_or_path!r}; this base is "
            f"revision {current!r}", ignore,
        )


def _mismatch(message: str, ignore: bool) -> None:
    if not ignore:
        raise HeadsMismatchError(f"{message} (pass ignore_base_mismatch=True to load anyway)")
    logger.warning("%s; loading anyway (ignore_base_mismatch=True)", message)


def resolved_commit(name: str, revision: str | None, hub: dict) -> str | None:
    """The commit a Hub base's `revision` (default: the main branch) points to now, to record with the heads; local
    paths and anything that cannot be resolved keep `revision` as given."""
    keys = ("token", "cache_dir", "local_files_only")
    resolved = resolve_revision(name, revision, **{k: hub[k] for k in keys if k in hub})
    return getattr(resolved, "resolved", None) or revision


def recorded_base(config: EarlyExitConfig) -> str:
    """The base the heads record, for messages: `'name'` (at revision `'rev'`)."""
    revision = f" at revision {config.base_revision!r}" if config.base_revision else ""
    return f"{config.base_model_name_or_path!r}{revision}"


def given_base(base: PreTrainedModel) -> str:
    """The base model the heads are attached to, for messages."""
    name, revision = canonical_name(base)
    if not name:
        return "a model built in memory"
    return f"{name!r}" + (f" at revision {revision!r}" if revision else "")


def check_compatible(config: EarlyExitConfig, base: PreTrainedModel, ignore_base_mismatch: bool = False) -> None:
    """Raise `HeadsMismatchError` naming both bases and both values when the heads were saved for a different base.

    Shapes must always match; `ignore_base_mismatch=True` turns different weights (fingerprint) into a warning. A
    legacy fingerprint (one mean |w| per part, configs written before the projections) is checked as such.
    """
    saved, current = config.text_config, base.config.get_text_config()
    for field in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers"):
        a, b = getattr(saved, field, None), getattr(current, field, None)
        if a != b:
            raise HeadsMismatchError(
                f"heads were saved for the base {recorded_base(config)} with {field}={a!r}; the base model they are "
                f"attached to ({given_base(base)}) has {field}={b!r}"
            )
    recorded_fp = config.base_fingerprint
    if recorded_fp:
        legacy = is_legacy_fingerprint(recorded_fp)
        current_fp = legacy_weight_fingerprint(base) if legacy else weight_fingerprint(base)
        bad = fingerprint_mismatch(recorded_fp, current_fp)
        if bad is not None:
            names = fingerprint_part_names(len(current_fp))
            part = f" ({names[bad]})" if bad < len(names) and len(recorded_fp) == len(current_fp) else ""
            a = recorded_fp[bad] if bad < len(recorded_fp) else None
            b = current_fp[bad] if bad < len(current_fp) else None
            _mismatch(
                f"heads were trained on other base weights: weight fingerprint part {bad}{part} is {a!r} for the "
                f"recorded base {recorded_base(config)} but {b!r} for the base model they are attached to "
                f"({given_base(base)})", ignore_base_mismatch,
            )


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` folder to `target`, replacing what was there only at the last moment."""
    if not target.exists():
        staging.rename(target)
        return
    backup = target.with_name(f".{target.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    target.rename(backup)
    staging.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def tensor_files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder` that looks like serialized tensors, except the heads' own."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and path.name.endswith(TENSOR_SUFFIXES) and rel not in OWN_TENSOR_FILES:
            found.append(rel)
    return found


def check_folder_files(folder: Path, merged: bool) -> None:
    """A heads folder with no base weights unless `merged` (and then only under `base/`); never a PEFT file."""
    if (folder / PEFT_TRAP).exists():
        raise ValueError(f"{folder} holds {PEFT_TRAP}: PEFT would claim the repo and fail on load; remove it")
    if not (folder / HEADS_FILE).is_file():
        raise ValueError(f"{folder} has no {HEADS_FILE}; it is not a heads folder")
    stray = tensor_files(folder)
    base = [f for f in stray if f.startswith(f"{BASE_SUBFOLDER}/")]
    other = [f for f in stray if f not in base]
    if other:
        raise ValueError(
            f"{folder} holds tensor files that are not the heads' own: {other[:5]}; a heads repo holds only "
            f"{', '.join(OWN_TENSOR_FILES)} (and a full base copy under {BASE_SUBFOLDER}/ when merged)"
        )
    if base and not merged:
        raise ValueError(
            f"{folder} holds a full copy of the base model ({base[:3]}); pass merged=True (`--merged`) to upload it"
        )
    if merged and not base:
        raise ValueError(f"merged=True but {folder} has no base copy under {BASE_SUBFOLDER}/")
