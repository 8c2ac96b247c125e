"""Numbers in tables and reports: one way to print a value that may be missing."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, spec: str = ".3f") -> str:
    """`value` formatted with `spec`, or "–" when it is missing (None, NaN, infinite, not a number)."""
    return format(value, spec) if is_number(value) else "–"
