"""Early exit inside vLLM's model forward: the heads of an hf-earlyexit folder evaluated at decode steps.

Rule (seed 003's iteration-level rule): at a decode-only step the whole batch leaves at the first checked exit where
every sequence's head is confident at ε (its confidence reaches the exit's threshold and its top class is a real
token); the step's logits then come from that exit's head, mapped from its draft vocabulary to the full one (tokens
outside it get -inf). The layers the step skipped, and the context blocks of deeper exits, get their keys and values
written from the exit's hidden state (each skipped layer's input norm, key/value projections, key norm and rotary,
then vLLM's own cache-update op), so later tokens attend over every position at every layer. Prefill steps and steps
that mix prefill with decode run every layer. A context head's block is a decoder layer of the model's own vLLM class
with its own KV cache (vLLM allocates it like any other attention layer), fed every position as it passes the exit.

With ε = 1 (or no exit checked) the model is vLLM's own class, unchanged.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .fingerprint import fingerprint_mismatch, part_entry, tensor_terms
from .heads import HeadsFolderError, confidence, read_heads_folder, text_value

logger = logging.getLogger("vllm.hf_earlyexit")  # under vLLM's logger: its handlers print INFO

CONFIG_KEY = "earlyexit"  # hf_overrides={"earlyexit": {...}} carries the plugin's settings
SETTINGS = ("heads", "eps", "exits", "log_every", "max_batch", "batch_exit", "draft_exit", "ignore_base_mismatch")
BATCH_EXITS = ("step", "row")  # the whole decode batch leaves together / each sequence leaves on its own
# decode steps of more sequences run every layer, no exit checked; None: no limit. Measured (bf16, shipped heads,
# exits 12 and 15, README "Serving with vLLM"): checking pays at 1 sequence (1.30x vLLM) and 2 (1.05x), breaks even
# at 4 and loses beyond (0.85x at 8, 0.71x at 32: a step seldom has every sequence confident at once and then pays
# the heads on top of the whole model), while unchecked steps cost what vLLM's own do (1.02x / 1.00x at 8 / 32)
MAX_BATCH: int | None = 2
# the default batch rule. Measured (README "Serving with vLLM", exits 12 and 15, every step checked): the row rule beats
# the step rule in bf16 at batch 8 / 32 (+14% / +21%) but not in fp32 (0.88x / 0.91x), and neither beats leaving
# steps of more than `max_batch` sequences unchecked
BATCH_EXIT = "step"


def settings_of(hf_config) -> dict:
    """The plugin's settings from the model config (`hf_overrides={"earlyexit": {"heads": ..., "eps": ...}}`), or
    else from the environment (`HF_EARLYEXIT_VLLM_HEADS`, `_EPS`, `_EXITS`, `_LOG_EVERY`, `_MAX_BATCH`,
    `_BATCH_EXIT`)."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None and os.environ.get("HF_EARLYEXIT_VLLM_HEADS"):
        raw = {"heads": os.environ["HF_EARLYEXIT_VLLM_HEADS"], "log_every": 100}
        for key, name, parse in (("eps", "EPS", float), ("exits", "EXITS", lambda v: [int(x) for x in v.split(",")]),
                                 ("log_every", "LOG_EVERY", int), ("max_batch", "MAX_BATCH", int),
                                 ("batch_exit", "BATCH_EXIT", str)):
            value = os.environ.get(f"HF_EARLYEXIT_VLLM_{name}")
            if value:
                try:
                    raw[key] = parse(value)
                except ValueError:
                    raise HeadsFolderError(f"HF_EARLYEXIT_VLLM_{name}={value!r} is not valid (expected "
                                           f"{'comma-separated layer numbers' if key == 'exits' else 'a number'})"
                                           ) from None
    if not isinstance(raw, dict) or "heads" not in raw:
        raise HeadsFolderError(f"{CONFIG_KEY}={raw!r}: expected hf_overrides={{'{CONFIG_KEY}': {{'heads': "
                               f"'<heads folder>', 'eps': 0.9}}, ...}}")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise HeadsFolderError(f"{CONFIG_KEY} settings {unknown} are unknown (expected some of {', '.join(SETTINGS)})")
    settings = {"eps": 0.9, "exits": None, "log_every": 0, "max_batch": MAX_BATCH, "batch_exit": BATCH_EXIT,
                "draft_exit": None, "ignore_base_mismatch": False,
                **raw}
    log_every = settings["log_every"]
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise HeadsFolderError(f"log_every={log_every!r}: expected a whole number of decode steps >= 0 (0: never)")
    if settings["batch_exit"] not in BATCH_EXITS:
        raise HeadsFolderError(f"batch_exit={settings['batch_exit']!r}: expected one of {', '.join(BATCH_EXITS)}")
    max_batch = settings["max_batch"]
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise HeadsFolderError(f"max_batch={max_batch!r}: expected a whole number of sequences >= 1, or None (no "
                               f"limit)")
    return settings


