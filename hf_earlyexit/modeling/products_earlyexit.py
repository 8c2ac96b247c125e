"""Products with a large frozen LM head, taken the fastest way this machine has, and values kept from its weights
(portable: torch only).

- `kept`: a value derived from frozen weights (a cast, selected rows, row norms), made once per owner and made
  again when a weight changes.
- `fastest`: of several ways to compute the same result, the one that runs fastest here, learned from the first
  calls (MKL's speed for a few rows against a 262k-row matrix depends on the CPU, the dtype and the row count, not
  monotonically).
- `Bf16Head` and `screen_top`: the LM head's bfloat16 copy screens all tokens, float32 dot products settle the
  best few, and a rounding bound says where that is provably the exact top token (`LayerEngine.final_argmax`, the
  teacher's `lm_topk.final_topk`).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {tag: (weak refs, stamps, value)}


def kept(owner: object, tag: Hashable, tensors: Sequence[Tensor | None], make: Callable[[], Any]) -> Any:
    """`make()`, kept for `owner` under `tag` until one of `tensors` is another tensor or changed (in place, by
    `.data =`, or moved to another dtype or device); the value lives as long as `owner`.

    For what is derived from frozen weights (a cast, selected rows, row norms): costly to remake on every call, and
    wrong if kept past a change of the weights.
    """
    def stamp(tensor: Tensor | None) -> tuple | None:
        if tensor is None:
            return None
        version = -1 if tensor.is_inference() else tensor._version  # inference tensors keep no version counter
        return version, tensor.data_ptr(), tensor.dtype, tensor.device

    held = _KEPT.setdefault(owner, {})
    stamps = tuple(stamp(tensor) for tensor in tensors)
    entry = held.get(tag)
    if entry is None or entry[1] != stamps or any(
            ref is not None and ref() is not tensor for ref, tensor in zip(entry[0], tensors, strict=True)):
        held.pop(tag, None)  # free the old value before making the new one
        refs = tuple(None if tensor is None else weakref.ref(tensor) for tensor in tensors)
        entry = held[tag] = (refs, stamps, make())
    return entry[2]


# Ways to take `x @ Wᵀ` for a few rows `x` of a large matrix `W`: equal up to rounding, but MKL's speed for each
# depends on the CPU, the dtype and the row count, and not monotonically (262,144 x 640, 2 threads, ms):
#   AMD EPYC (AVX-512):  float32, 1 row: rows 55, columns 55, columns_twice 21
#   Xeon (AVX-512, AMX): float32, 1 row: rows 24, columns 24, columns_twice 73; 2-6 rows: rows 27-58, columns 73;
#                        11 rows: rows 114, columns 54
#                        bfloat16, 1 row: rows 20, columns 20, columns_twice 13; 2-8 rows: rows 22-23, columns 13
#   Xeon (AVX2):         float32, 4 rows: rows 245, columns 67; 8 rows: rows 288, columns 115
PRODUCTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rows": lambda weight, x: torch.nn.functional.linear(x, weight),
    "columns": lambda weight, x: torch.matmul(weight, x.T).T,
    "columns_twice": lambda weight, x: torch.matmul(weight, torch.cat([x, x]).T).T[: len(x)],  # one row, given twice
}
TRIES = 2  # timed calls of each way before the fastest is kept
_times: dict[Hashable, dict[str, list[float]]] = {}  # key -> way -> seconds of its calls
_choice: dict[Hashable, str] = {}  # key -> the way kept

T = TypeVar("T")


def products_for(rows: int) -> list[str]:
    """The `PRODUCTS` worth trying for `rows` rows (one row given twice only where there is one)."""
    return list(PRODUCTS) if rows == 1 else [name for name in PRODUCTS if name != "columns_twice"]


def row_bucket(rows: int) -> int:
    """Row counts that share one choice of way: 1, 2, 3-4, 5-8, 9-16, ... (so that the verification passes of
    speculative decoding, a few rows each of many counts, learn a few choices instead of one per count)."""
    return 1 << (max(rows, 1) - 1).bit_length()


def fastest(key: Hashable, ways: Mapping[str, Callable[[], T]]) -> T:
    """`ways[name]()` for the way that runs fastest for `key` on this machine. The first calls for a key take each
    way in turn, `TRIES` times, and time it; later calls take the fastest. All ways must give results the caller
    treats as equal (the same token, or values within one rounding bound)."""
    name = _choice.get(key)
    if name is not None and name in ways:
        return ways[name]()
    times = _times.setdefault(key, {})
    for way in ways:
        times.setdefault(way, [])
    name = min(ways, key=lambda way: len(times[way]))
    start = time.perf_counter()
    out = ways[name]()
    times[name].append(time.perf_counter() - start)
    if all(len(times[way]) >= TRIES for way in ways):
        _choice[key] = min(ways, key=lambda way: min(times[way]))
    return out


# how an LM head may be screened with its bfloat16 copy (`LayerEngine.lm_screen`, the teacher's `final_topk`):
# "auto" where the CPU multiplies bfloat16 natively, "bf16" also where it is emulated, "off" never
LM_SCREENS = ("auto", "bf16", "off")


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), not by emulation."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


# candidates beyond the k asked for, so that the k kept (by float32 value) are the exact top k unless more than this
# many tokens crowd within the screen's error of the k-th
SCREEN_EXTRA = 16
# the candidates' LM-head rows are gathered this many positions at a time (64 x 80 x 640 floats: 13 MB), so that
# the temporaries stay under glibc's largest mmap threshold (32 MB) and come from the reused heap
ROWS_PER_GATHER = 64


class Bf16Head:
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
    def of(cls, owner: object, weight: Tensor) -> Bf16Head:
        """The copy of `weight`, kept for `owner` (an engine): made on first use and again whenever the weight
        changes; it lives as long as the owner."""
        return kept(owner, "bf16_head", (weight,), lambda: cls(weight))

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


def screen_top(weight: Tensor, screen: Bf16Head, x: Tensor, scores: Tensor, wide: int,
               row_norm: float, keep: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The screen's best `wide` tokens per row, settled in float32, and where the best of them is provably the exact
    top token.

    Args:
        weight: the float32 LM head `(vocab, hidden)`; `screen` its `Bf16Head`.
        x: float32 rows `(n, hidden)` (after the final norm); `scores` `(n, vocab)` their screen, `Wb @ bf16(x)`.
        wide: candidates per row (`k + SCREEN_EXTRA` for the top k).
        row_norm: ‖W‖, the largest row norm of `weight`.
        keep: how many of the best are to be proved (1: the top token; `k`: the set of the top `k`).

    Returns:
        `(values, ids, unsure)`: the candidates' float32 logits `(n, wide)`, descending, and their ids; `(n,)`
        bool, rows where the `keep`-th best float32 value does not clear the screen's value of the last candidate
        (above every other token's screen) by `r + 3B`, or (for `keep=1`) the best does not clear its runner-up by
        `4B`. Elsewhere no token outside the candidates can be among the exact best `keep` (for `keep=1`: no other
        token can be the exact argmax), for any order of float32 summation.
    """
    floor, ids = scores.topk(wide, dim=-1)  # (n, wide)
    exact = torch.cat([torch.einsum("nwh,nh->nw", weight[ids[i:i + ROWS_PER_GATHER]], x[i:i + ROWS_PER_GATHER])
                       for i in range(0, len(x), ROWS_PER_GATHER)])  # (n, wide) float32, within B of the exact logits
    values, order = exact.sort(dim=-1, descending=True)
    ids = ids.gather(-1, order)
    floor = floor[:, -1].float()
    runner_up = values[:, 1] if wide > 1 else floor
    r, b = screen.bounds(x, row_norm)
    unsure = values[:, keep - 1] <= floor + r + 3 * b
    if keep == 1:
        unsure |= values[:, 0] - runner_up <= 4 * b
    return values, ids, unsure
