"""Reading an hf-earlyexit heads folder without hf-earlyexit: its config, its tensors, its thresholds.

The folder is untrusted input: only `config.json` and `exit_heads.safetensors` are read (no pickles, no code), the
file name stays inside the folder, every tensor's name, dtype and shape is checked against what the config says
before anything is built, and a folder format newer than this reader is refused by name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from torch.nn import functional as F

from .storage import CODES_SUFFIX, SCALES_SUFFIX, dequantize_delta

HEADS_FILE = "exit_heads.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2  # the newest folder format this reader knows (hf-earlyexit's FORMAT_VERSION)
METRICS = ("breaking_ties", "max_prob", "entropy")
HEAD_TYPES = ("paper", "shared", "context")


class HeadsFolderError(ValueError):
    """A heads folder this plugin cannot use; the message names the file, key or value and what was expected."""


@dataclass
class HeadsFolder:
    """What the plugin needs of a heads folder.

    Attributes:
        path: the folder.
        config: its `config.json`.
        exit_layers: exit `j` reads the output of the first `exit_layers[j]` decoder layers.
        head_type: `paper`, `shared` or `context`.
        metric: the confidence metric the thresholds were calibrated for.
        thresholds: `eps` key (as written, e.g. `"0.9"`) -> per-exit threshold (`None`: that exit never fires).
        tensors: every tensor of `exit_heads.safetensors` by name (`<exit>.<name>`), checked.
        block_source: exit `j` -> the decoder layer its context block copies (context heads).
        block_delta_bits: the bits of the stored block changes (`None`: blocks stored whole, or low-rank deltas).
    """

    path: Path
    config: dict
    exit_layers: list[int]
    head_type: str
    metric: str
    thresholds: dict[str, list[float | None]]
    tensors: dict[str, Tensor]
    block_source: dict[int, int]
    block_delta_bits: int | None

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def thresholds_at(self, eps: float) -> list[float | None]:
        """Per-exit thresholds at accuracy target `eps` (ε = 1: none fires); `eps` must be a calibrated grid point."""
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or not 0 <= eps <= 1:
            raise HeadsFolderError(f"eps={eps!r} must be a number in [0, 1]")
        if float(eps) == 1.0:
            return [None] * self.num_exits
        for key, values in self.thresholds.items():
            if math.isclose(float(key), float(eps), abs_tol=1e-9):
                return list(values)
        grid = ", ".join(sorted(self.thresholds, key=float))
        raise HeadsFolderError(f"eps={eps!r} is not calibrated in {self.path}: expected one of {grid}")

    def head_tensors(self, j: int, prefix: str) -> dict[str, Tensor]:
        """Exit `j`'s tensors whose names start with `prefix` (e.g. `"block."`), the prefix removed."""
        start = f"{j}.{prefix}"
        return {name[len(start):]: t for name, t in self.tensors.items() if name.startswith(start)}

    def block_weights(self, j: int, base_layer: dict[str, Tensor]) -> dict[str, Tensor]:
        """Exit `j`'s context block as whole weights, HF parameter names (`self_attn.q_proj.weight`, ...):
        stored whole, or the base layer (`base_layer`, its HF-named tensors) plus the decoded stored change, or plus
        its low-rank delta `up @ down`."""
        stored = self.head_tensors(j, "block.")
        weights: dict[str, Tensor] = {}
        for name, tensor in stored.items():
            if name.endswith(SCALES_SUFFIX):
                continue
            if name.endswith(CODES_SUFFIX):
                key = name[: -len(CODES_SUFFIX)]
                base = _base_tensor(base_layer, key, j)
                scales = stored.get(key + SCALES_SUFFIX)
                if scales is None:
                    raise HeadsFolderError(f"{HEADS_FILE}: {j}.block.{key}{CODES_SUFFIX} has no {SCALES_SUFFIX}")
                try:
                    delta = dequantize_delta(tensor, scales, tuple(base.shape), self.block_delta_bits)
                except ValueError as error:
                    raise HeadsFolderError(f"{HEADS_FILE}: {j}.block.{key}: {error}") from None
                weights[key] = base.float() + delta
            elif name.endswith(".down.weight") or name.endswith(".up.weight"):
                module = name.rsplit(".", 2)[0]
                if name.endswith(".up.weight"):
                    continue
                up = stored.get(f"{module}.up.weight")
                if up is None:
                    raise HeadsFolderError(f"{HEADS_FILE}: {j}.block.{module}.down.weight has no .up.weight")
                base = _base_tensor(base_layer, f"{module}.weight", j)
                delta = up.float() @ tensor.float()
                if tuple(delta.shape) != tuple(base.shape):
                    raise HeadsFolderError(f"{HEADS_FILE}: {j}.block.{module}: low-rank delta of shape "
                                           f"{tuple(delta.shape)}, expected {tuple(base.shape)}")
                weights[f"{module}.weight"] = base.float() + delta
            else:
                weights[name] = tensor
        for key, base in base_layer.items():  # projections a low-rank block keeps frozen (no delta stored)
            weights.setdefault(key, base)
        return weights


