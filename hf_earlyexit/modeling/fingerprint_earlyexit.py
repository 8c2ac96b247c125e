"""The base-weight fingerprint's arithmetic: per part `[‖w‖, p_1 .. p_PROBES]`, the norm of the part's weights and
projections `p_k = Σ u_k·W·v_k` of each weight tensor (as rows x columns) onto fixed pseudo-random vectors.

`base_earlyexit.weight_fingerprint` applies it to a loaded model's parts; the vLLM plugin applies it to checkpoint
tensors as they stream past (the part order and tensor order within a part are the HF model's).

Portable: torch only (ships with the folder and with the vLLM plugin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

FINGERPRINT_PROBES = 4


def probe(n: int, salt: int, device: torch.device | str = "cpu") -> Tensor:
    """`(n, FINGERPRINT_PROBES)` float64 in [-1, 1]: fixed pseudo-random values (an integer hash of position, probe
    and `salt`; the same on every machine and torch version)."""
    i = torch.arange(n, dtype=torch.int64, device=device)[:, None]
    k = torch.arange(FINGERPRINT_PROBES, dtype=torch.int64, device=device)[None, :]
    x = (i * 2654435761 + k * 40503 + salt * 977 + 12345) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return (x & 0xFFFF).double() / 32767.5 - 1.0


def tensor_terms(weight: Tensor, index: int) -> tuple[float, Tensor]:
    """The contribution of a part's `index`-th weight tensor: (sum of squares, `(PROBES,)` float64 projections)."""
    w = weight.detach()
    w = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
    rows, cols = w.shape
    u, v = probe(rows, 2 * index, w.device), probe(cols, 2 * index + 1, w.device)
    squares = 0.0
    projections = torch.zeros(FINGERPRINT_PROBES, dtype=torch.float64)
    step = max(1, 2**22 // max(cols, 1))  # rows per chunk: bounded float64 memory for large embeddings
    for start in range(0, rows, step):
        chunk = w[start:start + step].double()
        squares += chunk.square().sum().item()
        projections += ((chunk @ v) * u[start:start + step]).sum(0).cpu()
    return squares, projections


def part_entry(terms: Iterable[tuple[float, Tensor]]) -> list[float]:
    """A part's fingerprint entry from its tensors' `tensor_terms`."""
    squares = 0.0
    projections = torch.zeros(FINGERPRINT_PROBES, dtype=torch.float64)
    for s, p in terms:
        squares += s
        projections += p
    return [float(f"{value:.7g}") for value in (math.sqrt(squares), *projections.tolist())]


def fingerprint_mismatch(saved: list, current: list, rel_tol: float = 1e-2) -> int | None:
    """Index of the first part whose fingerprint differs beyond `rel_tol`, or `None` when they agree.

    Both in the same format: the norm-and-projections one (each compared within `rel_tol` x the norm) or the legacy
    one (mean |w|, within `rel_tol` relative).
    """
    if len(saved) != len(current):
        return 0
    for i, (a, b) in enumerate(zip(saved, current, strict=True)):
        if isinstance(a, list | tuple) != isinstance(b, list | tuple):
            return i
        if not isinstance(a, list | tuple):
            if abs(a - b) > rel_tol * max(abs(a), abs(b), 1e-12):
                return i
            continue
        if len(a) != len(b):
            return i
        scale = rel_tol * max(abs(a[0]), abs(b[0]), 1e-12)
        if any(abs(x - y) > scale for x, y in zip(a, b, strict=True)):
            return i
    return None
