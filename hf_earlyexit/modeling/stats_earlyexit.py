"""What early-exit and self-speculative decoding spent, against the plain model (portable: torch + transformers +
siblings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor
from transformers.generation import GenerateDecoderOnlyOutput

from .costs_earlyexit import ZERO, Cost, CostModel

_SUMMED = ("tokens", "steps", "layer_tokens", "layer_tokens_full", "kv_fill_tokens", "wasted_layer_tokens",
           "head_tokens", "macs", "macs_full", "weight_bytes", "weight_bytes_full", "drafted", "accepted", "rounds")


@dataclass
class ExitStats:
    """What early-exit generation spent, against the plain model on the same tokens.

    Attributes:
        exit_layers: the exits, in order (`exit_counts[-1]` counts tokens from the full model).
        num_layers: decoder layers of the base model.
        tokens: generated tokens (the first token of each sequence comes from the prompt pass, at full depth).
        exit_counts: tokens per exit, then full depth.
        steps: decoding steps after the prompt pass (each one batch pass).
        layer_tokens: token-positions run through a decoder layer in those steps (catch-up of skipped layers and
            rows carried along in a batch included).
        layer_tokens_full: the same for the plain model (one full pass per token after the first).
        kv_fill_tokens: token-positions whose keys/values were filled by propagation.
        wasted_layer_tokens: layer work spent on rows that had already exited in the same batch step.
        head_tokens: head evaluations.
        macs / macs_full: weight multiply-adds spent vs the plain model (attention over the context not counted).
        weight_bytes / weight_bytes_full: bytes of weights read (once per pass, shared by the batch) vs plain.
        checked_exits: the exits that were checked (the exit policy may skip exits that seldom fire at this ε).
        drafted / accepted / rounds: self-speculative decoding: draft tokens proposed, how many the full model
            accepted, and draft-verify rounds (per sequence).
        drafted_by / accepted_by: the same per drafter (`"heads"`, `"lookup"`); tokens a drafter other than the
            heads proposed and the model kept count as full-model tokens in `exit_counts`.
        seconds: wall-clock time by phase (`draft`, `verify`, `heads` (inside draft), `bookkeeping`), where
            measured.
    """

    exit_layers: list[int]
    num_layers: int
    checked_exits: list[int] | None = None
    tokens: int = 0
    exit_counts: list[int] = field(default_factory=list)
    steps: int = 0
    layer_tokens: int = 0
    layer_tokens_full: int = 0
    kv_fill_tokens: int = 0
    wasted_layer_tokens: int = 0
    head_tokens: int = 0
    macs: int = 0
    macs_full: int = 0
    weight_bytes: int = 0
    weight_bytes_full: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    drafted_by: dict[str, int] = field(default_factory=dict)
    accepted_by: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.exit_counts:
            self.exit_counts = [0] * (len(self.exit_layers) + 1)

    def add(self, other: ExitStats) -> None:
        """Accumulate `other` (same exits) into this one."""
        if other.exit_layers != self.exit_layers:
            raise ValueError(f"cannot add stats for exits {other.exit_layers} to stats for {self.exit_layers}")
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.exit_counts = [a + b for a, b in zip(self.exit_counts, other.exit_counts, strict=True)]
        for mine, theirs in ((self.drafted_by, other.drafted_by), (self.accepted_by, other.accepted_by),
                             (self.seconds, other.seconds)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        if other.checked_exits is not None:
            self.checked_exits = sorted(set(self.checked_exits or []) | set(other.checked_exits))

    def count_exits(self, exit_index: Tensor) -> None:
        """Count tokens that left at `exit_index` `(n,)` (`len(exit_layers)`: the full model)."""
        for j in exit_index.tolist():
            self.exit_counts[j] += 1
        self.tokens += exit_index.numel()

    @property
    def exit_names(self) -> list[str]:
        return [f"exit@{layer}" for layer in self.exit_layers] + ["full"]

    @property
    def layers_computed_fraction(self) -> float:
        """Decoder-layer work relative to the plain model (1.0 = no saving)."""
        return self.layer_tokens / self.layer_tokens_full if self.layer_tokens_full else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted ÷ drafted tokens (self-speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per draft-verify round."""
        return self.accepted / self.rounds if self.rounds else float("nan")

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.macs_full if self.macs_full else float("nan")

    @property
    def weight_bytes_fraction(self) -> float:
        return self.weight_bytes / self.weight_bytes_full if self.weight_bytes_full else float("nan")

    def summary(self) -> str:
        """One line: exits per head, and work vs the plain model."""
        total = max(self.tokens, 1)
        exits = ", ".join(f"{n} {c} ({c / total:.0%})" for n, c in zip(self.exit_names, self.exit_counts, strict=True))
        if self.rounds:
            exits += (f"; drafted {self.drafted}, accepted {self.accepted} ({self.acceptance_rate:.0%}), "
                      f"{self.mean_accepted:.2f} accepted per round")
            if len(self.drafted_by) > 1:
                exits += " (" + ", ".join(f"{name}: drafted {n}, accepted {self.accepted_by.get(name, 0)}"
                                          for name, n in sorted(self.drafted_by.items())) + ")"
        return (
            f"{self.tokens} tokens: {exits}; decoder-layer work {self.layers_computed_fraction:.2f}x, "
            f"multiply-adds {self.macs_fraction:.2f}x, weight bytes {self.weight_bytes_fraction:.2f}x of plain decoding"
        )


