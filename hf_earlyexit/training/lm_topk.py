"""The full model's top k tokens at many positions at once, for the teacher pass (`FeatureStore`) and for sampling
the training text (`sampling_head`).

A teacher pass keeps, per position, the model's `k` best tokens and their log-probabilities. Reading them through
the exact float32 LM head costs a 262k-wide product per position. `final_topk` can screen the head with its
bfloat16 copy instead: half the bytes, and on CPUs with native bfloat16 products about twice the speed for many
rows (262,144 x 640, 1,024 rows, AMD EPYC, 2 threads: 1.2 vs 2.5 s). It then takes float32 dot products for the
screen's best `k + SCREEN_EXTRA` tokens only and keeps the `k` best of those.

Why the top token is still the exact one: for every token i the screen's value lies within `r` of the exact logit
(`products_earlyexit.Bf16Head`), and a float32 dot product lies within `B` (the bound of `LayerEngine.final_argmax`).
Where the best float32 value clears the screen's last candidate by `r + 3B` and its runner-up by `4B`, no other token
can be the exact argmax (`products_earlyexit.screen_top`, shared with `final_argmax`); rows that do not pass are read
the exact way. The normaliser (log-sum-exp over the vocabulary) takes the candidates' float32 values and the
screen's values for the rest, so it carries the bf16 rounding of the rest's sum (≤ 0.05 on real text for the embedded
model). Top-k distillation renormalises the k, so the targets the heads learn do not depend on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..modeling.engine_earlyexit import LayerEngine
from ..modeling.products_earlyexit import LM_SCREENS as SCREENS
from ..modeling.products_earlyexit import SCREEN_EXTRA, Bf16Head, kept, native_bf16, screen_top

# rows from which "auto" screens: below them the float32 product is not the cost
SCREEN_MIN_ROWS = 64
# the normaliser's columns are summed this many at a time (1,024 x 4,096 floats: 16 MB), so that its float32
# temporaries stay under glibc's largest mmap threshold (32 MB) and come from the reused heap instead of fresh pages
COLUMNS_PER_SUM = 4096


def final_topk(engine: LayerEngine, hidden: Tensor, k: int, screen: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The full model's `k` best tokens after the last layer's hidden states `(..., hidden)`.

    Args:
        engine: the model's `LayerEngine` (its final norm and LM head).
        k: tokens kept per position.
        screen: `"off"` reads the exact logits (`final_logits`); `"bf16"` screens the LM head with its bfloat16
            copy (module docstring); `"auto"` screens on a CPU with native bfloat16 products (AVX-512 BF16 or AMX),
            for a float32 LM head without soft-capping or bias, from `SCREEN_MIN_ROWS` rows on; else exact.

    Returns:
        `values` `(..., k)` float32 logits, descending; `ids` `(..., k)` long; `lse` `(...)` float32, the log-sum-exp
        over the vocabulary (log-probabilities: `values - lse`).
    """
    if screen not in SCREENS:
        raise ValueError(f"screen={screen!r} is not one of {', '.join(SCREENS)}")
    shape = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])  # (n, hidden)
    plain = engine.lm_head_screenable
    if screen == "auto":
        screen = "bf16" if plain and len(flat) >= SCREEN_MIN_ROWS and native_bf16() else "off"
    if screen == "off" or not plain or not len(flat):
        values, ids, lse = _exact_topk(engine, flat, k)
    else:
        values, ids, lse = _screened_topk(engine, flat, k)
    return values.reshape(*shape, k), ids.reshape(*shape, k), lse.reshape(shape)


