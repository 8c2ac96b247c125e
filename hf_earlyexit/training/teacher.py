"""What the frozen base model teaches the heads, computed per batch or once for a whole corpus.

The backbone never changes during head training, so everything the loss needs from it — each exit's hidden states,
the model's next-token distribution as each head vocabulary can express it, and the model's own top token — is a
fixed function of the corpus. `OnlineTeacher` runs the backbone for every batch; `CachedTeacher` runs it once
(one pass over the corpus, with a progress bar) and then serves batches from memory, which makes a training step
several times cheaper (on the embedded model the backbone pass, the 262k-way softmax and its argmax are ~80% of a
step). Both serve the same `Teacher` batches, so training is the same computation either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..modeling.heads_earlyexit import ExitHead
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from .data import Corpus
from .features import FeatureStore, SparseTargets
from .lm_topk import final_topk

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """One batch as the loss sees it (rows left padded, leading all-padding columns trimmed).

    Attributes:
        hidden: per exit, the raw decoder-layer output `(batch, seq, hidden)` the head reads.
        targets: per exit, the model's distribution over that head's vocabulary `(batch, seq, head_vocab)`
            (heads with one vocabulary share one tensor), or the model's top-k tokens for every head
            (`SparseTargets`, from a `FeatureStore`), or `None` when the batch serves evaluation only.
        top: the full model's top token `(batch, seq)`.
        mask: `(batch, seq)` real tokens.
    """

    hidden: list[Tensor]
    targets: list[Tensor] | SparseTargets | None
    top: Tensor
    mask: Tensor


def head_targets(model_probs: Tensor, head: ExitHead) -> Tensor:
    """The model's distribution as the head can express it: `(..., vocab)` -> `(..., head_vocab)`."""
    if not head.is_draft:
        return model_probs
    inside = model_probs[..., head.token_ids]  # (..., draft)
    other = (1.0 - inside.sum(-1, keepdim=True)).clamp(min=0.0)  # (..., 1) out-of-vocabulary mass
    return torch.cat([inside, other], dim=-1)


def vocabulary_groups(heads: list[ExitHead]) -> list[int]:
    """For each head, the index of the first head with the same vocabulary (targets are computed once per group)."""
    groups = []
    for j, head in enumerate(heads):
        same = next((i for i in range(j) if _same_vocabulary(heads[i], head)), j)
        groups.append(same)
    return groups


def _head_vocab(head: ExitHead, vocab_size: int) -> int:
    return len(head.token_ids) + 1 if head.is_draft else vocab_size


def _same_vocabulary(a: ExitHead, b: ExitHead) -> bool:
    if a.token_ids is None or b.token_ids is None:
        return a.token_ids is None and b.token_ids is None
    return a.token_ids.shape == b.token_ids.shape and bool(torch.equal(a.token_ids, b.token_ids))


@torch.no_grad()
def teach(model: EarlyExitForCausalLM, ids: Tensor, mask: Tensor, with_targets: bool = True) -> Teacher:
    """Run the frozen backbone on `ids`, `mask` `(batch, seq)` and return what the heads learn from (without
    targets, for evaluation: the model's top token through `lm_topk.final_topk`, which screens the LM head where that
    is faster)."""
    if not with_targets:
        hidden, last = model.backbone_hidden(ids, attention_mask=mask)
        top = final_topk(model.engine, last, 1)[1][..., 0]  # (batch, seq)
        return Teacher(hidden=list(hidden), targets=None, top=top, mask=mask)
    hidden, logits = model.backbone_states(ids, attention_mask=mask)  # logits (batch, seq, vocab)
    probs = F.softmax(logits.float(), dim=-1)  # (batch, seq, vocab)
    heads = model.exit_heads
    groups = vocabulary_groups(heads)
    per_group = {g: head_targets(probs, heads[g]) for g in sorted(set(groups))}
    targets = [per_group[g] for g in groups]
    return Teacher(hidden=list(hidden), targets=targets, top=logits.argmax(-1), mask=mask)


