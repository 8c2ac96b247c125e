"""Drafters for self-speculative decoding: a two-part contract and its two implementations (portable: torch +
siblings).

A drafter *proposes* the next draft token for the rows that still want one (`propose`); DSSD asks its drafters in
order and a row takes the first proposal it gets. How many tokens a row may draft in a round is a separate policy
(`DraftLength.room` / `DraftLength.update`, fed with what the full model kept), as transformers' candidate generators
split `get_candidates` from `update_candidate_strategy`.

- `LookupDrafter`: prompt lookup, the token that followed the latest earlier occurrence of the sequence's suffix
  n-gram (no layer cost).
- `HeadDrafter`: the exit heads, run up the exits under the exit rule (the same thresholds as early exit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .loop_earlyexit import DecodeRun, climb, row_climb

FIRST_CAP = 4  # adaptive drafting: the cap of a row's first round


@dataclass
class Proposal:
    """One drafter's proposals for one draft position of a round's `n` rows.

    Attributes:
        ok: `(n,)` bool, the rows it proposes for.
        exits: `(n,)` long, the exit a proposal came from (`num_exits` for drafters that are not exit heads).
        tokens: `(n,)` long fixed tokens (valid where `ok`), or `None` when the drafter gives `scores`.
        scores: `(n, vocab)` float32 scores to choose the token from (greedy argmax, or a sample), or `None`.
    """

    ok: Tensor
    exits: Tensor
    tokens: Tensor | None = None
    scores: Tensor | None = None


class Drafter(Protocol):
    """Proposes draft tokens (see the module docstring)."""

    name: str

    def propose(self, wanted: Tensor, newest: Tensor, history: list[list[int]]) -> Proposal:
        """Proposals for the rows in `wanted` `(n,)` bool, whose newest appended tokens are `newest` `(n,)` and whose
        whole sequences (drafts so far included) are `history`."""
        ...


class LookupDrafter:
    """Prompt-lookup drafts of n-grams up to `max_ngram` tokens."""

    name = "lookup"

    def __init__(self, max_ngram: int, pad: int, num_exits: int) -> None:
        self.max_ngram, self.pad, self.num_exits = max_ngram, pad, num_exits

    def propose(self, wanted: Tensor, newest: Tensor, history: list[list[int]]) -> Proposal:
        tokens = torch.full_like(newest, -1)
        for i in wanted.nonzero().squeeze(1).tolist():
            tokens[i] = lookup_token(history[i], self.max_ngram, self.pad)
        return Proposal(ok=wanted & (tokens >= 0), exits=torch.full_like(newest, self.num_exits), tokens=tokens)


class HeadDrafter:
    """Drafts from the exit heads: each position runs up the checked exits and takes the first confident head's
    distribution."""

    name = "heads"

    def __init__(self, run: DecodeRun) -> None:
        self.run = run

    def propose(self, wanted: Tensor, newest: Tensor, history: list[list[int]]) -> Proposal:
        if not bool(wanted.any()):
            return Proposal(ok=wanted, exits=torch.full_like(newest, self.run.rule.num_exits))
        if self.run.sparse is not None:  # row-sparse: only the rows still drafting run layers
            result = row_climb(self.run, wanted, newest)
        else:
            result = climb(self.run, wanted, newest)
        return Proposal(ok=wanted & result.fired, exits=result.exit_index, scores=result.logits)


def lookup_token(history: list[int], max_ngram: int, pad: int) -> int:
    """Prompt lookup: the token that followed the latest earlier occurrence of the longest suffix n-gram of
    `history` (n from `max_ngram` down to 2, or 1 when `max_ngram` is 1), or -1 when no suffix occurred before (or
    it was followed by `pad`). Single-token matches are not used beside longer ones: on the embedded model they are
    kept by the full model far less often (lookup acceptance 0.72 with them, 0.85 without) and push the heads'
    better drafts aside."""
    length = len(history)
    shortest = min(2, max_ngram)
    for n in range(min(max_ngram, length - 1), shortest - 1, -1):
        suffix = history[length - n:]
        for begin in range(length - n - 1, -1, -1):
            if history[begin: begin + n] == suffix:
                token = history[begin + n]
                if token != pad:
                    return token
                break
    return -1


def next_cap(cap: int, drafted: int, accepted: int, max_draft: int) -> int:
    """The draft cap after a round: doubled (up to `max_draft`) when the round drafted its cap and the full model
    kept everything, else one more than the round accepted when a draft was rejected (verifying a position costs
    compute on a CPU, so drafts the model will not keep are not free), else unchanged."""
    if accepted < drafted:
        return max(1, min(max_draft, accepted + 1))
    if drafted >= cap:
        return min(max_draft, 2 * cap)
    return cap


class DraftLength:
    """Per row, the most tokens the next round may draft: adapted to what the row's rounds kept (`adaptive`), or
    always `max_draft` (a fixed draft length, as LayerSkip)."""

    def __init__(self, rows: int, max_draft: int, adaptive: bool) -> None:
        self.max_draft, self.adaptive = max_draft, adaptive
        self.caps = [min(FIRST_CAP, max_draft) if adaptive else max_draft for _ in range(rows)]

    def room(self, row: int) -> int:
        return self.caps[row]

    def update(self, row: int, drafted: int, accepted: int) -> None:
        if self.adaptive:
            self.caps[row] = next_cap(self.caps[row], drafted, accepted, self.max_draft)
