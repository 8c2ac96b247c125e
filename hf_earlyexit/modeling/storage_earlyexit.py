"""How a context head's full block is stored: as its change from the model layer it started as, quantised.

A trained block stays close to the layer it copies, so `block - layer` needs fewer bits than the block itself:
symmetric round-to-nearest in groups of `DELTA_GROUP` consecutive values (row-major), one bfloat16 scale per group,
codes of `bits` bits packed back to back (little-endian bit order). Loading adds the decoded change back onto the
base model's own layer, which the heads' base fingerprint pins to the one they were trained on.

Portable: torch only (ships with the folder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DELTA_GROUP = 64
CODES_SUFFIX, SCALES_SUFFIX = ".delta_codes", ".delta_scales"


def quantize_delta(delta: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """`delta` as (codes: uint8, scales: bfloat16 per group); `dequantize_delta` reads them back."""
    top = 2 ** (bits - 1) - 1
    flat = delta.detach().float().reshape(-1)
    groups = F.pad(flat, (0, -flat.numel() % DELTA_GROUP)).view(-1, DELTA_GROUP)
    scales = (groups.abs().amax(dim=1) / top).to(torch.bfloat16)  # codes are computed with the stored scale
    divisor = torch.where(scales == 0, 1.0, scales.float())[:, None]
    codes = (torch.round(groups / divisor).clamp(-top - 1, top) + top + 1).to(torch.uint8).reshape(-1)
    return _pack(codes, bits), scales.contiguous()


def dequantize_delta(codes: Tensor, scales: Tensor, shape: tuple[int, ...], bits: int) -> Tensor:
    """The float32 change `quantize_delta` encoded, of `shape`; a `ValueError` names a malformed pair."""
    numel = math.prod(shape)
    num_groups = -(-numel // DELTA_GROUP)
    want_codes = num_groups * DELTA_GROUP * bits // 8
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != want_codes:
        raise ValueError(f"codes are {codes.dtype} of shape {tuple(codes.shape)}, expected uint8 of ({want_codes},) "
                         f"for a {tuple(shape)} weight at {bits} bits")
    if scales.dtype != torch.bfloat16 or tuple(scales.shape) != (num_groups,):
        raise ValueError(f"scales are {scales.dtype} of shape {tuple(scales.shape)}, expected bfloat16 of "
                         f"({num_groups},)")
    if not torch.isfinite(scales).all():
        raise ValueError("scales hold non-finite values")
    values = (_unpack(codes, bits).float() - 2 ** (bits - 1)).view(num_groups, DELTA_GROUP) * scales.float()[:, None]
    return values.reshape(-1)[:numel].view(shape)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """`bits`-bit codes (uint8, a multiple of 8 of them) packed into bytes."""
    if bits == 8:
        return codes.contiguous()
    planes = (codes[:, None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (planes.reshape(-1, 8) << weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack(packed: Tensor, bits: int) -> Tensor:
    """The codes `_pack` packed."""
    if bits == 8:
        return packed
    planes = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    weights = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (planes.reshape(-1, bits) << weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def encode_change(key: str, delta: Tensor, bits: int) -> dict[str, Tensor]:
    """The entries that store weight `key` as its change `delta` from the layer it copies: `<key>.delta_codes`,
    `<key>.delta_scales`."""
    codes, scales = quantize_delta(delta, bits)
    return {key + CODES_SUFFIX: codes.cpu(), key + SCALES_SUFFIX: scales.cpu()}


def decode_blocks(state: dict[str, Tensor], origins: dict[str, Tensor], bits: int) -> dict[str, Tensor]:
    """Undo `encode_change` for each weight named in `origins` (its `self.heads` key -> the model layer's weight
    it copies): each weight = its origin + the decoded change, in the origin's dtype. A
    missing, doubled or malformed entry raises a `ValueError` naming it."""
    state = dict(state)
    for key, origin in origins.items():
        if key in state:
            raise ValueError(f"{key!r} is stored whole, but the config says blocks are stored as {bits}-bit changes")
        codes, scales = state.pop(key + CODES_SUFFIX, None), state.pop(key + SCALES_SUFFIX, None)
        if codes is None or scales is None:
            raise ValueError(f"{key + CODES_SUFFIX!r} and {key + SCALES_SUFFIX!r} are expected ({bits}-bit block "
                             "changes) but missing")
        try:
            delta = dequantize_delta(codes, scales, tuple(origin.shape), bits)
        except ValueError as err:
            raise ValueError(f"{key!r}: {err}") from None
        state[key] = (origin.float() + delta.to(origin.device)).to(origin.dtype)
    return state
