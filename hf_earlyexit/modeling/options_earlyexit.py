"""Decoding options: one frozen object, built and validated once (portable: stdlib only).

`generate()` keyword arguments, the command line and lm-eval's `--model_args` all become a `DecodingOptions`, which
knows which options apply to which mode and refuses, by name, an option given for a mode that would ignore it.
What the heads *are* (exits, thresholds, metric) is saved config; how one call decodes is this object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

MODES = ("plain", "early_exit", "dssd")
KV_FILLS = ("recompute", "propagate")
EXIT_POLICIES = ("auto", "all")
BATCH_EXITS = ("row", "step")
DEFAULT_MAX_DRAFT = 16
# the modes each option means something in
APPLIES_TO = {
    "eps": ("early_exit", "dssd"),
    "exit_policy": ("early_exit", "dssd"),
    "kv_fill": ("early_exit",),
    "batch_exit": ("early_exit", "dssd"),
    "max_draft": ("dssd",),
    "lookup": ("dssd",),
    "adaptive_draft": ("dssd",),
}
OPTION_NAMES = ("mode", *APPLIES_TO)


@dataclass(frozen=True)
class DecodingOptions:
    """How one `generate()` call decodes.

    Attributes:
        mode: `"plain"` (the base model's own `generate()`), `"early_exit"` (lossy: a token leaves at the first
            confident exit) or `"dssd"` (lossless self-speculative decoding: heads draft, the full model verifies).
        eps: accuracy target ε in [0, 1]; `None`: the heads' saved default. 1.0 never exits and never drafts.
        exit_policy: `"auto"` checks only the exits that pay for their head at this ε; `"all"` every exit.
        kv_fill: early exit: the KV cache of skipped layers, `"recompute"` (exact, computed later with the next deep
            token) or `"propagate"` (key/value projections of the exit hidden state).
        batch_exit: early exit with a batch: `"step"` (the iteration-level rule: rows that exited ride along until
            every row has, so the deepest row sets the step's depth) or `"row"` (each row runs only the layers up to
            its own exit; the others go on without it). DSSD with a batch: `"step"` (rows that stopped drafting
            carry fillers, every row verifies the longest draft's positions) or `"row"` (a row drafts and verifies
            only its own positions). A single row decodes the same under both. Default (`None`): `"step"` for
            early exit, `"row"` for DSSD, as measured on a 2-core CPU (README, Limitations): early exit at ε 0.9
            was 1.6x / 1.2x HF batched greedy at batch 4 / 8 under "step" vs 1.5x / 1.3x under "row"; DSSD 1.07x
            / 0.71x under "row" vs 0.85x / 0.67x under "step".
        max_draft: DSSD: most tokens drafted per round.
        lookup: DSSD: also draft by prompt lookup of n-grams up to this size (0: off).
        adaptive_draft: DSSD: cap each row's drafts by what its recent rounds kept (`False`: always `max_draft`).
    """

    mode: str = "plain"
    eps: float | None = None
    exit_policy: str = "auto"
    kv_fill: str = "recompute"
    batch_exit: str | None = None
    max_draft: int = DEFAULT_MAX_DRAFT
    lookup: int = 0
    adaptive_draft: bool = True

    def rows_sparse(self, mode: str) -> bool:
        """Whether a batch decodes with row-sparse depth in `mode` (`batch_exit`, or the mode's default)."""
        return (self.batch_exit or ("row" if mode == "dssd" else "step")) == "row"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        if self.eps is not None:
            object.__setattr__(self, "eps", check_eps(self.eps))
        _choice("exit_policy", self.exit_policy, EXIT_POLICIES)
        _choice("kv_fill", self.kv_fill, KV_FILLS)
        if self.batch_exit is not None:
            _choice("batch_exit", self.batch_exit, BATCH_EXITS)
        _integer("max_draft", self.max_draft, 1)
        _integer("lookup", self.lookup, 0, " (0: no prompt lookup drafts)")
        if not isinstance(self.adaptive_draft, bool):
            raise ValueError(f"adaptive_draft={self.adaptive_draft!r} must be True or False")

    @classmethod
    def build(cls, base: DecodingOptions | None = None, **given: Any) -> DecodingOptions:
        """`base` (default: all defaults) updated with the options `given` (`None` values are left out).

        The mode defaults to `"early_exit"` when `eps` is given and `base` is plain. An option given for a mode it
        does not apply to is refused, naming it and the modes it serves.
        """
        unknown = sorted(set(given) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; the options are {', '.join(OPTION_NAMES)}")
        given = {k: v for k, v in given.items() if v is not None}
        base = base or cls()
        if "mode" not in given and "eps" in given and base.mode == "plain":
            given["mode"] = "early_exit"
        options = replace(base, **given)
        for name in given:
            modes = APPLIES_TO.get(name)
            if modes is not None and options.mode not in modes:
                raise ValueError(f"{name}={given[name]!r} does not apply to mode={options.mode!r} (it applies to "
                                 f"{', '.join(modes)})")
        return options

    def as_kwargs(self) -> dict[str, Any]:
        """The options that apply to this mode, as `generate()` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name == "mode" or self.mode in APPLIES_TO[f.name]}


def check_eps(value: Any) -> float:
    """One float in [0, 1] from a number (or its text, as `--model_args` delivers it); refuse anything else."""
    if isinstance(value, bool):
        raise ValueError(f"eps={value!r} must be a number in [0, 1]")
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"eps={value!r} must be a number in [0, 1]") from None
    if not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={value!r} must be a number in [0, 1]")
    return eps


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _integer(name: str, value: Any, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else "a non-negative integer"
        raise ValueError(f"{name}={value!r} must be {kind}{note}")