class ResidualLayers:
    """Where a family's vLLM class keeps its parts and how it calls them, for the families whose decoder layers take
    `(positions, hidden, residual)` and return `(hidden, residual)` (the raw layer output is their sum), under
    `model.layers` with the final norm `model.norm`, and whose attention `self_attn` has a fused `qkv_proj`, an
    optional `k_norm` and `rotary_emb` (Gemma 3, Llama, Qwen 2/3)."""

    container = "layers"  # checkpoint names hold `<container>.<layer index>.`

    @staticmethod
    def layers(model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        return model.model.norm

    @staticmethod
    def embed(model: nn.Module, input_ids: Tensor | None, positions: Tensor, inputs_embeds: Tensor | None) -> Tensor:
        return inputs_embeds if inputs_embeds is not None else model.model.embed_input_ids(input_ids)

    @staticmethod
    def context(model: nn.Module, positions: Tensor, h: Tensor):
        """What this step's layer calls take besides the hidden state (here the positions; `TransformersLayers`
        adds the rotary tables), computed once per step and handed to `step`, `run_block` and `write_kv`."""
        return positions

    @staticmethod
    def rows(context, index: Tensor):
        """`context` for the tokens `index` picks (a bool mask or positions along the batch)."""
        return context[index]

    @staticmethod
    def new_block(model: nn.Module, vllm_config, source: int, prefix: str) -> nn.Module:
        """A context block: a fresh decoder layer of the family's vLLM class (weights loaded by `load_block`)."""
        return _new_layer(type(model.ee_layout.layers(model)[0]), vllm_config, prefix)

    @staticmethod
    def load_block(model: nn.Module, block: nn.Module, source: int, weights: dict[str, Tensor]) -> None:
        _load_block(model, block, weights)

    @staticmethod
    def step(layer: nn.Module, positions: Tensor, h: Tensor, residual: Tensor | None, **kwargs
             ) -> tuple[Tensor, Tensor | None]:
        return layer(positions, h, residual, **kwargs)

    @staticmethod
    def finish(model: nn.Module, h: Tensor, residual: Tensor | None) -> Tensor:
        return model.model.norm(h, residual)[0]

    @staticmethod
    def run_block(block: nn.Module, positions: Tensor, raw: Tensor) -> Tensor:
        out, residual = block(positions, raw, None)
        return out + residual

    @staticmethod
    def kv_source(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
        """What `write_kv` needs of a layer, taken once at load: here the key and value rows of its fused qkv
        projection (weight, bias), copied (taken before vLLM repacks the fused weights for its kernels)."""
        attn = layer.self_attn
        rows = slice(attn.q_size, attn.q_size + 2 * attn.kv_size)
        bias = attn.qkv_proj.bias
        return attn.qkv_proj.weight[rows].detach().clone(), None if bias is None else bias[rows].detach().clone()

    @staticmethod
    def keys_values(layer: nn.Module, positions: Tensor, raw: Tensor, kv_rows: tuple[Tensor, Tensor | None]
                    ) -> tuple[Tensor, Tensor, nn.Module]:
        """Decoder `layer`'s keys and values for these tokens from its input `raw` (input norm, key/value projection
        through `kv_rows`, key norm, rotary), and the vLLM attention layer whose cache they go to."""
        attn = layer.self_attn
        normed = layer.input_layernorm(raw)
        k, v = F.linear(normed, *kv_rows).split([attn.kv_size, attn.kv_size], dim=-1)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k.unflatten(-1, (attn.num_kv_heads, attn.head_dim))).flatten(-2, -1)
        k = k.contiguous()
        _, k = attn.rotary_emb(positions, k.clone(), k)  # the rotary op also turns a query: a throwaway copy
        return k, v, attn.attn

    @classmethod
    def write_kv(cls, layer: nn.Module, positions, raw: Tensor, kv_rows: tuple[Tensor, Tensor | None]) -> None:
        """Write `layer`'s keys and values for these tokens from its input `raw`, nothing else (no queries, no
        attention, no MLP), through vLLM's own cache-update op."""
        from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

        k, v, attention = cls.keys_values(layer, positions, raw, kv_rows)
        heads, size = attention.num_kv_heads, attention.head_size
        unified_kv_cache_update(k.reshape(-1, heads, size), v.reshape(-1, heads, size), attention.layer_name)

    @staticmethod
    def vllm_block_weights(weights: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
        """HF-named block weights as the family's vLLM loader takes them (names go through its mapper)."""
        return weights


class PlainLayers(ResidualLayers):
    """GPT-2: decoder blocks `transformer.h` called on the hidden state alone (no positions, no residual stream),
    learned absolute positions added to the token embedding, the final norm `transformer.ln_f`, attention `attn`
    with a fused `c_attn` (queries, keys and values, each the hidden size) and no rotary; the checkpoint's Conv1D
    weights are stored transposed."""

    container = "h"

    @staticmethod
    def layers(model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        return model.transformer.ln_f

    @staticmethod
    def embed(model: nn.Module, input_ids: Tensor | None, positions: Tensor, inputs_embeds: Tensor | None) -> Tensor:
        body = model.transformer
        tokens = inputs_embeds if inputs_embeds is not None else body.embed_input_ids(input_ids)
        return tokens + body.wpe(positions)

    @staticmethod
    def step(layer: nn.Module, positions: Tensor, h: Tensor, residual: Tensor | None, **kwargs
             ) -> tuple[Tensor, Tensor | None]:
        return layer(h), None

    @staticmethod
    def finish(model: nn.Module, h: Tensor, residual: Tensor | None) -> Tensor:
        return model.transformer.ln_f(h)

    @staticmethod
    def run_block(block: nn.Module, positions: Tensor, raw: Tensor) -> Tensor:
        return block(raw)

    @staticmethod
    def kv_source(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
        attn = layer.attn
        rows = slice(attn.hidden_size, 3 * attn.hidden_size)
        return attn.c_attn.weight[rows].detach().clone(), attn.c_attn.bias[rows].detach().clone()

    @staticmethod
    def keys_values(layer: nn.Module, positions: Tensor, raw: Tensor, kv_rows: tuple[Tensor, Tensor | None]
                    ) -> tuple[Tensor, Tensor, nn.Module]:
        k, v = F.linear(layer.ln_1(raw), *kv_rows).chunk(2, dim=-1)
        return k.contiguous(), v.contiguous(), layer.attn.attn

    @staticmethod
    def vllm_block_weights(weights: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
        for name, tensor in weights:  # HF's Conv1D keeps (in, out); vLLM's linear layers (out, in)
            is_conv = name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc"))
            yield name, tensor.t() if is_conv else tensor


class TransformersLayers(ResidualLayers):
    """Families vLLM serves through its Transformers backend (`TransformersForCausalLM`: transformers' own modules,
    linear layers swapped for vLLM's, each attention module given a vLLM attention instance as `attn`): GPT-NeoX and
    Phi (1/2) here. The decoder `model.model` embeds (then its embedding dropout), builds the rotary tables once
    (`rotary_emb`), runs `layers` on the hidden state alone (batch dimension 1, the residual inside each layer) and
    ends in its final norm. A skipped layer's keys and values come from its own attention module run on its input
    norm, with the vLLM attention swapped for a writer that stores them and ends the module's forward there
    (`_KVWriter`): the family's own key arithmetic (fused or per-head interleaved qkv, partial rotary, key norms)
    without a copy of it here, at the price of the layer's query projection. A context block is a copy of the
    decoder layer it starts from, with an attention instance (and so a KV cache) of its own."""

    NORMS = ("norm", "final_layer_norm", "final_layernorm", "ln_f")
    DROPOUTS = ("emb_dropout", "embed_dropout")

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        body = model.model
        for name in TransformersLayers.NORMS:
            if hasattr(body, name):
                return getattr(body, name)
        raise HeadsFolderError(f"{type(body).__name__} has no final norm under any of {TransformersLayers.NORMS}")

    @staticmethod
    def embed(model: nn.Module, input_ids: Tensor | None, positions: Tensor, inputs_embeds: Tensor | None) -> Tensor:
        body = model.model
        h = inputs_embeds if inputs_embeds is not None else body.get_input_embeddings()(input_ids)
        for name in TransformersLayers.DROPOUTS:
            if hasattr(body, name):
                h = getattr(body, name)(h)
        return h

    @staticmethod
    def context(model: nn.Module, positions: Tensor, h: Tensor):
        ids = positions[None]
        return ids, model.model.rotary_emb(h[None], position_ids=ids)

    @staticmethod
    def rows(context, index: Tensor):
        ids, (cos, sin) = context
        return ids[:, index], (cos[:, index], sin[:, index])

    @staticmethod
    def step(layer: nn.Module, context, h: Tensor, residual: Tensor | None, **kwargs) -> tuple[Tensor, None]:
        ids, tables = context
        out = layer(h[None], attention_mask=None, position_ids=ids, position_embeddings=tables, **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[0], None

    @staticmethod
    def finish(model: nn.Module, h: Tensor, residual: Tensor | None) -> Tensor:
        return TransformersLayers.final_norm(model)(h)

    @staticmethod
    def run_block(block: nn.Module, context, raw: Tensor) -> Tensor:
        return TransformersLayers.step(block, context, raw, None)[0]

    @staticmethod
    def kv_source(layer: nn.Module) -> nn.Module:
        """The module of `layer` that computes its attention (the one holding the vLLM attention as `attn`)."""
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

        found = [m for m in layer.modules() if isinstance(m._modules.get("attn"), AttentionLayerBase)]
        if len(found) != 1 or not hasattr(layer, "input_layernorm"):
            raise HeadsFolderError(f"{type(layer).__name__}: expected one attention module and an input_layernorm "
                                   f"(found {len(found)} attention modules)")
        return found[0]

    @staticmethod
    def write_kv(layer: nn.Module, context, raw: Tensor, attention: nn.Module) -> None:
        ids, tables = context
        real = attention._modules["attn"]
        attention._modules["attn"] = _KVWriter(real)
        try:
            attention(hidden_states=layer.input_layernorm(raw)[None], attention_mask=None, position_ids=ids,
                      position_embeddings=tables)
        except _Written:  # the module stops where its keys and values are stored: no output projection
            pass
        else:
            raise RuntimeError(f"{type(attention).__name__} did not pass its keys and values to its vLLM attention")
        finally:
            attention._modules["attn"] = real

    @staticmethod
    def new_block(model: nn.Module, vllm_config, source: int, prefix: str) -> nn.Module:
        from vllm.model_executor.layers.attention import Attention

        layer = TransformersLayers.layers(model)[source]
        attention = TransformersLayers.kv_source(layer)
        real = attention._modules.pop("attn")  # not copied: the block gets an attention (and a KV cache) of its own
        try:
            block = copy.deepcopy(layer, {id(p): _copy_parameter(p) for p in layer.parameters()})
        finally:
            attention._modules["attn"] = real
        path = next(name for name, m in layer.named_modules() if m is attention)
        block.get_submodule(path).attn = Attention(
            num_heads=real.num_heads, head_size=real.head_size, scale=real.impl.scale, num_kv_heads=real.num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            logits_soft_cap=getattr(model.text_config, "attn_logit_softcapping", None),
            per_layer_sliding_window=real.sliding_window, prefix=f"{prefix}.{path}.attn")
        return block

    @staticmethod
    def load_block(model: nn.Module, block: nn.Module, source: int, weights: dict[str, Tensor]) -> None:
        """HF-named block weights loaded as the source layer's would be (the backend's weight mapper fuses q/k/v
        projections by the layer's full name), then into the block."""
        from vllm.model_executor.models.utils import AutoWeightsLoader

        where = f"model.{model._layer_names[source]}"  # the source layer's full name, e.g. model.layers.3
        holder = nn.Module()
        parent = holder
        for part in where.split(".")[:-1]:
            parent.add_module(part, nn.Module())
            parent = parent.get_submodule(part)
        parent.add_module(where.split(".")[-1], block)
        dtype = TransformersLayers.final_norm(model).weight.dtype
        loaded = AutoWeightsLoader(holder).load_weights(
            ((f"{where}.{name}", tensor.to(dtype)) for name, tensor in weights.items()), mapper=model.hf_to_vllm_mapper)
        missing = {f"{where}.{n}" for n, _ in block.named_parameters()} - set(loaded)
        if missing:
            raise HeadsFolderError(f"a context block's weights {sorted(missing)} were not in the heads folder or base")


def _copy_parameter(param: nn.Parameter) -> nn.Parameter:
    """A copy of a parameter of the same class with the same attributes (vLLM's parameter classes, which carry their
    weight loaders, cannot be deep-copied)."""
    new = type(param).__new__(type(param), param.data.clone())
    new.__dict__.update(param.__dict__)
    new.requires_grad_(param.requires_grad)
    return new


class _Written(Exception):
    """Raised by `_KVWriter` once the keys and values are stored, to end the attention module's forward there."""


class _KVWriter(nn.Module):
    """Stands in for a layer's vLLM attention while its keys and values are written: stores them in that
    attention's cache, then ends the attention module's forward (`_Written`), whose output nothing reads."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = [attention]  # a list: not registered as a child

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

        attention = self.attention[0]
        heads, size = attention.num_kv_heads, attention.head_size
        unified_kv_cache_update(key.reshape(-1, heads, size), value.reshape(-1, heads, size), attention.layer_name)
        raise _Written


class EarlyExitMixin:
    """Early exit for a vLLM `*ForCausalLM`; `ee_layout` says where the family keeps its parts and how its layers
    are called (`ResidualLayers`: Gemma 3, Llama, Qwen 2/3; `PlainLayers`: GPT-2; `TransformersLayers`: GPT-NeoX
    and Phi through vLLM's Transformers backend). Subclasses put it before the
    vLLM class."""

    ee_layout: type[ResidualLayers] = ResidualLayers

    def _ee_init(self, vllm_config, prefix: str) -> None:
        config = vllm_config.model_config.hf_config
        settings = settings_of(config)
        heads = read_heads_folder(settings["heads"])
        text = heads.config.get("text_config") or {}
        for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
            trained = text_value(text, key)
            if trained != getattr(config, key, None):
                raise HeadsFolderError(f"{heads.path}: heads were trained for {key}={trained!r}, this model "
                                       f"has {getattr(config, key, None)!r}")
        draft = settings["draft_exit"]
        if draft is not None and draft not in heads.exit_layers:
            raise HeadsFolderError(f"draft_exit={draft!r}: expected one of these heads' exit layers "
                                   f"{heads.exit_layers}")
        if draft is not None and settings["exits"] is not None:
            raise HeadsFolderError(f"exits={settings['exits']!r} with draft_exit={draft!r}: a drafter leaves at its "
                                   f"one exit; give one of the two")
        thresholds = heads.thresholds_at(settings["eps"]) if draft is None else [None] * len(heads.exit_layers)
        exits = settings["exits"]
        if draft is not None:  # a drafter: every token leaves at that exit, whatever its confidence
            checked = [k == draft for k in heads.exit_layers]
        elif exits is None:
            checked = [tau is not None for tau in thresholds]
        else:
            if not isinstance(exits, list) or any(k not in heads.exit_layers for k in exits):
                raise HeadsFolderError(f"exits={exits!r}: expected a list of these heads' exit layers "
                                       f"{heads.exit_layers}")
            checked = [k in exits and tau is not None for k, tau in zip(heads.exit_layers, thresholds, strict=True)]
        self.ee_heads = heads
        self.ee_draft = None if draft is None else heads.exit_layers.index(draft)
        self.ee_eps = float(settings["eps"])
        self.ee_thresholds = thresholds
        self.ee_checked = checked
        self.ee_starts = {k: j for j, k in enumerate(heads.exit_layers) if checked[j]}  # layer -> checked exit there
        self.ee_log_every = settings["log_every"]
        self.ee_max_batch = settings["max_batch"]
        self.ee_batch_exit = settings["batch_exit"]
        self.ee_dtype = vllm_config.model_config.dtype
        self.ee_ignore_base_mismatch = bool(settings["ignore_base_mismatch"])
        self.ee_softcap = getattr(config, "final_logit_softcapping", None)
        self.ee_vocab = config.vocab_size
        self.ee_stats = {"decode_steps": 0, "early_steps": 0, "unchecked_steps": 0, "decode_tokens": 0,
                         "prefill_steps": 0, "exit_tokens": {k: 0 for k in heads.exit_layers}, "full_tokens": 0}
        self._ee_out: tuple[Tensor, Tensor] | None = None  # a decode step's exit logits and exits, for compute_logits
        # a context block per checked exit: a decoder layer of the model's own class with its own KV cache; its
        # name holds one integer, the layer it copies (vLLM reads the attention type from it)
        self.ee_blocks = nn.ModuleDict()
        if heads.head_type == "context":
            for j, on in enumerate(checked):
                if on:
                    source = heads.block_source[j]
                    self.ee_blocks[str(j)] = self.ee_layout.new_block(self, vllm_config, source,
                                                                      f"earlyexit_block_e{j}.{source}")
        final_norm = self.ee_layout.final_norm(self)
        self.ee_norms = nn.ModuleDict({str(j): copy.deepcopy(final_norm) for j, on in enumerate(checked) if on})
        logger.info("hf-earlyexit: heads %s at eps=%g, checking exits %s", heads.path, self.ee_eps,
                    [k for k, on in zip(heads.exit_layers, checked, strict=True) if on])

    @property
    def ee_active(self) -> bool:
        return any(self.ee_checked)

    # -- weights -------------------------------------------------------------------------------------------------

    def _ee_load_weights(self, weights: Iterable[tuple[str, Tensor]], load) -> set[str]:
        """Stream the base weights through vLLM's loader (`load`), keeping the layers the blocks copy and the base's
        fingerprint on the way; then build the heads' weights."""
        if not self.ee_active:
            return load(weights) | {n for n, _ in self.named_parameters() if n.startswith("ee_")}
        sources = set(self.ee_heads.block_source.values())
        kept: dict[int, dict[str, Tensor]] = {i: {} for i in sources}
        fingerprint = _FingerprintStream(self.config)
        container = self.ee_layout.container

        def stream() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in weights:
                fingerprint.add(name, tensor)
                layer = _layer_of(name, container)
                if layer in kept:
                    kept[layer][name.split(f"{container}.{layer}.", 1)[1]] = tensor.detach().clone()
                yield name, tensor

        loaded = load(stream())
        self._ee_check_base(fingerprint.result())
        self._ee_build(kept)
        return loaded | {n for n, _ in self.named_parameters() if n.startswith("ee_")}

    def _ee_check_base(self, current: list[list[float]] | None) -> None:
        saved = self.ee_heads.config.get("base_fingerprint")
        if current is None or not saved or not isinstance(saved[0], list):
            logger.warning("hf-earlyexit: the base's weight fingerprint was not checked (%s)",
                           "no HF layout for this model" if current is None else "the folder records none")
            return
        bad = fingerprint_mismatch(saved, current)
        if bad is not None:
            message = (f"{self.ee_heads.path}: these heads were trained on other base weights (weight fingerprint part "
                       f"{bad} differs: {saved[bad][:2] if bad < len(saved) else None} vs "
                       f"{current[bad][:2] if bad < len(current) else None})")
            if not self.ee_ignore_base_mismatch:
                raise HeadsFolderError(message + "; pass ignore_base_mismatch=True to use them anyway")
            logger.warning("hf-earlyexit: %s", message)

    def _ee_build(self, kept: dict[int, dict[str, Tensor]]) -> None:
        heads = self.ee_heads
        layout = self.ee_layout
        dtype = layout.final_norm(self).weight.dtype
        device = layout.final_norm(self).weight.device
        lm_weight = self.lm_head.weight[: self.ee_vocab]
        self.ee_parts = {}
        for j, on in enumerate(self.ee_checked):
            if not on:
                continue
            def t(name: str, j: int = j) -> Tensor:
                return heads.tensors[f"{j}.{name}"].to(device=device, dtype=dtype)

            with torch.no_grad():
                self.ee_norms[str(j)].weight.copy_(t("norm.weight"))
                if getattr(self.ee_norms[str(j)], "bias", None) is not None:  # a LayerNorm (GPT-2)
                    if f"{j}.norm.bias" not in heads.tensors:
                        raise HeadsFolderError(f"{heads.path}: exit {j} has no norm.bias, which this family's final "
                                               f"norm (a LayerNorm) has")
                    self.ee_norms[str(j)].bias.copy_(t("norm.bias"))
            ids = heads.tensors.get(f"{j}.token_ids")
            part = {"ids": None if ids is None else ids.to(device)}
            if heads.head_type == "paper":
                part["rows"] = t("linear.weight")
                part["bias"] = t("linear.bias") if f"{j}.linear.bias" in heads.tensors else None
            else:
                part["rows"] = lm_weight if ids is None else lm_weight[part["ids"]].detach().clone()
                part["bias"] = None
                if f"{j}.adapter.weight" in heads.tensors:
                    part["adapter"] = (t("adapter.weight"),)
                else:
                    part["adapter"] = (t("adapter.0.weight"), t("adapter.1.weight"))
            if ids is not None:
                part["other"] = (t("other.weight"), t("other.bias"))
            self.ee_parts[j] = part
            if heads.head_type == "context":
                source = heads.block_source[j]
                block = heads.block_weights(j, kept[source])
                layout.load_block(self, self.ee_blocks[str(j)], source, block)
        # key/value rows of the layers an early step can skip (and of the blocks): filling their cache then needs
        # no query projection (taken now, before vLLM repacks the fused weights for its kernels)
        first = min(k for k, on in zip(heads.exit_layers, self.ee_checked, strict=True) if on)
        self.ee_kv_source = {id(layer): layout.kv_source(layer) for layer in layout.layers(self)[first:]}
        self.ee_kv_source.update({id(block): layout.kv_source(block) for block in self.ee_blocks.values()})

    # -- forward -------------------------------------------------------------------------------------------------

    def _ee_forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs):
        """The model's layers, trying the checked exits on the way at a decode-only step of at most `max_batch`
        sequences: a sequence leaves at the first exit where its head fires. Under `batch_exit="step"` it rides
        along with the others (its layers computed in full) until every sequence has left; the step stops there, or
        runs to the end when some sequence never fires. Under `"row"` it leaves the batch there: its skipped layers'
        keys and values are written from its exit state, and the deeper layers run for the others alone (attention
        over their own sequences only). Other steps run every layer and only write the context blocks' keys and
        values."""
        layout = self.ee_layout
        h = layout.embed(self, input_ids, positions, inputs_embeds)
        positions = layout.context(self, positions, h)  # what the layer calls take besides the hidden state
        residual = None
        if self.ee_draft is not None:
            return self._ee_draft_forward(h, positions, **kwargs)
        decode = _decode_only()
        check = decode and (self.ee_max_batch is None or h.shape[0] <= self.ee_max_batch)
        if decode and not check:
            self.ee_stats["unchecked_steps"] += 1
        self._ee_out = None
        starts = self.ee_starts
        n = h.shape[0]
        left = torch.full((n,), -1, dtype=torch.long, device=h.device)  # the exit each sequence left at
        chosen = None  # (n, vocab) logits of the sequences that left
        rows = _BatchRows(n, h.device, self.ee_dtype) if check and self.ee_batch_exit == "row" and n > 1 else None
        try:
            for i, layer in enumerate(layout.layers(self)):
                j = starts.get(i)
                if j is not None:
                    raw = h if residual is None else h + residual
                    if not check:  # nothing reads the block's output: its keys and values are all it needs
                        self._ee_feed_block(j, positions, raw)
                    elif rows is None:  # the whole batch leaves together
                        features = self._ee_block(j, positions, raw)
                        going = (left < 0).nonzero().squeeze(1)
                        logits = self._ee_head_logits(j, features[going])
                        fires = self._ee_fires(j, logits)
                        if bool(fires.any()):
                            fired = going[fires]
                            left[fired] = j
                            if chosen is None:
                                chosen = logits.new_full((n, self.ee_vocab), -math.inf, dtype=torch.float32)
                            chosen[fired] = self._ee_vocab_logits(j, logits[fires])
                        if bool((left >= 0).all()):
                            self._ee_fill_kv(i, j, positions, raw)
                            self._ee_count(left)
                            self._ee_out = (chosen, left)
                            return features
                    else:  # each sequence leaves on its own; `h` holds the rows still going
                        features = self._ee_block(j, positions, raw)
                        logits = self._ee_head_logits(j, features)
                        fires = self._ee_fires(j, logits)
                        if bool(fires.any()):
                            going = rows.active
                            fired = going[fires]
                            left[fired] = j
                            if chosen is None:
                                chosen = logits.new_full((n, self.ee_vocab), -math.inf, dtype=torch.float32)
                            chosen[fired] = self._ee_vocab_logits(j, logits[fires])
                            if bool(fires.all()):
                                self._ee_fill_kv(i, j, positions, raw)
                                self._ee_count(left)
                                self._ee_out = (chosen, left)
                                return rows.scatter(features)
                            rows.attend(fired)  # the leaving rows' skipped layers get their keys and values
                            self._ee_fill_kv(i, j, layout.rows(positions, fires), raw[fires])
                            keep = ~fires
                            rows.attend(going[keep])  # the others go on alone
                            h = h[keep]
                            residual = None if residual is None else residual[keep]
                            positions = layout.rows(positions, keep)
                h, residual = layout.step(layer, positions, h, residual, **kwargs)
            if decode:
                self._ee_count(left)
                if chosen is not None:
                    self._ee_out = (chosen, left)
            else:
                self.ee_stats["prefill_steps"] += 1
            out = layout.finish(self, h, residual)
            return out if rows is None else rows.scatter(out)
        finally:
            if rows is not None:
                rows.restore()

    def _ee_draft_forward(self, h: Tensor, positions, **kwargs) -> Tensor:
        """A drafter (`draft_exit`): the layers below its exit and the exit's context block, for every token (their
        KV caches written); nothing deeper runs, so the deeper layers' caches stay unused."""
        layout, j = self.ee_layout, self.ee_draft
        residual = None
        for layer in layout.layers(self)[: self.ee_heads.exit_layers[j]]:
            h, residual = layout.step(layer, positions, h, residual, **kwargs)
        return self._ee_block(j, positions, h if residual is None else h + residual)

    def _ee_block(self, j: int, positions: Tensor, raw: Tensor) -> Tensor:
        """What exit `j`'s head reads: its context block's output over `raw` (its KV cache written), or `raw`."""
        block = self.ee_blocks[str(j)] if str(j) in self.ee_blocks else None
        if block is None:
            return raw
        return self.ee_layout.run_block(block, positions, raw)

    def _ee_feed_block(self, j: int, positions: Tensor, raw: Tensor) -> None:
        """Write only exit `j`'s context block's keys and values for these tokens (none without a block)."""
        block = self.ee_blocks[str(j)] if str(j) in self.ee_blocks else None
        if block is not None:
            self._ee_write_kv(block, positions, raw)

    def _ee_head_logits(self, j: int, features: Tensor) -> Tensor:
        """Exit `j`'s head: `(n, hidden)` -> `(n, head classes)` (a draft head's last class is OTHER)."""
        part = self.ee_parts[j]
        normed = self.ee_norms[str(j)](features)
        adapted = normed
        adapter = part.get("adapter")
        if adapter is not None:
            adapted = normed + (F.linear(normed, adapter[0]) if len(adapter) == 1
                                else F.linear(F.linear(normed, adapter[0]), adapter[1]))
        logits = F.linear(adapted, part["rows"], part["bias"])
        if "other" in part:
            logits = torch.cat([logits, F.linear(normed, *part["other"])], dim=-1)
        if self.ee_softcap:
            logits = torch.tanh(logits / self.ee_softcap) * self.ee_softcap
        return logits

    def _ee_fires(self, j: int, logits: Tensor) -> Tensor:
        """`(n,)` bool: exit `j` fires (its confidence reaches τ_j(ε) and its top class is a real token)."""
        real = logits.argmax(dim=-1) < (logits.shape[-1] - 1 if "other" in self.ee_parts[j] else logits.shape[-1])
        return (confidence(self.ee_heads.metric, logits) >= self.ee_thresholds[j]) & real

    def _ee_vocab_logits(self, j: int, logits: Tensor) -> Tensor:
        """Head classes -> `(n, vocab)` float32 logits over the model vocabulary (-inf outside the draft one)."""
        ids = self.ee_parts[j]["ids"]
        if ids is None:
            return logits.float()
        full = logits.new_full((logits.shape[0], self.ee_vocab), -math.inf, dtype=torch.float32)
        full[:, ids] = logits[:, : ids.numel()].float()
        return full

    def _ee_fill_kv(self, i: int, j: int, positions: Tensor, raw: Tensor) -> None:
        """Keys and values of the skipped layers `i..L-1` and of deeper exits' blocks, from the exit state `raw`."""
        for layer in self.ee_layout.layers(self)[i:]:
            self._ee_write_kv(layer, positions, raw)
        for m in range(j + 1, len(self.ee_checked)):
            self._ee_feed_block(m, positions, raw)

    def _ee_write_kv(self, layer: nn.Module, positions, raw: Tensor) -> None:
        """Write decoder `layer`'s (or a context block's) keys and values for these tokens from its input `raw`."""
        self.ee_layout.write_kv(layer, positions, raw, self.ee_kv_source[id(layer)])

    def _ee_count(self, left: Tensor) -> None:
        stats = self.ee_stats
        stats["decode_steps"] += 1
        stats["decode_tokens"] += left.numel()
        stats["early_steps"] += bool((left >= 0).all())  # steps that stopped before the last layer
        stats["full_tokens"] += int((left < 0).sum())
        for j in left[left >= 0].tolist():
            stats["exit_tokens"][self.ee_heads.exit_layers[j]] += 1
        if self.ee_log_every and stats["decode_steps"] % self.ee_log_every == 0:
            logger.info("hf-earlyexit: %s", format_stats(stats))

    def _ee_logits(self, hidden_states: Tensor, full_logits) -> Tensor:
        """The step's logits: a sequence that left takes its exit head's, the others the model's (`full_logits(h)`
        over the hidden states of those that ran every layer, only)."""
        if self.ee_draft is not None:  # a drafter: its exit head's logits over the full vocabulary
            return self._ee_vocab_logits(self.ee_draft, self._ee_head_logits(self.ee_draft, hidden_states))
        out = self._ee_out
        self._ee_out = None
        if out is None:
            return full_logits(hidden_states)
        chosen, left = out
        if chosen.shape[0] != hidden_states.shape[0]:
            raise RuntimeError(f"hf-earlyexit: a decode step gave {chosen.shape[0]} tokens but "
                               f"{hidden_states.shape[0]} logits rows were asked for (speculative decoding is not "
                               f"supported with exits)")
        going = left < 0
        if bool(going.any()):
            chosen[going] = full_logits(hidden_states[going]).float()
        return chosen

    def earlyexit_stats(self) -> dict:
        """Decode steps and tokens so far, and where they left (`exit_tokens` per exit layer, `full_tokens`)."""
        stats = copy.deepcopy(self.ee_stats)
        stats["exit_share"] = (sum(stats["exit_tokens"].values()) / stats["decode_tokens"]
                               if stats["decode_tokens"] else 0.0)
        stats["eps"], stats["exits_checked"] = self.ee_eps, [
            k for k, on in zip(self.ee_heads.exit_layers, self.ee_checked, strict=True) if on]
        return stats


def format_stats(stats: dict) -> str:
    exited = sum(stats["exit_tokens"].values())
    total = max(stats["decode_tokens"], 1)
    per = ", ".join(f"exit@{k} {n}" for k, n in stats["exit_tokens"].items())
    return (f"{stats['decode_steps']} decode steps, {stats['decode_tokens']} tokens, {exited / total:.1%} left early "
            f"({per}, full {stats['full_tokens']})")


class _BatchRows:
    """The sequences of a decode step still going under `batch_exit="row"`, and the step's attention metadata and
    slot mapping narrowed to some of them (vLLM's CPU attention backend: each sequence brings one token, so a
    subset keeps its rows of the sequence lengths, block table and slots, with the backend's work schedule
    computed again for it). `restore()` puts the step's own back."""

    def __init__(self, n: int, device, dtype: torch.dtype) -> None:
        from vllm.forward_context import get_forward_context

        self.dtype = dtype  # the model's (the backend's work schedule is built for it)
        self.context = get_forward_context()
        self.metadata, self.slots = self.context.attn_metadata, self.context.slot_mapping
        if not isinstance(self.metadata, dict) or not isinstance(self.slots, dict):
            raise RuntimeError("hf-earlyexit: batch_exit='row' needs one attention metadata dict per step (got "
                               f"{type(self.metadata).__name__})")
        self.groups: dict[int, list[str]] = {}  # the layers that share each metadata object (a KV cache group)
        for name, m in self.metadata.items():
            self.groups.setdefault(id(m), []).append(name)
        self.active = torch.arange(n, device=device)
        self.n = n

    def attend(self, rows: Tensor) -> None:
        """From now on the model's attention layers see only the sequences `rows` (positions in the whole step)."""
        narrowed = {key: self._narrow(self.metadata[names[0]], rows, names) for key, names in self.groups.items()}
        self.context.attn_metadata = {name: narrowed[id(m)] for name, m in self.metadata.items()}
        self.context.slot_mapping = {name: slots[rows] for name, slots in self.slots.items()}
        self.active = rows

    def scatter(self, out: Tensor) -> Tensor:
        """`out` (rows of the sequences still going) at their places in the whole step (zeros elsewhere: the
        sequences that left take their exit's logits)."""
        if out.shape[0] == self.n:
            return out
        full = out.new_zeros((self.n, *out.shape[1:]))
        full[self.active] = out
        return full

    def restore(self) -> None:
        self.context.attn_metadata, self.context.slot_mapping = self.metadata, self.slots

    def _narrow(self, m, rows: Tensor, names: list[str]):
        import dataclasses

        from vllm import _custom_ops as ops
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

        if not isinstance(m, CPUAttentionMetadata) or m.max_query_len != 1:
            raise RuntimeError(f"hf-earlyexit: batch_exit='row' needs vLLM's CPU attention backend at decode steps "
                               f"(got {type(m).__name__}); use batch_exit='step'")
        layers = [self.context.no_compile_layers[name] for name in names]
        impl = layers[0].impl
        windows = {layer.impl.sliding_window for layer in layers}  # as the backend's builder takes the window
        k = rows.numel()
        starts = torch.arange(k + 1, dtype=m.query_start_loc.dtype, device=m.query_start_loc.device)
        seq_lens = m.seq_lens[rows]
        schedule = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=k, num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=starts, causal=m.causal,
            sliding_window_size=windows.pop() if len(windows) == 1 else -1, isa=layers[0].isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=impl.kv_cache_dtype)
        return dataclasses.replace(m, num_actual_tokens=k, query_start_loc=starts, max_seq_len=int(seq_lens.max()),
                                   seq_lens=seq_lens, block_table=m.block_table[rows],
                                   slot_mapping=m.slot_mapping[rows], scheduler_metadata=schedule)


def _decode_only() -> bool:
    """Whether this step is decode-only (every sequence brings one new token)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batches: decide on the first
        metadata = metadata[0] if metadata else None
    if not isinstance(metadata, dict) or not metadata:
        return False
    first = next(iter(metadata.values()))
    return getattr(first, "max_query_len", None) == 1


def _new_layer(layer_class: type, vllm_config, prefix: str) -> nn.Module:
    """A decoder layer of the model's own vLLM class, built as the family's model builds its layers."""
    if "vllm_config" in inspect.signature(layer_class.__init__).parameters:  # Llama
        return layer_class(vllm_config=vllm_config, prefix=prefix)
    return layer_class(config=vllm_config.model_config.hf_config, cache_config=vllm_config.cache_config,
                       quant_config=vllm_config.quant_config, prefix=prefix)  # Gemma 3, Qwen 2/3


def _load_block(model: nn.Module, block: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load HF-named decoder-layer weights into a vLLM decoder layer (stacked projections through the model's own
    weight mapper)."""
    from vllm.model_executor.models.utils import AutoWeightsLoader

    holder = nn.Module()
    holder.block = block
    layout = model.ee_layout
    dtype = layout.final_norm(model).weight.dtype
    loaded = AutoWeightsLoader(holder).load_weights(
        ((f"block.{name}", tensor.to(dtype)) for name, tensor in layout.vllm_block_weights(weights.items())),
        mapper=getattr(model, "hf_to_vllm_mapper", None))
    missing = {f"block.{n}" for n, _ in block.named_parameters()} - set(loaded)
    if missing:
        raise HeadsFolderError(f"a context block's weights {sorted(missing)} were not in the heads folder or base")


def _layer_of(name: str, container: str = "layers") -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == container and b.isdigit():
            return int(b)
    return None


def _checkpoint_renames(model: nn.Module) -> list[tuple[re.Pattern, str]]:
    """transformers' renamings from checkpoint names to the class's own (none where this version has no such
    table)."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:
        return []
    renames = []
    for rule in get_model_conversion_mapping(model):
        if isinstance(rule, WeightRenaming):
            targets = list(rule.target_patterns)
            for k, source in enumerate(rule.source_patterns):
                renames.append((re.compile(source), targets[min(k, len(targets) - 1)]))
    return renames


class _FingerprintStream:
    """hf-earlyexit's base-weight fingerprint (`fingerprint.py`), computed from the HF-named checkpoint tensors as
    vLLM streams them; the parts (embedding, each decoder layer, final norm, LM head) and the order of tensors within
    a part come from the transformers class, built on the meta device."""

    def __init__(self, hf_config) -> None:
        self.slots: dict[str, list[tuple[int, int]]] = {}
        self.terms: list[list] = []
        try:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config))
            body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            if not hasattr(body, "layers") and not hasattr(body, "h"):
                body = getattr(model, "transformer", body)
            layers = body.layers if hasattr(body, "layers") else body.h  # GPT-2: `transformer.h`, `ln_f`
            # final norms: `norm`, GPT-NeoX `final_layer_norm`, Phi `final_layernorm`, GPT-2 `ln_f`
            norm = next(getattr(body, n) for n in TransformersLayers.NORMS if hasattr(body, n))
            parts = [model.get_input_embeddings(), *layers, norm, model.get_output_embeddings()]
            self.renames = _checkpoint_renames(model)
            names: dict[int, list[str]] = {}  # a tied weight has several names; the checkpoint may hold any one
            for n, p in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), []).append(n)
        except Exception as error:  # a family transformers cannot build on meta here: skip the check, say so
            logger.warning("hf-earlyexit: no HF layout for the fingerprint (%s)", error)
            self.terms = None
            return
        for p, module in enumerate(parts):
            self.terms.append([])
            for t, param in enumerate(module.parameters()):
                for n in names[id(param)]:
                    self.slots.setdefault(n, []).append((p, t))
        self.filled: set[tuple[int, int]] = set()

    def add(self, name: str, tensor: Tensor) -> None:
        if self.terms is not None:  # GPT-2 checkpoints may name its stack without the `transformer.` prefix
            renamed = name
            for pattern, target in self.renames:  # GPT-NeoX checkpoints keep `embed_out` for the LM head
                renamed = pattern.sub(target, renamed)
            slots = self.slots.get(name) or self.slots.get(f"transformer.{name}") or self.slots.get(renamed, ())
            for p, t in slots:
                if (p, t) not in self.filled:
                    self.filled.add((p, t))
                    self.terms[p].append(tensor_terms(tensor.cpu(), t))

    def result(self) -> list[list[float]] | None:
        return None if self.terms is None else [part_entry(terms) for terms in self.terms]