def trim(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop leading columns that are padding in every row."""
    first = int(mask.any(0).nonzero()[0]) if mask.any() else 0
    return ids[:, first:], mask[:, first:]


class OnlineTeacher:
    """Runs the backbone for every batch asked for (no memory beyond the batch)."""

    def __init__(self, model: EarlyExitForCausalLM, corpus: Corpus, with_targets: bool = True) -> None:
        self.model, self.corpus, self.with_targets = model, corpus, with_targets

    def __len__(self) -> int:
        return len(self.corpus)

    def batch(self, rows: Tensor) -> Teacher:
        """The `Teacher` of corpus rows `rows` `(batch,)`."""
        ids, mask = trim(self.corpus.input_ids[rows], self.corpus.attention_mask[rows])
        device = self.model.device
        return teach(self.model, ids.to(device), mask.to(device), self.with_targets)


class CachedTeacher:
    """The backbone's outputs for every row of a corpus, computed once (`build`) and served from memory."""

    def __init__(self, hidden: list[Tensor], targets: list[Tensor] | None, top: Tensor, mask: Tensor) -> None:
        self.hidden, self.targets, self.top, self.mask = hidden, targets, top, mask

    def __len__(self) -> int:
        return self.mask.shape[0]

    @staticmethod
    def size_bytes(model: EarlyExitForCausalLM, corpus: Corpus, with_targets: bool = True) -> int:
        """Memory the cache of `corpus` would take."""
        heads, config = model.exit_heads, model.engine.config
        hidden = len(heads) * config.hidden_size * model.dtype.itemsize
        vocab = sum(_head_vocab(heads[g], config.vocab_size) for g in set(vocabulary_groups(heads)))
        per_position = hidden + (vocab * 4 if with_targets else 0) + 8 + 8  # + top token, mask
        return corpus.input_ids.numel() * per_position

    @classmethod
    @torch.no_grad()
    def build(cls, model: EarlyExitForCausalLM, corpus: Corpus, batch_size: int = 4,
              with_targets: bool = True) -> CachedTeacher:
        """One backbone pass over `corpus` in batches of `batch_size`; rows keep the corpus's full width."""
        online = OnlineTeacher(model, corpus, with_targets)
        width = corpus.input_ids.shape[1]
        parts: list[Teacher] = []
        for start in tqdm(range(0, len(corpus), batch_size), desc="Teacher pass (cached for training)", unit="batch"):
            part = online.batch(torch.arange(start, min(start + batch_size, len(corpus))))
            parts.append(_pad_left(part, width))
        groups = vocabulary_groups(model.exit_heads)
        hidden = [torch.cat([p.hidden[j] for p in parts]) for j in range(len(groups))]
        targets = None
        if with_targets:
            per_group = {g: torch.cat([p.targets[g] for p in parts]) for g in sorted(set(groups))}
            targets = [per_group[g] for g in groups]
        top = torch.cat([p.top for p in parts])
        mask = torch.cat([p.mask for p in parts])
        return cls(hidden, targets, top, mask)

    def batch(self, rows: Tensor) -> Teacher:
        """The `Teacher` of corpus rows `rows` `(batch,)`, trimmed like `OnlineTeacher`'s."""
        mask = self.mask[rows]
        first = int(mask.any(0).nonzero()[0]) if mask.any() else 0
        cut = slice(first, None)
        targets = None if self.targets is None else _shared([t[rows][:, cut] for t in self.targets], self.targets)
        return Teacher(hidden=[h[rows][:, cut] for h in self.hidden], targets=targets, top=self.top[rows][:, cut],
                       mask=mask[:, cut])


def _shared(sliced: list[Tensor], whole: list[Tensor]) -> list[Tensor]:
    """Slices of tensors that are one object in `whole` stay one object."""
    first = {}
    return [first.setdefault(id(w), s) for s, w in zip(sliced, whole, strict=True)]


def _pad_left(part: Teacher, width: int) -> Teacher:
    """Pad a trimmed batch back to `width` columns on the left (zeros, masked out)."""
    missing = width - part.mask.shape[1]
    if missing == 0:
        return part

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, 0, missing, 0)) if t.dim() == 3 else F.pad(t, (missing, 0))

    targets = None if part.targets is None else _shared([pad(t) for t in part.targets], part.targets)
    return Teacher([pad(h) for h in part.hidden], targets, pad(part.top), pad(part.mask))


class DiskTeacher:
    """Serves batches from a `FeatureStore` on disk, one shard in memory at a time (`order` keeps an epoch's rows
    grouped by shard, so a shard is read once per epoch)."""

    def __init__(self, store: FeatureStore, with_targets: bool = True) -> None:
        self.store, self.with_targets = store, with_targets
        self._loaded: dict[int, dict[str, Tensor]] = {}  # the last two shards read (a batch may straddle two)

    def __len__(self) -> int:
        return self.store.num_rows

    def order(self, epoch: int, seed: int) -> Tensor:
        """An epoch's rows: shards in a seeded order, rows shuffled within each shard."""
        generator = torch.Generator().manual_seed(seed + epoch)
        size = self.store.shard_rows
        parts = []
        for shard in torch.randperm(self.store.num_shards, generator=generator).tolist():
            count = min(size, self.store.num_rows - shard * size)
            parts.append(shard * size + torch.randperm(count, generator=generator))
        return torch.cat(parts)

    def _rows(self, shard: int) -> dict[str, Tensor]:
        if shard not in self._loaded:
            if len(self._loaded) >= 2:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[shard] = self.store.read(shard)
        return self._loaded[shard]

    def batch(self, rows: Tensor) -> Teacher:
        """The `Teacher` of corpus rows `rows` `(batch,)`, trimmed like `OnlineTeacher`'s."""
        size = self.store.shard_rows
        parts = []
        for shard in sorted(set((rows // size).tolist())):
            chosen = rows[rows // size == shard] - shard * size
            tensors = self._rows(shard)
            parts.append({name: t[chosen] for name, t in tensors.items()})
        merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        mask = merged["mask"].long()
        first = int(mask.any(0).nonzero()[0]) if mask.any() else 0
        cut = slice(first, None)
        hidden = [merged[f"hidden.{j}"][:, cut] for j in range(sum(n.startswith("hidden.") for n in merged))]
        targets = None
        if self.with_targets:
            targets = SparseTargets(merged["topk_ids"][:, cut].long(), merged["topk_logp"][:, cut].float())
        return Teacher(hidden=hidden, targets=targets, top=merged["top"][:, cut].long(), mask=mask[:, cut])


def teacher_for(model: EarlyExitForCausalLM, corpus: Corpus, cache_gib: float, batch_size: int = 4,
                with_targets: bool = True) -> OnlineTeacher | CachedTeacher:
    """A `CachedTeacher` when the corpus's cache fits in `cache_gib` GiB (0: never), else an `OnlineTeacher`."""
    need = CachedTeacher.size_bytes(model, corpus, with_targets)
    if need <= cache_gib * 2**30:
        logger.info("Caching the backbone's outputs for %d sequences (%.2f GiB)", len(corpus), need / 2**30)
        return CachedTeacher.build(model, corpus, batch_size, with_targets)
    logger.info("Backbone outputs for %d sequences need %.1f GiB > teacher_cache_gib=%g: running the backbone every "
                "step", len(corpus), need / 2**30, cache_gib)
    return OnlineTeacher(model, corpus, with_targets)
