"""Exit heads and the cost model (portable: torch only).

Two head types, both optionally restricted to a *draft vocabulary* (a subset of token ids; head output index `j`
means token `token_ids[j]`, and one extra last output, `OTHER`, stands for all tokens outside the draft vocabulary, so
that the head's confidence stays honest about the mass it cannot name):

- `PaperHead`: a norm + `Linear(hidden, vocab)`, the shape of the model's own final head (paper §3.2), initialised
  from scratch or copied from the LM head.
- `SharedHead`: a norm + a small residual adapter (low-rank or hidden x hidden, zero-initialised, so it starts as
  the model's own head applied early) in front of the model's frozen LM head, which it does not own or save.
- `ContextHead`: a copy of one of the model's decoder layers in front of a `SharedHead`: it attends over the exit's
  hidden states of earlier positions (its own KV cache, kept by the engine as a context layer).

Every head reports its cost per token (`Cost`, see `costs_earlyexit.py`), so speed claims can be checked against the
cost model.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .costs_earlyexit import Cost, module_cost
from .engine_earlyexit import split_shared_prefixes
from .products_earlyexit import kept


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


class ExitHead(nn.Module):
    """Common part of exit heads: a trainable copy of the model's final norm and the draft vocabulary.

    Args:
        final_norm: the base model's final norm (copied, so the head owns and trains its own).
        lm_head: the base model's LM head (gives the hidden size, device and dtype).
        token_ids: `(head_vocab,)` token ids the head predicts, or `None` for the full vocabulary.
        softcap: the base model's final logit soft-capping, applied to head logits too.
    """

    def __init__(self, final_norm: nn.Module, lm_head: nn.Linear, token_ids: Tensor | None, softcap: float | None):
        super().__init__()
        self.norm = copy.deepcopy(final_norm)
        self.norm.requires_grad_(True)
        self.softcap = softcap
        if token_ids is not None:
            self.register_buffer("token_ids", token_ids.to(torch.long).clone())
            weight = lm_head.weight  # (vocab, hidden)
            self.other = nn.Linear(weight.shape[1], 1)  # logit of "a token outside the draft vocabulary"
            self.other.to(device=weight.device, dtype=weight.dtype)
            nn.init.zeros_(self.other.weight)
            nn.init.zeros_(self.other.bias)
        else:
            self.token_ids = None
            self.other = None

    @property
    def is_draft(self) -> bool:
        return self.token_ids is not None

    def to_token_ids(self, index: Tensor) -> Tensor:
        """Map head output indices to vocabulary token ids; the `OTHER` class maps to -1 (no token)."""
        if self.token_ids is None:
            return index
        ids = torch.cat([self.token_ids, self.token_ids.new_full((1,), -1)])
        return ids[index]

    def classes_of(self, token_ids: Tensor) -> Tensor:
        """Model-vocabulary token ids `(...)` -> this head's output classes `(...)`: a draft token's index, the `OTHER`
        class for tokens outside the draft vocabulary (a full-vocabulary head: the ids themselves)."""
        if self.token_ids is None:
            return token_ids
        size = max(int(self.token_ids.max()), int(token_ids.max())) + 1
        table = torch.full((size,), len(self.token_ids), dtype=torch.long, device=self.token_ids.device)
        table[self.token_ids] = torch.arange(len(self.token_ids), device=self.token_ids.device)
        return table[token_ids.to(table.device)]

    def vocab_scores(self, logits: Tensor, vocab_size: int, other: str = "drop") -> Tensor:
        """`(n, head_vocab)` head logits -> `(n, vocab_size)` float32 scores over the model vocabulary: the one map
        from head outputs to token ids.

        `other="drop"` (decoding: a head only exits when its top class is a real token): logits of the draft tokens,
        `-inf` elsewhere, so a softmax renormalises over the draft vocabulary. `other="spread"` (scoring): log-
        probabilities, with the `OTHER` class's mass spread evenly over the tokens outside the draft vocabulary, so
        every token gets a finite, honest log-probability. A full-vocabulary head's scores are its logits (`drop`)
        or log-probabilities (`spread`).
        """
        if other not in ("drop", "spread"):
            raise ValueError(f"other={other!r} is not one of drop, spread")
        scores = logits.float() if other == "drop" else F.log_softmax(logits.float(), dim=-1)
        if not self.is_draft:
            return scores
        draft = len(self.token_ids)
        if other == "drop":
            full = scores.new_full((scores.shape[0], vocab_size), float("-inf"))
        else:
            outside = max(vocab_size - draft, 1)
            full = (scores[:, draft: draft + 1] - math.log(outside)).expand(-1, vocab_size).clone()
        full[:, self.token_ids] = scores[:, :draft]
        return full

    has_context = False  # a context head reads earlier positions through its block (see `ContextHead`)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """`(..., hidden)` raw decoder-layer output -> `(..., head_vocab)` logits (`+ 1` for `OTHER` with a draft
        vocabulary). A context head needs whole sequences `(batch, seq, hidden)` (left padding marked by
        `attention_mask`)."""
        return self.logits_from(self.features(hidden, attention_mask))

    def features(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """What `logits_from` reads at each position: the hidden states themselves (a context head: its block's
        output over whole sequences), so logits can be taken at chosen positions only."""
        return hidden

    def features_at(self, hidden: Tensor, at: tuple[Tensor, Tensor], input_ids: Tensor | None = None) -> Tensor:
        """`features(hidden)[at]` for a right-padded batch `hidden` `(batch, seq, hidden)`, where `at = (rows,
        columns)` are flat positions, row after row, each row's columns consecutive (a scored continuation): `(n,
        hidden)`. A context head runs its whole block only there (see `ContextHead.features_at`)."""
        return hidden[at]

    def context_cost(self) -> Cost:
        """Per-token cost of the head's context block (none: the head reads one position)."""
        return Cost(0, 0)

    def logits_from(self, hidden: Tensor) -> Tensor:
        """The position-wise part of the head: `(..., hidden)` -> `(..., head_vocab)` logits."""
        normed = self.norm(hidden)
        logits = self.project(normed)
        if self.other is not None:
            logits = torch.cat([logits, self.other(normed)], dim=-1)  # (..., draft + 1)
        return _softcap(logits, self.softcap)

    def project(self, normed: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost(self) -> Cost:
        raise NotImplementedError


class PaperHead(ExitHead):
    """Norm + `Linear(hidden, head_vocab)`; `init="lm_head"` copies the LM head's rows, `"scratch"` does not."""

    def __init__(
        self, final_norm: nn.Module, lm_head: nn.Linear, token_ids: Tensor | None, softcap: float | None,
        init: str = "lm_head", init_std: float = 0.02,
    ) -> None:
        super().__init__(final_norm, lm_head, token_ids, softcap)
        weight = lm_head.weight.detach()  # (vocab, hidden)
        rows = weight if token_ids is None else weight[self.token_ids]
        self.linear = nn.Linear(rows.shape[1], rows.shape[0], bias=lm_head.bias is not None)
        self.linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if init == "lm_head":
                self.linear.weight.copy_(rows)
                if lm_head.bias is not None:
                    bias = lm_head.bias.detach()
                    self.linear.bias.copy_(bias if token_ids is None else bias[self.token_ids])
            else:
                nn.init.normal_(self.linear.weight, std=init_std)
                if self.linear.bias is not None:
                    self.linear.bias.zero_()

    def project(self, normed: Tensor) -> Tensor:
        return self.linear(normed)

    def cost(self) -> Cost:
        return module_cost(self)


class SharedHead(ExitHead):
    """Norm + residual adapter in front of the model's frozen LM head (not owned, not saved).

    The adapter is `x + up(down(x))` with rank `rank`, or `x + W x` (hidden x hidden) when `rank` is `None`; its
    output map starts at zero.
    """

    def __init__(
        self, final_norm: nn.Module, lm_head: nn.Linear, token_ids: Tensor | None, softcap: float | None,
        rank: int | None = None,
    ) -> None:
        super().__init__(final_norm, lm_head, token_ids, softcap)
        hidden = lm_head.weight.shape[1]
        if rank is None:
            self.adapter = nn.Linear(hidden, hidden, bias=False)
            out_map = self.adapter
        else:
            self.adapter = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, hidden, bias=False))
            out_map = self.adapter[1]
        self.adapter.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
        nn.init.zeros_(out_map.weight)
        object.__setattr__(self, "_lm_head", lm_head)  # shared, frozen, deliberately not a submodule

    def lm_rows(self) -> tuple[Tensor, Tensor | None]:
        """The frozen head's weight/bias rows for the draft vocabulary (kept until the head or the ids change)."""
        weight, bias = self._lm_head.weight, self._lm_head.bias
        if self.token_ids is None:
            return weight, bias
        ids = self.token_ids
        return kept(self, "lm_rows", (weight, bias, ids), lambda: (
            weight[ids.to(weight.device)].detach(), None if bias is None else bias[ids.to(weight.device)].detach()))

    def adapt(self, normed: Tensor) -> Tensor:
        """The adapter's output `(..., hidden)`: what the frozen rows of `lm_rows` multiply."""
        return normed + self.adapter(normed)

    def project(self, normed: Tensor) -> Tensor:
        weight, bias = self.lm_rows()
        return F.linear(self.adapt(normed), weight, bias)

    def cost(self) -> Cost:
        weight, bias = self.lm_rows()
        head = Cost(macs=weight.numel(), weight_bytes=weight.numel() * weight.element_size())
        own = module_cost(self.norm) + module_cost(self.adapter)
        return own + (module_cost(self.other) if self.other is not None else Cost(0, 0)) + head


class ContextHead(SharedHead):
    """A decoder layer of the base model's own architecture (`block`: a trainable copy of one of the model's layers)
    in front of a shared head's norm, adapter and frozen LM head, as Kangaroo's adapter and EAGLE's draft layer: the
    head reads its exit's hidden states of every earlier position through the block's attention.

    The engine runs the block as a *context layer* with its own KV cache slot (`bind` tells the head which), so
    decoding keeps that cache for every position, whichever exit the position left at; `forward` runs it over
    whole sequences.
    """

    has_context = True

    def __init__(
        self, final_norm: nn.Module, lm_head: nn.Linear, token_ids: Tensor | None, softcap: float | None,
        block: nn.Module, rank: int | None = None,
    ) -> None:
        super().__init__(final_norm, lm_head, token_ids, softcap, rank=rank)
        self.block = block.requires_grad_(True)
        self._engine, self._slot = None, None

    def bind(self, engine, slot: int) -> None:
        """Run the block as the engine's context layer `slot`."""
        object.__setattr__(self, "_engine", engine)  # the model's engine: not a submodule of the head
        self._slot = slot

    @property
    def context_slot(self) -> int:
        """The engine's context layer that runs this head's block."""
        return self._slot

    def features(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self._engine is None:
            raise RuntimeError("a context head runs its block through the model's engine; build it with the model")
        if hidden.dim() != 3:
            raise ValueError(f"a context head reads whole sequences (batch, seq, hidden); got {tuple(hidden.shape)}")
        return self._engine.run_context(self._slot, hidden, attention_mask)  # (batch, seq, hidden)

    def features_at(self, hidden: Tensor, at: tuple[Tensor, Tensor], input_ids: Tensor | None = None) -> Tensor:
        """The block's outputs only at positions `at` (see `ExitHead.features_at`): the positions before a row's first
        one only write the block's keys and values (no attention, no MLP), and rows whose `input_ids` agree up to
        their first position (a document's choices after one context) write them once for all. Equal to
        `features(hidden)[at]` up to float rounding."""
        if self._engine is None:
            raise RuntimeError("a context head runs its block through the model's engine; build it with the model")
        rows, columns = (t.tolist() for t in at)
        spans: dict[int, list[int]] = {}
        for row, column in zip(rows, columns, strict=True):
            spans.setdefault(row, []).append(column)
        order = list(spans)
        if rows != sorted(rows) or any(cols != list(range(cols[0], cols[0] + len(cols))) for cols in spans.values()):
            raise ValueError("features_at needs positions row after row, each row's columns consecutive")
        starts = [spans[r][0] for r in order]
        lengths = [len(spans[r]) for r in order]
        keys = [tuple(input_ids[r, :start].tolist()) if input_ids is not None else (r,)
                for r, start in zip(order, starts, strict=True)]
        ends = [start + n for start, n in zip(starts, lengths, strict=True)]
        parts = split_shared_prefixes(hidden[order], keys, starts, ends)
        out = self._engine.run_context_tail(self._slot, parts.prefix, parts.prefix_mask, parts.group_of, parts.tail,
                                            parts.tail_mask)
        return torch.cat([out[i, :n] for i, n in enumerate(lengths)])

    def context_cost(self) -> Cost:
        return block_cost(self.block)


class LowRankDelta(nn.Module):
    """A frozen projection of the base model (not owned, not saved) plus a trainable low-rank delta `up(down(x))`,
    zero at the start: `x -> base(x) + up(down(x))`. Works for `nn.Linear` and GPT-2's `Conv1D` (`nf`, `(in, out)`
    weight)."""

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        weight = base.weight
        in_features, out_features = (weight.shape[0], base.nf) if hasattr(base, "nf") else weight.shape[::-1]
        self.down = nn.Linear(in_features, rank, bias=False).to(device=weight.device, dtype=weight.dtype)
        self.up = nn.Linear(rank, out_features, bias=False).to(device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.up.weight)
        object.__setattr__(self, "base", base)  # the model's own, frozen, deliberately not a submodule

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x))

    def cost(self) -> Cost:
        return module_cost(self.base) + module_cost(self)


def context_block(layer: nn.Module, attention: str, cache_index: int, rank: int | None = None) -> nn.Module:
    """A trainable copy of decoder `layer` that writes its keys and values to cache slot `cache_index` (its
    `attention` submodule's `layer_idx`). With `rank`, its projections stay the model's own (frozen, shared, not
    saved) plus trainable rank-`rank` deltas; only those and the block's norms are the head's weights."""
    block = copy.deepcopy(layer)
    for module in (block, getattr(block, attention)):
        if hasattr(module, "layer_idx"):
            module.layer_idx = cache_index
    block.requires_grad_(True)
    if rank is not None:
        originals = dict(layer.named_modules())
        for name, module in list(block.named_modules()):
            if name and module.__class__ is originals[name].__class__ and _is_projection(module):
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, LowRankDelta(originals[name], rank))
    return block


def _is_projection(module: nn.Module) -> bool:
    """A weight matrix applied to the hidden states (`nn.Linear`, or GPT-2's `Conv1D` which has `nf`)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "nf") and getattr(module, "weight", None) is not None)


def block_cost(block: nn.Module) -> Cost:
    """Per-token cost of a context block: its own weights plus the frozen projections its deltas read."""
    own = module_cost(block)
    shared = [m.base for m in block.modules() if isinstance(m, LowRankDelta)]
    return own + sum((module_cost(b) for b in shared), Cost(0, 0))


def build_head(
    head_type: str, final_norm: nn.Module, lm_head: nn.Linear, token_ids: Tensor | None, softcap: float | None,
    init: str = "lm_head", rank: int | None = None, init_std: float = 0.02, block: nn.Module | None = None,
) -> ExitHead:
    """One exit head of `head_type` (`"paper"`, `"shared"` or `"context"`, which takes its `block`)."""
    if head_type == "paper":
        return PaperHead(final_norm, lm_head, token_ids, softcap, init=init, init_std=init_std)
    if head_type == "shared":
        return SharedHead(final_norm, lm_head, token_ids, softcap, rank=rank)
    if head_type == "context":
        if block is None:
            raise ValueError("a context head needs its block (a copy of a decoder layer)")
        return ContextHead(final_norm, lm_head, token_ids, softcap, block, rank=rank)
    raise ValueError(f"head_type={head_type!r} is not one of paper, shared, context")
