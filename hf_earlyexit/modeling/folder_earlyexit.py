"""The heads folder, PEFT-like: its file layout, reading it back, and checking it against a base model.

Portable: stdlib, torch, transformers, safetensors and siblings. A folder holds only what the heads own:
`config.json` (base id + revision + weight fingerprint, exits, thresholds, provenance, `format_version`, `auto_map`),
`exit_heads.safetensors` (head weights and the draft vocabulary ids), `calibration.safetensors` (per-token
calibration statistics), the tokenizer, the portable code and `README.md`. A merged folder adds a full copy of the
base model under `base/`. Never `adapter_config.json`: when peft is installed, transformers' Auto classes treat any
folder holding one as a PEFT adapter and fail on our type.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
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
    fingerprint_part_names,
    is_legacy_fingerprint,
    legacy_weight_fingerprint,
    load_base_model,
    weight_fingerprint,
)
from .configuration_earlyexit import EarlyExitConfig, check_inside_folder
from .fingerprint_earlyexit import fingerprint_mismatch

logger = logging.getLogger(__name__)

HEADS_FILE = "exit_heads.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
CARD_FILE = "README.md"
BASE_SUBFOLDER = "base"
OWN_TENSOR_FILES = (HEADS_FILE, CALIBRATION_FILE)
PEFT_TRAP = "adapter_config.json"
CONFIG_FILE = "config.json"
# inside a staging folder while a save writes it: the host and process that write it
STAGING_MARK = ".staging.json"
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
        check_inside_folder("base_subfolder", config.base_subfolder)
        sub = "/".join(p for p in (hub.get("subfolder"), config.base_subfolder) if p)
        local = Path(source)
        if local.is_dir() and not (local / sub).resolve().is_relative_to(local.resolve()):
            raise ValueError(f"base_subfolder={config.base_subfolder!r} leads outside the heads folder {source} (to "
                             f"{(local / sub).resolve()}); only a base copy inside the folder is loaded")
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


def backup_of(target: Path) -> Path:
    """Where `replace_dir` keeps the previous contents of `target` while it swaps the new ones in."""
    return target.with_name(f".{target.name}.old")


def make_staging(target: Path) -> Path:
    """A fresh hidden staging folder beside `target`, marked with this host and process so that a later save can
    tell the leftover of a killed save (removed by `clean_stale_staging`) from a save running now."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    (staging / STAGING_MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return staging


def clean_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders of saves to `target` whose process is gone (killed); return them. Only folders
    `make_staging` marked, written by a process of this host that no longer runs, are touched."""
    removed = []
    for path in sorted(target.parent.glob(f".{target.name}-*")):
        mark = path / STAGING_MARK
        try:
            owner = json.loads(mark.read_text()) if path.is_dir() and mark.is_file() else None
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and owner.get("host") == socket.gethostname() and not _running(owner.get("pid")):
            if remove_tree(path):
                removed.append(path)
                logger.info("removed %s, left by an interrupted save", path)
    return removed


def _running(pid) -> bool:
    """Whether process `pid` of this host still runs (unknown: assumed running)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or os.name != "posix":
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def recover_backup(target: Path) -> None:
    """Before writing `target`: previous contents that an interrupted swap left in `backup_of(target)` go back to
    `target` when it is missing (they are the only copy); beside a complete `target` they are a leftover, removed."""
    backup = backup_of(target)
    if not backup.exists():
        return
    if not target.exists():
        backup.rename(target)
        logger.warning("restored %s from %s, where an interrupted save had left it", target, backup)
    elif not remove_tree(backup):
        logger.warning("could not remove %s, left by an interrupted save of %s; delete it", backup, target)


def remove_tree(path: Path) -> bool:
    """Delete a folder (or file) even where read-only entries are in the way; return whether it is gone."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return True

    def retry(func, failed, _error):  # a read-only entry or folder: make it writable and try once more
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            os.chmod(failed, stat.S_IRWXU)
            func(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
    return not path.exists()


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` folder to `target`, replacing what was there only at the last moment.

    The previous contents wait in `backup_of(target)` between the two renames: when the second fails they are put
    back (or, when even that fails, the error names where they are); a backup that cannot be deleted afterwards is
    named in a warning.
    """
    (staging / STAGING_MARK).unlink(missing_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file, not a folder; remove it or choose another path")
    if not target.exists():
        staging.rename(target)
        return
    backup = backup_of(target)
    if backup.exists() and not remove_tree(backup):
        raise OSError(f"cannot replace {target}: {backup} (left by an interrupted save) cannot be removed")
    target.rename(backup)
    try:
        staging.rename(target)
    except OSError as err:
        try:
            backup.rename(target)
        except OSError as restore_err:
            raise OSError(f"could not move the new contents of {target} into place ({err}), nor put the previous "
                          f"contents back ({restore_err}): they are in {backup}; rename that folder to {target}"
                          ) from err
        raise OSError(f"could not move the new contents of {target} into place ({err}); {target} keeps its previous "
                      "contents") from err
    if not remove_tree(backup):
        logger.warning("%s holds the new contents; its previous contents could not be removed from %s: delete it",
                       target, backup)


def check_extra_file_name(name: str) -> str:
    """An extra file's name in a heads folder: a relative path inside it, never one of the heads' own files (the
    config, head weights, calibration, code) nor serialized tensors; the model card `README.md` may be replaced."""
    check_inside_folder("extra_files name", name)
    own = (CONFIG_FILE, *OWN_TENSOR_FILES, PEFT_TRAP, STAGING_MARK)
    if name in own or name.endswith("_earlyexit.py") or name.split("/")[0] == BASE_SUBFOLDER:
        raise ValueError(f"extra_files name={name!r} would replace a file the heads folder writes itself; give "
                         "extra files (logs, plots, JSON results) other names")
    if name.endswith(TENSOR_SUFFIXES):
        raise ValueError(f"extra_files name={name!r} looks like serialized tensors; a heads folder holds only "
                         f"{', '.join(OWN_TENSOR_FILES)} (and a base copy under {BASE_SUBFOLDER}/ when merged)")
    return name


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
