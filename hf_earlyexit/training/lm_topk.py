"""The full model's top k tokens at many positions at once, for the teacher pass (`FeatureStore`).

A teacher pass keeps, per position, the model's `k` best tokens and their log-probabilities. Reading them through
the exact float32 LM head costs a 262k-wide product per position. `final_topk` can screen the head with its
bfloat16 copy instead: half the bytes, and on CPUs with native bfloat16 products about twice the speed for many
rows (262,144 x 640, 1,024 rows, AMD EPYC, 2 threads: 1.2 vs 2.5 s). It then takes float32 dot products for the
screen's best `k + SCREEN_EXTRA` tokens only and keeps the `k` best of those.

Why the top token is still the exact one: for every token i the screen's value lies within `r` of the exact logit
(`_Bf16Head`), and a float32 dot product lies within `B` (the bound of `LayerEngine.final_argmax`). Where the best
float32 value clears the screen's last candidate by `r + 3B` and its runner-up by `4B`, no other token can be the
exact argmax; rows that do not pass are read the exact way. The normaliser (log-sum-exp over the vocabulary) takes
the candidates' float32 values and the screen's values for the rest, so it carries the bf16 rounding of the rest's
sum (≤ 0.05 on real text for the embedded model). Top-k distillation renormalises the k, so the targets the heads
learn do not depend on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..modeling.engine_earlyexit import LayerEngine, kept

SCREENS = ("auto", "bf16", "off")
# candidates beyond the k asked for, so that the k kept (by float32 value) are the exact top k unless more than this
# many tokens crowd within the screen's error of the k-th
SCREEN_EXTRA = 16
# rows from which "auto" screens: below them the float32 product is not the cost
SCREEN_MIN_ROWS = 64
# pieces whose float32 temporaries stay under glibc's largest mmap threshold (32 MB), so that they come from the reused
# heap instead of fresh pages: the candidates' LM-head rows (64 x 80 x 640 floats: 13 MB) and the normaliser's
# columns (1,024 x 4,096 floats: 16 MB)
ROWS_PER_GATHER = 64
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
    plain = _plain_head(engine)
    if screen == "auto":
        screen = "bf16" if plain and len(flat) >= SCREEN_MIN_ROWS and native_bf16() else "off"
    if screen == "off" or not plain or not len(flat):
        values, ids, lse = _exact_topk(engine, flat, k)
    else:
        values, ids, lse = _screened_topk(engine, flat, k)
    return values.reshape(*shape, k), ids.reshape(*shape, k), lse.reshape(shape)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), not by emulation."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def _plain_head(engine: LayerEngine) -> bool:
    """The LM head is a float32 CPU `nn.Linear` without bias, and no soft-capping follows it."""
    head = engine.parts.lm_head
    return (isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.dtype == torch.float32
            and head.weight.device.type == "cpu"
            and not getattr(engine.config, "final_logit_softcapping", None))


def _exact_topk(engine: LayerEngine, hidden: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    logits = engine.final_logits(hidden).float()  # (n, vocab)
    values, ids = logits.topk(k, dim=-1)
    return values, ids, torch.logsumexp(logits, dim=-1)


def _screened_topk(engine: LayerEngine, hidden: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    weight = engine.parts.lm_head.weight  # (vocab, hidden) float32
    screen = _Bf16Head.of(engine)
    x = engine.parts.norm(hidden).float()  # (n, hidden)
    scores = _scores_buffer(engine, len(x), len(weight))
    torch.matmul(x.to(torch.bfloat16), screen.low.T, out=scores)  # (n, vocab) bf16 products, float32 sums, bf16 out
    wide = min(k + SCREEN_EXTRA, scores.shape[-1])
    floor, ids = scores.topk(wide, dim=-1)  # (n, wide): the candidates; `floor[:, -1]` bounds every other token
    exact = torch.cat([torch.einsum("nwh,nh->nw", weight[ids[i:i + ROWS_PER_GATHER]], x[i:i + ROWS_PER_GATHER])
                       for i in range(0, len(x), ROWS_PER_GATHER)])  # (n, wide) float32, within B of the exact logits
    values, order = exact.sort(dim=-1, descending=True)
    ids = ids.gather(-1, order)
    rest = scores.scatter_(-1, ids, float("-inf"))  # (n, vocab) the screen without the candidates
    rest_lse = torch.stack([torch.logsumexp(rest[:, i:i + COLUMNS_PER_SUM].float(), dim=-1)
                            for i in range(0, rest.shape[-1], COLUMNS_PER_SUM)], dim=-1).logsumexp(dim=-1)
    lse = torch.logaddexp(torch.logsumexp(values, dim=-1), rest_lse)  # (n,)
    runner_up = values[:, 1] if wide > 1 else floor[:, -1].float()  # (n,)
    values, ids = values[:, :k].contiguous(), ids[:, :k].contiguous()
    r, b = screen.bounds(x, engine.lm_head_norms()[0])
    unsure = ((values[:, 0] <= floor[:, -1].float() + r + 3 * b)
              | (values[:, 0] - runner_up <= 4 * b)).nonzero().squeeze(1)
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


class _Bf16Head:
    """An LM head `W`'s bfloat16 copy `Wb` with what the error bounds need, kept per weight until it changes.

    For every token i, `|W_i·x - s_i| <= r` where `s = Wb @ bf16(x)` (float32 accumulation, bfloat16 output) and
    `r = e‖x‖ + ‖Wb‖(‖x - bf16(x)‖ + γ‖bf16(x)‖) + u/(1 - u)·‖Wb‖(1 + γ)‖bf16(x)‖`: `e` the largest row norm of
    `W - Wb`, ‖Wb‖ the largest row norm of `Wb`, γ the float32 dot-product factor of the hidden size, u = 2⁻⁸ the
    bfloat16 unit roundoff of the output. A float32 dot product is within `B = (γ + u₃₂)‖W‖‖x‖` of `W_i·x`.
    """

    def __init__(self, weight: Tensor) -> None:
        weight = weight.detach()
        self.low = weight.to(torch.bfloat16)  # (vocab, hidden)
        chunks = range(0, len(weight), 16384)
        self.error = max(float((weight[i:i + 16384] - self.low[i:i + 16384].float()).norm(dim=-1).max())
                         for i in chunks)
        self.low_norm = float(self.low.float().norm(dim=-1).max())

    @classmethod
    def of(cls, engine: LayerEngine) -> _Bf16Head:
        """The copy of `engine`'s LM head, made on first use and again whenever its weight changes; it lives as long
        as the engine."""
        weight = engine.parts.lm_head.weight
        return kept(engine, "bf16_head", (weight,), lambda: cls(weight))

    def bounds(self, x: Tensor, row_norm: float) -> tuple[Tensor, Tensor]:
        """`(r, B)` `(n,)` for float32 rows `x` `(n, hidden)`, `row_norm` = ‖W‖ (`LayerEngine.lm_head_norms`); 1% on
        `r` for the bounds' own rounding."""
        unit = 2.0**-24
        gamma = x.shape[-1] * unit / (1 - x.shape[-1] * unit)
        u = 2.0**-8
        xb = x.to(torch.bfloat16).float()
        norm, xb_norm = x.norm(dim=-1), xb.norm(dim=-1)
        r = (self.error * norm + self.low_norm * ((x - xb).norm(dim=-1) + gamma * xb_norm)
             + u / (1 - u) * self.low_norm * (1 + gamma) * xb_norm) * 1.01
        return r, (gamma + unit) * row_norm * norm