def _exact_topk(engine: LayerEngine, hidden: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    logits = engine.final_logits(hidden).float()  # (n, vocab)
    values, ids = logits.topk(k, dim=-1)
    return values, ids, torch.logsumexp(logits, dim=-1)


def _screen(engine: LayerEngine, x: Tensor, k: int, keep: int = 1, extra: int = SCREEN_EXTRA
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The screen of normed float32 rows `x` `(n, hidden)`: `screen_top`'s `(values, ids, unsure)` for `k + extra`
    candidates (`unsure` on the best `keep`), and the `(n, vocab)` bf16 screen itself."""
    weight = engine.parts.lm_head.weight  # (vocab, hidden) float32
    screen = Bf16Head.of(engine, weight)
    scores = _scores_buffer(engine, len(x), len(weight))
    torch.matmul(x.to(torch.bfloat16), screen.low.T, out=scores)  # (n, vocab) bf16 products, float32 sums, bf16 out
    wide = min(k + extra, scores.shape[-1])
    values, ids, unsure = screen_top(weight, screen, x, scores, wide, engine.lm_head_norms()[0], keep)
    return values, ids, unsure, scores


def _screened_topk(engine: LayerEngine, hidden: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    values, ids, unsure, scores = _screen(engine, engine.parts.norm(hidden).float(), k)
    # (n, vocab) the screen without the candidates; by indexing, as `scatter_` with a value makes a temporary the
    # size of `scores` in float32 (1 GB of fresh pages at 1,024 rows: 0.3 to 6.5 s per call on the Xeon)
    rest = scores.index_put_((torch.arange(len(ids), device=ids.device)[:, None], ids),
                             torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
    rest_lse = torch.stack([torch.logsumexp(rest[:, i:i + COLUMNS_PER_SUM].float(), dim=-1)
                            for i in range(0, rest.shape[-1], COLUMNS_PER_SUM)], dim=-1).logsumexp(dim=-1)
    lse = torch.logaddexp(torch.logsumexp(values, dim=-1), rest_lse)  # (n,)
    values, ids = values[:, :k].contiguous(), ids[:, :k].contiguous()
    unsure = unsure.nonzero().squeeze(1)
    if len(unsure):
        values[unsure], ids[unsure], lse[unsure] = _exact_topk(engine, hidden[unsure], k)
    return values, ids, lse


def _scores_buffer(engine: LayerEngine, rows: int, vocab: int) -> Tensor:
    """A `(rows, vocab)` bfloat16 buffer for the screen's products, kept per engine and grown as needed: a new
    tensor this large (512 MB at 1,024 x 262,144) is fresh pages from the kernel on every call."""
    held = kept(engine, "screen_scores", (engine.parts.lm_head.weight,), lambda: [None])
    if held[0] is None or held[0].shape[0] < rows or held[0].shape[1] != vocab:
        held[0] = None  # free the old buffer before making the new one
        held[0] = torch.empty(rows, vocab, dtype=torch.bfloat16)
    return held[0][:rows]


# candidates beyond the k of `SampledHead`: proving the whole top k (not only the top token) needs the k-th best to
# clear the last candidate's screen by the screen's bound (about 0.9 logits on real text for the embedded model);
# the logits 50th and 66th apart are about 0.5, the 50th and 306th enough for every position measured
SAMPLING_EXTRA = 256


class SampledHead(torch.nn.Module):
    """Stands in for a float32 LM head while sampling among the top `k` (`sampling_head`): the logits it returns
    `(..., vocab)` are float32 products for each position's `k` best tokens, proved by the bfloat16 screen to be the
    top `k` of the exact logits, and `-inf` for every other token. A row the screen cannot settle gets its exact
    logits (all of them). Top-k sampling over these logits draws from the same distribution as over the exact ones.
    """

    def __init__(self, engine: LayerEngine, k: int) -> None:
        super().__init__()
        self.engine, self.k = engine, k
        self.head = engine.parts.lm_head  # the LM head it stands in for (a plain float32 `nn.Linear`)

    def forward(self, hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()  # (n, hidden), already normed by the model
        values, ids, unsure, _ = _screen(self.engine, flat, self.k, keep=self.k, extra=SAMPLING_EXTRA)
        logits = torch.full((len(flat), self.head.out_features), float("-inf"), dtype=torch.float32,
                            device=flat.device)  # (n, vocab)
        logits.scatter_(-1, ids[:, :self.k], values[:, :self.k])
        unsure = unsure.nonzero().squeeze(1)
        if len(unsure):
            logits[unsure] = self.head(flat[unsure])
        return logits.reshape(*hidden.shape[:-1], -1)


@contextlib.contextmanager
def sampling_head(model: torch.nn.Module, k: int, screen: str = "auto") -> Iterator[SampledHead | None]:
    """Within the block, `model.lm_head` is a `SampledHead` for top-`k` sampling (yielded) where `screen` allows it:
    "bf16" for any float32 LM head the screen covers (`LayerEngine.lm_head_screenable`), "auto" (the default) only
    where the CPU multiplies bfloat16 natively, "off" never (yields None, the head untouched). The model's own head
    is put back on leaving, also after an error.

    Only logits processors that keep the top `k` (and nothing outside them) may follow, as `data.TopKSampler` does.
    """
    if screen not in SCREENS:
        raise ValueError(f"screen={screen!r} is not one of {', '.join(SCREENS)}")
    engine = LayerEngine(model) if screen == "bf16" or (screen == "auto" and native_bf16()) else None
    if engine is None or not (0 < k < engine.vocab_size and engine.lm_head_screenable):
        yield None
        return
    head = model.lm_head
    model.lm_head = SampledHead(engine, k)
    try:
        yield model.lm_head
    finally:
        model.lm_head = head
