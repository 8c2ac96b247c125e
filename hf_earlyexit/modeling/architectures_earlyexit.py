"""Where each supported decoder-only family keeps its parts (portable: stdlib + torch only).

Architecture differences are data: one `ArchSpec` per `model_type`. The layer-by-layer engine reads this table
and never branches on the family name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute names of one model family's parts, relative to the `*ForCausalLM` module.

    Attributes:
        backbone: attribute holding the decoder stack (`model`, `gpt_neox`, `transformer`).
        embed: token embedding inside the backbone.
        layers: `ModuleList` of decoder layers inside the backbone.
        norm: final norm inside the backbone.
        rotary: rotary embedding inside the backbone, or `None` for learned absolute positions.
        abs_positions: learned position embedding added to the token embedding (GPT-2's `wpe`), or `None`.
        dropout: embedding dropout applied after the embedding (inert in eval), or `None`.
        cache_kwarg: name under which a decoder layer takes the KV cache.
        rotary_per_layer_type: the rotary module takes the layer type (Gemma 3's local/global RoPE).
        attn: attention submodule inside a decoder layer.
        input_norm: pre-attention norm inside a decoder layer.
    """

    backbone: str
    embed: str
    layers: str
    norm: str
    rotary: str | None = "rotary_emb"
    abs_positions: str | None = None
    dropout: str | None = None
    cache_kwarg: str = "past_key_values"
    rotary_per_layer_type: bool = False
    attn: str = "self_attn"
    input_norm: str = "input_layernorm"


_LLAMA = ArchSpec(backbone="model", embed="embed_tokens", layers="layers", norm="norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": ArchSpec(
        backbone="model", embed="embed_tokens", layers="layers", norm="norm", rotary_per_layer_type=True
    ),
    "gpt_neox": ArchSpec(
        backbone="gpt_neox",
        embed="embed_in",
        layers="layers",
        norm="final_layer_norm",
        dropout="emb_dropout",
        cache_kwarg="layer_past",
        attn="attention",
    ),
    "gpt2": ArchSpec(
        backbone="transformer",
        embed="wte",
        layers="h",
        norm="ln_f",
        rotary=None,
        abs_positions="wpe",
        dropout="drop",
        attn="attn",
        input_norm="ln_1",
    ),
    "phi": ArchSpec(
        backbone="model", embed="embed_tokens", layers="layers", norm="final_layernorm", dropout="embed_dropout"
    ),
}


class UnsupportedArchitectureError(ValueError):
    """Raised for a `model_type` that the engine has no table entry for."""


def arch_spec(model_type: str) -> ArchSpec:
    """Return the table entry for `model_type`, or raise an error that lists the supported families."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is not supported by hf-earlyexit; supported model types: {supported}"
        ) from None


@dataclass(frozen=True)
class ModelParts:
    """The live submodules of one causal LM, resolved through its `ArchSpec`."""

    spec: ArchSpec
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear
    rotary: nn.Module | None
    abs_positions: nn.Embedding | None
    dropout: nn.Module | None


def model_parts(model: nn.Module) -> ModelParts:
    """Resolve the parts of a HF `*ForCausalLM` model (its `config.model_type` picks the table entry)."""
    spec = arch_spec(model.config.model_type)
    backbone = getattr(model, spec.backbone)

    def optional(name: str | None) -> nn.Module | None:
        return getattr(backbone, name) if name else None

    return ModelParts(
        spec=spec,
        embed=getattr(backbone, spec.embed),
        layers=getattr(backbone, spec.layers),
        norm=getattr(backbone, spec.norm),
        lm_head=model.lm_head,
        rotary=optional(spec.rotary),
        abs_positions=optional(spec.abs_positions),
        dropout=optional(spec.dropout),
    )
