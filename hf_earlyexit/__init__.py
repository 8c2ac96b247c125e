"""hf-earlyexit: self-supervised early-exit heads for Hugging Face causal LMs."""

from __future__ import annotations

from importlib import metadata

from .loading import SHIPPED, is_heads_folder, load, shipped_dir
from .modeling.architectures_earlyexit import ARCHITECTURES, UnsupportedArchitectureError, arch_spec
from .modeling.base_earlyexit import EMBEDDED, cache_root, load_base_model, load_tokenizer
from .modeling.configuration_earlyexit import EarlyExitConfig
from .modeling.costs_earlyexit import Cost, CostModel
from .modeling.engine_earlyexit import EngineState, LayerEngine
from .modeling.heads_earlyexit import PaperHead, SharedHead
from .modeling.modeling_earlyexit import EarlyExitForCausalLM, EarlyExitOutput, HeadsMismatchError
from .modeling.options_earlyexit import DecodingOptions
from .modeling.stats_earlyexit import EarlyExitGenerateOutput, ExitStats

try:
    __version__ = metadata.version("hf-earlyexit")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "ARCHITECTURES", "EMBEDDED", "SHIPPED", "Cost", "CostModel", "DecodingOptions", "EarlyExitConfig",
    "EarlyExitForCausalLM", "EarlyExitGenerateOutput", "EarlyExitOutput", "EngineState", "ExitStats",
    "HeadsMismatchError", "LayerEngine", "PaperHead", "SharedHead", "UnsupportedArchitectureError", "arch_spec",
    "cache_root", "is_heads_folder", "load", "load_base_model", "load_tokenizer", "shipped_dir",
]