@dataclass
class EarlyExitGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's decoder-only generate output plus where each token left.

    Attributes:
        exit_stats: what this call spent (`ExitStats`).
        exit_index: `(batch, new_tokens)` the exit each generated token left from (`len(exit_layers)` = full
            model; -1 for padding after a sequence finished).
    """

    exit_stats: ExitStats | None = None
    exit_index: Tensor | None = None


@dataclass
class Tally:
    """Head and final-head work of one generate call (decoder-layer work is counted by the engine)."""

    head_tokens: list[int]
    head_calls: list[int]
    final_tokens: int = 0
    final_calls: int = 0
    head_seconds: float = 0.0

    @classmethod
    def empty(cls, num_exits: int) -> Tally:
        return cls([0] * num_exits, [0] * num_exits)


def charge(stats: ExitStats, costs: CostModel, work: dict[str, list[int]], tally: Tally, decode_tokens: int,
           plain_steps: int) -> None:
    """Fill the work fields of `stats` from the engine's per-layer `work` and the heads' `tally` of the decoding
    after the prompt pass (which plain decoding does alike), against the plain model's `decode_tokens` one-token
    passes in `plain_steps` batch steps."""
    num_layers = len(costs.layers)
    layers = costs.layers + costs.contexts  # the engine's layers: the model's, then context heads' blocks
    stats.layer_tokens = sum(work["tokens"][:num_layers])
    stats.layer_tokens_full = decode_tokens * num_layers
    stats.kv_fill_tokens = sum(work["kv_tokens"])
    stats.head_tokens = sum(tally.head_tokens)
    kv = (costs.kv() if stats.kv_fill_tokens else [ZERO] * num_layers) + [ZERO] * len(costs.contexts)

    def spent(attr: str, counts: list[tuple[list[Cost], list[int]]]) -> int:
        return sum(getattr(c, attr) * t for parts, ts in counts for c, t in zip(parts, ts, strict=True))

    stats.macs = spent("macs", [
        (layers, work["tokens"]), (kv, work["kv_tokens"]), (costs.tails, tally.head_tokens),
        ([costs.final], [tally.final_tokens]),
    ])
    stats.weight_bytes = spent("weight_bytes", [
        (layers, work["calls"]), (kv, work["kv_calls"]), (costs.tails, tally.head_calls),
        ([costs.final], [tally.final_calls]),
    ])
    stats.macs_full = costs.full.macs * decode_tokens
    stats.weight_bytes_full = costs.full.weight_bytes * plain_steps
