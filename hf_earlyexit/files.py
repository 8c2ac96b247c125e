"""JSON result files: strict JSON (NaN written as null), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` atomically (NaN written as null, so the file is strict JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(finite(payload), f, indent=1, default=str)
    os.replace(tmp, path)


def finite(value):
    """`value` with every NaN replaced by `None` (nested in dicts, lists and tuples)."""
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