def _base_tensor(base_layer: dict[str, Tensor], key: str, j: int) -> Tensor:
    if key not in base_layer:
        raise HeadsFolderError(f"{HEADS_FILE}: exit {j}'s block stores a change of {key!r}, which the base layer "
                               f"it copies does not have (expected one of {sorted(base_layer)})")
    return base_layer[key]


# config keys under the names GPT-2's config stores them (transformers maps the common names onto these)
_KEY_ALIASES = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head"}


def text_value(text: dict, key: str):
    """The base model's `key` (`num_hidden_layers`, `hidden_size`, ...) from a heads folder's `text_config`, also
    where the family's config stores it under its own name (GPT-2's `n_layer`, `n_embd`)."""
    return text.get(key, text.get(_KEY_ALIASES.get(key, key)))


def read_heads_folder(path: str | os.PathLike) -> HeadsFolder:
    """Read and check a local heads folder (config.json + exit_heads.safetensors)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise HeadsFolderError(f"heads={str(path)!r} is not a folder (expected an hf-earlyexit heads folder with "
                               f"{CONFIG_FILE} and {HEADS_FILE})")
    config = _read_config(folder)
    version = config.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise HeadsFolderError(f"{folder / CONFIG_FILE}: format_version={version!r}; this plugin reads formats "
                               f"1..{FORMAT_VERSION} (upgrade hf-earlyexit-vllm)")
    exit_layers = config.get("exit_layers")
    text = config.get("text_config") or {}
    num_layers = text_value(text, "num_hidden_layers")
    if (not isinstance(exit_layers, list) or not exit_layers or not isinstance(num_layers, int)
            or any(not isinstance(k, int) or isinstance(k, bool) or not 0 < k < num_layers for k in exit_layers)
            or exit_layers != sorted(set(exit_layers))):
        raise HeadsFolderError(f"{folder / CONFIG_FILE}: exit_layers={exit_layers!r}: expected increasing layer "
                               f"counts in 1..{num_layers - 1 if isinstance(num_layers, int) else 'L-1'}")
    head_type = config.get("head_type")
    if head_type not in HEAD_TYPES:
        raise HeadsFolderError(f"{folder / CONFIG_FILE}: head_type={head_type!r} is not one of {', '.join(HEAD_TYPES)}")
    metric = config.get("metric")
    if metric not in METRICS:
        raise HeadsFolderError(f"{folder / CONFIG_FILE}: metric={metric!r}: this plugin evaluates "
                               f"{', '.join(METRICS)}")
    thresholds = config.get("thresholds") or {}
    for key, values in thresholds.items():
        try:
            ok = 0.0 <= float(key) <= 1.0
        except ValueError:
            ok = False
        if not ok or not isinstance(values, list) or len(values) != len(exit_layers) or any(
                v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v))
                for v in values):
            raise HeadsFolderError(f"{folder / CONFIG_FILE}: thresholds[{key!r}]={values!r}: expected "
                                   f"{len(exit_layers)} numbers (or null) per ε in [0, 1]")
    bits = config.get("block_delta_bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 3 <= bits <= 8):
        raise HeadsFolderError(f"{folder / CONFIG_FILE}: block_delta_bits={bits!r}: expected 3..8 or null")
    init = config.get("context_init", "next")
    if init not in ("next", "last"):
        raise HeadsFolderError(f"{folder / CONFIG_FILE}: context_init={init!r} is not one of next, last")
    source = {j: (k if init == "next" else num_layers - 1) for j, k in enumerate(exit_layers)}
    tensors = _read_tensors(folder, len(exit_layers))
    heads = HeadsFolder(folder, config, list(exit_layers), head_type, metric, thresholds, tensors,
                        source if head_type == "context" else {}, bits)
    _check_tensors(heads, text)
    return heads


def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise HeadsFolderError(f"{folder}: no {CONFIG_FILE} (expected an hf-earlyexit heads folder)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HeadsFolderError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("model_type") != "earlyexit":
        raise HeadsFolderError(f"{file}: model_type={config.get('model_type') if isinstance(config, dict) else None!r}"
                               f", expected 'earlyexit'")
    return config


def _read_tensors(folder: Path, num_exits: int) -> dict[str, Tensor]:
    file = folder / HEADS_FILE
    if file.is_symlink() or not file.is_file() or file.resolve().parent != folder.resolve():
        raise HeadsFolderError(f"{folder}: {HEADS_FILE} must be a regular file inside the folder")
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise HeadsFolderError(f"{file}: not a readable safetensors file ({error})") from None
    tensors = {}
    for name, tensor in raw.items():
        key = name.removeprefix("exit_heads.")
        head = key.split(".", 1)[0]
        if not head.isdigit() or not 0 <= int(head) < num_exits:
            raise HeadsFolderError(f"{file}: tensor {name!r} belongs to no exit "
                                   f"(expected '<0..{num_exits - 1}>.<name>')")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HeadsFolderError(f"{file}: tensor {name!r} holds non-finite values")
        tensors[key] = tensor
    return tensors


def _check_tensors(heads: HeadsFolder, text: dict) -> None:
    hidden, vocab = text_value(text, "hidden_size"), text_value(text, "vocab_size")
    file = heads.path / HEADS_FILE
    for j in range(heads.num_exits):
        norm = heads.tensors.get(f"{j}.norm.weight")
        if norm is None or tuple(norm.shape) != (hidden,):
            raise HeadsFolderError(f"{file}: {j}.norm.weight is {None if norm is None else tuple(norm.shape)}, "
                                   f"expected ({hidden},)")
        ids = heads.tensors.get(f"{j}.token_ids")
        if ids is not None and (ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() == 0
                                or int(ids.min()) < 0 or int(ids.max()) >= vocab
                                or ids.unique().numel() != ids.numel()):
            raise HeadsFolderError(f"{file}: {j}.token_ids must be distinct int64 token ids in 0..{vocab - 1}")
        if heads.head_type == "paper":
            weight = heads.tensors.get(f"{j}.linear.weight")
            rows = vocab if ids is None else ids.numel()
            if weight is None or tuple(weight.shape) != (rows, hidden):
                shape = None if weight is None else tuple(weight.shape)
                raise HeadsFolderError(f"{file}: {j}.linear.weight is {shape}, expected ({rows}, {hidden})")
        elif not any(name.startswith(f"{j}.adapter.") for name in heads.tensors):
            raise HeadsFolderError(f"{file}: exit {j} has no adapter weights ({j}.adapter.*)")
        if heads.head_type == "context" and not heads.head_tensors(j, "block."):
            raise HeadsFolderError(f"{file}: context exit {j} has no block weights ({j}.block.*)")
        if ids is not None and (f"{j}.other.weight" not in heads.tensors or f"{j}.other.bias" not in heads.tensors):
            raise HeadsFolderError(f"{file}: draft exit {j} has no OTHER logit ({j}.other.weight / .bias)")


def confidence(metric: str, logits: Tensor) -> Tensor:
    """`(n, classes)` head logits -> `(n,)` confidence, higher = more confident (the metrics hf-earlyexit
    calibrates: top-1 minus top-2 probability, top-1 probability, negated entropy)."""
    if metric == "entropy":
        logp = F.log_softmax(logits.float(), dim=-1)
        return (logp.exp() * logp).sum(dim=-1)
    probs = F.softmax(logits.float(), dim=-1)
    if metric == "max_prob":
        return probs.amax(dim=-1)
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]
