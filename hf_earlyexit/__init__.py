"""hf-earlyexit: self-supervised early-exit heads for Hugging Face causal LMs."""

from __future__ import annotations

from importlib import metadata

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .architectures_earlyexit import ARCHITECTURES, UnsupportedArchitectureError, arch_spec
from .base_earlyexit import EMBEDDED, cache_root, load_base_model, load_tokenizer
from .configuration_earlyexit import EarlyExitConfig
from .engine_earlyexit import EngineState, LayerEngine
from .heads_earlyexit import Cost, PaperHead, SharedHead
from .modeling_earlyexit import EarlyExitForCausalLM, EarlyExitOutput, HeadsMismatchError
from .shipped import SHIPPED, resolve, shipped_dir

try:
    __version__ = metadata.version("hf-earlyexit")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "ARCHITECTURES", "EMBEDDED", "Cost", "EarlyExitConfig", "EarlyExitForCausalLM", "EarlyExitOutput",
    "EngineState", "HeadsMismatchError", "LayerEngine", "PaperHead", "SHIPPED", "SharedHead",
    "UnsupportedArchitectureError", "arch_spec", "cache_root", "is_heads_folder", "load", "load_base_model",
    "load_tokenizer", "shipped_dir",
]


def is_heads_folder(name_or_path: str, **hub) -> bool:
    """Whether `name_or_path` (folder or Hub repo) holds saved exit heads rather than a base model."""
    if name_or_path == EMBEDDED:
        return False
    name_or_path = resolve(name_or_path)
    config, _ = PretrainedConfig.get_config_dict(name_or_path, **hub)
    return config.get("model_type") == EarlyExitConfig.model_type


def load(
    name_or_path: str = EMBEDDED, dtype: torch.dtype | str | None = None, **kwargs
) -> tuple[EarlyExitForCausalLM, PreTrainedTokenizerBase]:
    """Load a model with exit heads and its tokenizer in one line.

    Args:
        name_or_path: a saved heads folder / Hub repo, `"shipped"` (the embedded model with the trained heads that
            ship in the package), or a base model (Hub id, local path, `"embedded"`), to which fresh heads are
            attached (`kwargs` go to `EarlyExitForCausalLM.from_base`).
        dtype: dtype of the base model (e.g. `torch.bfloat16`); default: as stored.

    Returns:
        `(model, tokenizer)`.
    """
    name_or_path = resolve(name_or_path)
    if is_heads_folder(name_or_path):
        model = EarlyExitForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        if _has_tokenizer(name_or_path, **hub):
            # the base config tells AutoTokenizer what it needs; reading our config.json would ask for remote code
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, config=model.config.text_config, **hub)
        else:  # a heads folder saved without a tokenizer (the shipped heads): the base model's
            tokenizer = load_tokenizer(model.config.base_model_name_or_path, model.config.base_revision)
        model.tokenizer = tokenizer
        return model, tokenizer
    model = EarlyExitForCausalLM.from_base(name_or_path, dtype=dtype, **kwargs)
    return model, model.tokenizer


def _has_tokenizer(name_or_path: str, **hub) -> bool:
    """Whether a heads folder / repo holds tokenizer files (without them, AutoTokenizer builds an empty tokenizer
    from the config instead of failing)."""
    return any(
        cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub) is not None
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
