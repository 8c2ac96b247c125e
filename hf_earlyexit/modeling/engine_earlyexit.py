"""One layer-by-layer engine for every supported decoder-only family (portable: torch + transformers only).

The engine runs a HF causal LM through its own modules (embeddings, position encodings, masks, decoder layers,
final norm, LM head) with a transformers `DynamicCache`, and lets decoder layers *lag*: layer `i` may have computed
fewer positions than layer `i-1`. Pending hidden states wait in a per-layer *frontier* until some later call needs
that layer, and are then run together with the new positions, in order. One mechanism gives

- stop after layer k (`run_to(state, k)` returns what enters layer k),
- continue from layer k (a later `run_to(state, k2)` picks up where the last call stopped),
- lazy catch-up of the KV cache of skipped layers (a token that exited early is written to the deeper layers
  together with the next token that reaches them),
- verification of several drafted tokens in one pass (append them, then `run_to(state, L)`),
- a subset of batch rows (`select_rows`),
- KV-only filling of skipped layers from one hidden state (`fill_kv`, CALM-style propagation),
- rollback of rejected positions (`truncate`),
- *context layers*: extra decoder layers (a context head's block) that read the input of an exit's layer, with their
  own cache slots after the model's, fed every position exactly once as it passes that layer (`context_out`).

Invariant, with `n` positions appended so far and `done[i]` positions computed by layer `i` (non-increasing in i):
`frontier[j]` holds the input of layer `j` for positions `[done[j], done[j-1])` (for `j = 0`: `[done[0], n)`).
A context layer `L + m` reading layer `k`'s input has computed `done[L + m] >= done[k]` positions: every position
reaching layer `k`'s input is handed to it at once (in `run_to` and `fill_kv`), so none is ever missed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .architectures_earlyexit import ModelParts, model_parts
from .products_earlyexit import (
    LM_SCREENS,
    PRODUCTS,
    SCREEN_EXTRA,
    TRIES,
    Bf16Head,
    fastest,
    kept,
    native_bf16,
    products_for,
    row_bucket,
    screen_top,
)

WORK_KEYS = ("calls", "tokens", "kv_calls", "kv_tokens")

@dataclass
class EngineState:
    """Everything the engine keeps between calls for one batch of sequences.

    Attributes:
        cache: the KV cache; layer `i` holds `done[i]` positions.
        attention_mask: `(batch, n)` 1 for real tokens, 0 for padding, over all positions appended so far.
        position_ids: `(batch, n)` position of each token (left padding: padded slots get 0).
        done: per decoder layer, how many positions it has computed.
        frontier: layer index -> `(batch, m, hidden)` states waiting to enter that layer (index `L` = final
            outputs not yet returned).
        work: what was computed so far, per decoder layer (then per context layer): `calls` (layer invocations,
            each reads the layer's weights once), `tokens` (row-positions run through the layer), `kv_calls` /
            `kv_tokens` (the same for KV-only fills).
        contexts: the context layers (indices `m`) this state feeds; the others stay empty.
        context_out: context layer `m` -> its outputs `(batch, q, hidden)` for the positions it took last.
    """

    cache: DynamicCache
    attention_mask: Tensor
    position_ids: Tensor
    done: list[int]
    frontier: dict[int, Tensor] = field(default_factory=dict)
    work: dict[str, list[int]] = field(default_factory=dict)
    contexts: tuple[int, ...] = ()
    context_out: dict[int, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of positions appended so far."""
        return self.attention_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


@dataclass(frozen=True)
class ContextLayer:
    """An extra decoder layer run beside the model: a context head's block.

    Attributes:
        module: the decoder layer (its attention writes the cache slot `L + m`).
        source: the layer whose input it reads (an exit after `source` layers).
        copies: the model layer it was copied from (its cache and rotary kind).
    """

    module: torch.nn.Module
    source: int
    copies: int


class LayerEngine:
    """Runs one HF decoder-only causal LM layer by layer with lagging layers.

    Args:
        model: a `*ForCausalLM` whose `config.model_type` is in the architecture table.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config.get_text_config()
        self.parts: ModelParts = model_parts(model)
        self.num_layers = len(self.parts.layers)
        self.layer_types: list[str] = list(getattr(self.config, "layer_types", None) or [])
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever name this version takes
        layer_params = inspect.signature(self.parts.layers[0].forward).parameters
        self._cache_kwarg = "cache" if "cache" in layer_params else self.parts.spec.cache_kwarg
        self._mask_cache_kwarg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else (
            "past_key_values"
        )
        self.contexts: list[ContextLayer] = []
        self.lm_screen = "auto"

    @property
    def lm_screen(self) -> str:
        """How `final_argmax` may screen a float32 LM head with its bfloat16 copy (`LM_SCREENS`): "auto" where the
        CPU multiplies bfloat16 natively, "bf16" also where it is emulated, "off" never (float32 products only)."""
        return self._lm_screen

    @lm_screen.setter
    def lm_screen(self, value: str) -> None:
        if value not in LM_SCREENS:
            raise ValueError(f"lm_screen={value!r} is not one of {', '.join(LM_SCREENS)}")
        self._lm_screen = value

    def set_context_layers(self, contexts: list[ContextLayer]) -> None:
        """Register the extra decoder layers of context heads (layer `L + m` is `contexts[m]`); each must write its
        cache at index `L + m` (its attention's `layer_idx`)."""
        self.contexts = list(contexts)

    def _layer(self, i: int) -> torch.nn.Module:
        return self.parts.layers[i] if i < self.num_layers else self.contexts[i - self.num_layers].module

    def _layer_type(self, i: int) -> str:
        """Rotary type of layer `i` (a context layer has the type of the layer it copies)."""
        if i >= self.num_layers:
            i = self.contexts[i - self.num_layers].copies
        return self.layer_types[i] if self.parts.spec.rotary_per_layer_type else ""

    # -- state -------------------------------------------------------------------------------------------------

    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None, rollback: bool = False,
              contexts: tuple[int, ...] = ()) -> EngineState:
        """Create a state for `input_ids` `(batch, seq)` (left padding marked by `attention_mask`).

        `rollback=True` lets `truncate` undo positions even past a sliding window (those cache layers then keep
        their past until the next `truncate`). `contexts`: the context layers to feed.
        """
        state = self._empty_state(input_ids.shape[0], input_ids.device, contexts)
        if rollback:
            for layer in state.cache.layers:
                if hasattr(layer, "activate_past_recording"):
                    layer.activate_past_recording()
        self.append(state, input_ids, attention_mask)
        return state

    def _empty_state(self, batch: int, device: torch.device, contexts: tuple[int, ...]) -> EngineState:
        total = self.num_layers + len(self.contexts)
        for m in contexts:
            if not 0 <= m < len(self.contexts):
                raise ValueError(f"context layer {m} does not exist ({len(self.contexts)} are registered)")
        cache = DynamicCache(config=self.config)
        for context in self.contexts:  # a slot per context layer, of the kind of the layer it copies
            cache.layers.append(copy.deepcopy(cache.layers[context.copies]))
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return EngineState(cache=cache, attention_mask=empty, position_ids=empty.clone(), done=[0] * total,
                           work={key: [0] * total for key in WORK_KEYS}, contexts=tuple(sorted(contexts)))

    def append(self, state: EngineState, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """Embed new tokens `(batch, q)` and queue them for layer 0."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dtype=torch.long, device=input_ids.device)
        seen = state.attention_mask.sum(dim=1, keepdim=True)  # (batch, 1) real tokens so far
        positions = (seen + attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (batch, q)
        state.attention_mask = torch.cat([state.attention_mask, attention_mask], dim=1)
        state.position_ids = torch.cat([state.position_ids, positions], dim=1)
        embeds = self.embed(input_ids, positions)  # (batch, q, hidden)
        self._push(state, 0, embeds)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Token (+ learned absolute position) embedding, `(batch, q)` -> `(batch, q, hidden)`."""
        parts = self.parts
        hidden = parts.embed(input_ids)
        if parts.abs_positions is not None:
            hidden = hidden + parts.abs_positions(position_ids).to(hidden.dtype)
        if parts.dropout is not None:
            hidden = parts.dropout(hidden)
        return hidden

    def select_rows(self, state: EngineState, rows: Tensor) -> EngineState:
        """A new state holding only batch rows `rows` (1-D indices); `state` itself is left untouched."""
        cache = copy.copy(state.cache)
        cache.layers = [copy.copy(layer) for layer in state.cache.layers]
        for layer in cache.layers:
            layer.batch_select_indices(rows)
        return EngineState(
            cache=cache,
            attention_mask=state.attention_mask[rows],
            position_ids=state.position_ids[rows],
            done=list(state.done),
            frontier={j: h[rows] for j, h in state.frontier.items()},
            work={key: list(values) for key, values in state.work.items()},
            contexts=state.contexts,
            context_out={m: h[rows] for m, h in state.context_out.items()},
        )

    def truncate(self, state: EngineState, length: int) -> None:
        """Forget every position from `length` on (cache, masks, pending states): rolls back rejected drafts.

        Sliding-window cache layers can only roll back past their window when `start(..., rollback=True)` made them
        record their past.
        """
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot truncate {state.length} positions to length={length}")
        old = list(state.done)
        for j in range(self.num_layers):
            pending = state.frontier.get(j)
            if pending is not None:  # frontier[j] covers [old[j], upper) with upper = old[j-1] (n for j = 0)
                keep = max(0, length - old[j])
                if keep == 0:
                    del state.frontier[j]
                elif keep < pending.shape[1]:
                    state.frontier[j] = pending[:, :keep]
            if old[j] > length:
                _slice_layer(state.cache.layers[j], old[j], torch.arange(length, device=state.attention_mask.device))
                state.done[j] = length
        for j in self._context_indices(state):
            if old[j] > length:
                _slice_layer(state.cache.layers[j], old[j], torch.arange(length, device=state.attention_mask.device))
                state.done[j] = length
        state.context_out.clear()
        state.frontier.pop(self.num_layers, None)  # final outputs are always handed over by run_to
        state.attention_mask = state.attention_mask[:, :length]
        state.position_ids = state.position_ids[:, :length]

    def compact(self, state: EngineState, ends: Tensor) -> None:
        """Keep positions `[0, ends[r])` of each row `r` and drop the rest; rows that keep fewer positions than the
        longest are shifted right and left-padded (masked), so every row stays one contiguous sequence.

        Needs a state with every position computed by every layer (e.g. right after `run_to(state, L)`) and
        recorded sliding-window layers (`start(..., rollback=True)`).
        """
        layers = [*range(self.num_layers), *self._context_indices(state)]
        if state.frontier or any(state.done[j] != state.length for j in layers):
            raise RuntimeError("compact needs every position computed by every layer")
        ends = ends.to(device=state.attention_mask.device, dtype=torch.long)
        stored, length = state.length, int(ends.max())
        if bool((ends == length).all()):
            self.truncate(state, length)
            return
        shift = (length - ends)[:, None]  # (batch, 1)
        columns = torch.arange(length, device=ends.device)[None, :]  # (1, length)
        index = (columns - shift).clamp(min=0)  # (batch, length): old position of each new slot
        padded = columns < shift
        state.attention_mask = state.attention_mask.gather(1, index).masked_fill(padded, 0)
        state.position_ids = state.position_ids.gather(1, index).masked_fill(padded, 0)
        for j in layers:
            _slice_layer(state.cache.layers[j], stored, index)
            state.done[j] = length
        state.context_out.clear()

    def concat_rows(self, first: EngineState, second: EngineState) -> EngineState:
        """One state holding the rows of `first`, then those of `second` (continuous batching: requests join a running
        batch). The shorter is left-padded (masked) to the longer's length; leading slots that are padding in every
        row are dropped. Both need every position computed by every layer they feed (`flush`), the same context
        layers, and recorded sliding-window layers (`start(..., rollback=True)`); neither is changed.
        """
        if first.contexts != second.contexts:
            raise ValueError(f"states feed different context layers: {first.contexts} vs {second.contexts}")
        layers = [*range(self.num_layers), *self._context_indices(first)]
        for state in (first, second):
            if state.frontier or any(state.done[j] != state.length for j in layers):
                raise RuntimeError("concat_rows needs every position computed by every layer (flush first)")
        lead = [int(s.attention_mask.any(dim=0).long().argmax()) if s.attention_mask.any() else s.length
                for s in (first, second)]  # leading slots that are padding in every row of each state
        length = max(s.length - skip for s, skip in zip((first, second), lead, strict=True))
        parts = []
        for state, skip in zip((first, second), lead, strict=True):
            shift = length - (state.length - skip)
            columns = torch.arange(length, device=state.attention_mask.device)
            index = (columns - shift + skip).clamp(min=0)  # (length,): old slot of each new slot
            padded = (columns < shift)[None, :]
            cache = copy.copy(state.cache)
            cache.layers = [copy.copy(layer) for layer in state.cache.layers]
            for j in layers:
                _slice_layer(cache.layers[j], state.length, index)
            parts.append((cache, state.attention_mask[:, index].masked_fill(padded, 0),
                          state.position_ids[:, index].masked_fill(padded, 0)))
        (cache, mask_a, pos_a), (other, mask_b, pos_b) = parts
        for j in layers:
            layer, extra = cache.layers[j], other.layers[j]
            layer.keys = torch.cat([layer.keys, extra.keys])
            layer.values = torch.cat([layer.values, extra.values])
        done = list(first.done)
        for j in layers:
            done[j] = length
        work = {key: [a + b for a, b in zip(first.work[key], second.work[key], strict=True)] for key in first.work}
        return EngineState(cache=cache, attention_mask=torch.cat([mask_a, mask_b]),
                           position_ids=torch.cat([pos_a, pos_b]), done=done, work=work, contexts=first.contexts)

    def _context_indices(self, state: EngineState) -> list[int]:
        """Engine indices `L + m` of the context layers `state` feeds."""
        return [self.num_layers + m for m in state.contexts]

    # -- running -----------------------------------------------------------------------------------------------

    def run_to(self, state: EngineState, k: int) -> Tensor:
        """Bring every appended position up to the input of layer `k` (0..L) and return it.

        Returns:
            `(batch, m, hidden)`: the output of layer `k-1` (raw, before any final norm) for positions
            `[done[k], n)` (`m = n - done[k]`; for `k = L`, all positions not yet returned, which are then
            handed over and forgotten).
        """
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"layer index k={k} is outside 0..{self.num_layers}")
        hidden = None  # running outputs of the previous layer for positions [done[i-1] before this call, n)
        masks: dict[tuple[bool, int], Tensor | None] = {}
        rotaries: dict[tuple[str, int], tuple[Tensor, Tensor] | None] = {}
        for i in range(k):
            pending = state.frontier.pop(i, None)
            hidden = _concat(pending, hidden)
            if hidden is None:
                continue
            self._feed_contexts(state, i, hidden, masks, rotaries)
            hidden = self._run_layer(state, i, hidden, masks, rotaries)
        if hidden is not None:
            self._push(state, k, hidden)
            self._feed_contexts(state, k, state.frontier[k], masks, rotaries)
        if k == self.num_layers:
            out = state.frontier.pop(k, None)
            if out is None:
                raise ValueError("no positions are pending for the final layer output")
            return out
        return state.frontier[k]

    def _feed_contexts(self, state: EngineState, i: int, hidden: Tensor, masks: dict, rotaries: dict) -> None:
        """Hand the positions of `hidden` `(batch, q, hidden)`, the input of layer `i` for positions `[done[i], n)`,
        that a context layer reading layer `i` has not taken yet to it; keep its outputs in `context_out`."""
        for m in state.contexts:
            if self.contexts[m].source != i:
                continue
            j = self.num_layers + m
            new = hidden[:, state.done[j] - state.done[i]:] if i < self.num_layers else hidden
            if new.shape[1] == 0:
                continue
            state.context_out[m] = self._run_layer(state, j, new, masks, rotaries)

    def fill_kv(self, state: EngineState, k: int) -> None:
        """Write the KV cache of layers `k..L-1` for the positions waiting at layer `k` from their layer-`k` input
        (the exit hidden state copied up, CALM's propagation): each skipped layer runs only its input norm and
        key/value projections (the query projection too, where a family computes it first), never attention or
        the MLP. Those positions are then complete at every layer.
        """
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"layer index k={k} is outside 0..{self.num_layers}")
        if k == self.num_layers:
            return
        for j in range(k):
            if j in state.frontier:
                raise RuntimeError(f"layer {j} still has pending positions; run_to(state, {k}) first")
        hidden = state.frontier.pop(k, None)
        if hidden is None:
            return
        masks: dict = {}
        rotaries: dict = {}
        for i in range(k, self.num_layers):
            if i > k:  # the copied-up state is what reaches this layer: context layers reading it take it
                self._feed_contexts(state, i, hidden, masks, rotaries)
            self._run_layer(state, i, hidden, masks, rotaries, kv_only=True)

    def write_kv(self, state: EngineState, i: int, hidden: Tensor) -> None:
        """Write only the keys and values of decoder layer `i` for its positions `[done[i], n)` from their layer
        input `hidden` `(batch, q, hidden)`: the layer's input norm and key/value projections, no attention or MLP
        (what `fill_kv` does per skipped layer; the cost model times one such pass)."""
        self._run_layer(state, i, hidden, {}, {}, kv_only=True)

    def run_context(self, m: int, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Context layer `m` over whole sequences, nothing kept: `hidden` `(batch, seq, hidden)` is the input of its
        source layer at every position (left padding marked by `attention_mask`); returns its outputs, as the
        state machinery would give them position by position (training, full-sequence forward)."""
        batch, seq = hidden.shape[:2]
        mask = torch.ones(batch, seq, dtype=torch.long, device=hidden.device) if attention_mask is None else (
            attention_mask.to(dtype=torch.long, device=hidden.device))
        state = self._empty_state(batch, hidden.device, (m,))
        state.attention_mask, state.position_ids = mask, (mask.cumsum(dim=1) - 1).clamp(min=0)
        return self._run_layer(state, self.num_layers + m, hidden, {}, {})

    def run_context_tail(self, m: int, prefix: Tensor, prefix_mask: Tensor, select: Tensor, tail: Tensor,
                         tail_mask: Tensor) -> Tensor:
        """Context layer `m` where only the last positions' outputs are wanted (scoring), nothing kept: its keys and
        values over left-padded prefixes `prefix` `(groups, p, hidden)` (the input of its source layer; padding
        marked by `prefix_mask`), no attention or MLP there; then row `r` of `tail` `(rows, t, hidden)` (right-padded,
        `tail_mask`) runs the whole layer on a copy of prefix `select[r]`'s cache. Returns the outputs at the tail
        positions `(rows, t, hidden)` (padding slots: undefined), as `run_context` over each row's whole sequence
        gives them."""
        device = tail.device
        prefix_mask = prefix_mask.to(dtype=torch.long, device=device)
        tail_mask = tail_mask.to(dtype=torch.long, device=device)
        j = self.num_layers + m
        if prefix.shape[1]:
            state = self._empty_state(prefix.shape[0], device, (m,))
            state.attention_mask = prefix_mask
            state.position_ids = (prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
            self._run_layer(state, j, prefix, {}, {}, kv_only=True)
            state.cache.layers[j].batch_select_indices(select)
            seen = prefix_mask.sum(dim=1, keepdim=True)[select]
            state.attention_mask = torch.cat([prefix_mask[select], tail_mask], dim=1)
            state.position_ids = torch.cat([state.position_ids[select],
                                            (seen + tail_mask.cumsum(dim=1) - 1).clamp(min=0)], dim=1)
        else:
            state = self._empty_state(tail.shape[0], device, (m,))
            state.attention_mask = tail_mask
            state.position_ids = (tail_mask.cumsum(dim=1) - 1).clamp(min=0)
        return self._run_layer(state, j, tail, {}, {})

    def flush(self, state: EngineState) -> None:
        """Run every pending position through the remaining layers, so the cache is complete at every layer."""
        if any(j < self.num_layers for j in state.frontier):
            self.run_to(state, self.num_layers)
        state.frontier.pop(self.num_layers, None)

    def _run_layer(
        self, state: EngineState, i: int, hidden: Tensor, masks: dict, rotaries: dict, kv_only: bool = False
    ) -> Tensor | None:
        """Run decoder layer `i` on positions `[done[i], n)`: `hidden` `(batch, q, hidden)`.

        `kv_only`: stop as soon as the layer has written its keys and values to the cache (returns `None`).
        """
        start, end = state.done[i], state.length
        if hidden.shape[1] != end - start:
            raise RuntimeError(f"layer {i}: {hidden.shape[1]} pending states for positions [{start}, {end})")
        position_ids = state.position_ids[:, start:end]  # (batch, q)
        sliding = bool(getattr(state.cache.layers[i], "is_sliding", False))
        if (sliding, start) not in masks:
            make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
            masks[sliding, start] = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=state.attention_mask,
                position_ids=position_ids,
                layer_idx=i,
                **{self._mask_cache_kwarg: state.cache},
            )
        cache = _KVOnlyCache(state.cache) if kv_only else state.cache
        kwargs = {self._cache_kwarg: cache}
        if self.parts.rotary is not None:
            layer_type = self._layer_type(i)
            if (layer_type, start) not in rotaries:
                args = (layer_type,) if layer_type else ()
                rotaries[layer_type, start] = self.parts.rotary(hidden, position_ids, *args)
            kwargs["position_embeddings"] = rotaries[layer_type, start]
        prefix = "kv_" if kv_only else ""
        state.work[prefix + "calls"][i] += 1
        state.work[prefix + "tokens"][i] += hidden.shape[0] * hidden.shape[1]
        try:
            out = self._layer(i)(
                hidden, attention_mask=masks[sliding, start], position_ids=position_ids, use_cache=True, **kwargs
            )
        except KVWritten:
            state.done[i] = end
            return None
        if kv_only:
            raise RuntimeError(f"decoder layer {i} never wrote its keys and values to the cache")
        state.done[i] = end
        return out[0] if isinstance(out, tuple) else out

    def _push(self, state: EngineState, j: int, hidden: Tensor) -> None:
        state.frontier[j] = _concat(state.frontier.get(j), hidden)

    # -- outputs -----------------------------------------------------------------------------------------------

    def final_logits(self, hidden: Tensor) -> Tensor:
        """The model's own final norm + LM head (+ logit soft-capping), `(..., hidden)` -> `(..., vocab)`."""
        return self.lm_logits(self.parts.norm(hidden))

    def lm_logits(self, normed: Tensor) -> Tensor:
        """The model's own LM head (+ logit soft-capping) on the final norm's output, `(..., hidden)` ->
        `(..., vocab)`."""
        return self._softcap(self.parts.lm_head(normed))

    @property
    def vocab_size(self) -> int:
        """The width of the LM head's output (its rows)."""
        head = self.parts.lm_head
        weight = getattr(head, "weight", None)
        return int(weight.shape[0]) if weight is not None else int(head.out_features)

    @property
    def lm_head_has_rows(self) -> bool:
        """The LM head is a plain `nn.Linear`, so `lm_logits_rows` can take its output a slice of rows at a time."""
        return type(self.parts.lm_head) is torch.nn.Linear

    def lm_logits_rows(self, normed: Tensor, start: int, stop: int) -> Tensor:
        """`lm_logits(normed)[..., start:stop]` from those rows of the LM head alone (`lm_head_has_rows`)."""
        head = self.parts.lm_head
        bias = None if head.bias is None else head.bias[start:stop]
        return self._softcap(torch.nn.functional.linear(normed, head.weight[start:stop], bias))

    def _softcap(self, logits: Tensor) -> Tensor:
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def final_argmax(self, hidden: Tensor) -> Tensor:
        """`(n, hidden)` -> `(n,)` the argmax of `final_logits(hidden)`, token for token, computed faster where it
        can be proved equal.

        For a float32 LM head on a CPU, the product of a few rows with it runs at very different speeds depending on
        how MKL is asked for it and in which precision, and which way is fastest differs between CPUs and row counts
        (`products_earlyexit.PRODUCTS`), so `fastest` learns it from the first calls. Every way only *chooses* the
        token; where it cannot prove the choice it reads the exact logits:
        - float32, any product: all lie within `B` of the exact logits (the dot-product rounding bound
          `γ_K Σ|w_i x_i|`, K the hidden size), so where the fast top-1 leads its runner-up by more than `4B` the
          exact argmax is the same token;
        - bfloat16 screen (`lm_screen`; by default where the CPU multiplies bfloat16 natively, without a bias): the
          head's bfloat16 copy screens every token, float32 dot products settle the best `1 + SCREEN_EXTRA`, and
          `screen_top`'s bound proves the top token (half the bytes read: 15 against 24 ms for one row, 15 against
          50 for four, on a Xeon with AMX).
        Other dtypes or devices, soft-capped logits: the exact way.
        """
        head = self.parts.lm_head
        weight = head.weight if self._argmax_has_ways else None
        if weight is None or hidden.dim() != 2 or not len(hidden):
            return self.final_logits(hidden).argmax(dim=-1)
        x = self.parts.norm(hidden)
        if x.dtype != torch.float32:
            return self.final_logits(hidden).argmax(dim=-1)
        ways = {f"float32_{name}": (lambda name=name: self._argmax_float32(hidden, x, PRODUCTS[name]))
                for name in products_for(len(x))}
        screen = self.lm_screen == "bf16" or (self.lm_screen == "auto" and native_bf16())
        if screen and self.lm_head_screenable:
            ways |= {f"bf16_{name}": (lambda name=name: self._argmax_screened(hidden, x, PRODUCTS[name]))
                     for name in products_for(len(x))}
        return fastest(("final_argmax", tuple(weight.shape), row_bucket(len(x)), tuple(ways)), ways)

    @property
    def _argmax_has_ways(self) -> bool:
        """`final_argmax` has faster ways than the exact logits: a float32 CPU `nn.Linear` LM head without
        soft-capping after it."""
        head = self.parts.lm_head
        return (isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32
                and head.weight.device.type == "cpu" and not getattr(self.config, "final_logit_softcapping", None))

    @property
    def lm_head_screenable(self) -> bool:
        """The LM head can be screened with its bfloat16 copy (`final_argmax`, the teacher's `lm_topk.final_topk`):
        a float32 CPU `nn.Linear` without soft-capping after it (`_argmax_has_ways`) and without a bias, which the
        screen's bound does not cover."""
        return self._argmax_has_ways and self.parts.lm_head.bias is None

    def learn_final_argmax(self, rows: Sequence[int] = (1, 2, 4, 8, 16)) -> None:
        """Let `final_argmax` learn its fastest way for these row counts now (on random hidden states), so that the
        calls that time each way do not land inside timed work (a bench's warm-up)."""
        if not self._argmax_has_ways:
            return
        weight = self.parts.lm_head.weight
        with torch.no_grad():
            for n in rows:
                hidden = torch.randn(n, self.config.hidden_size, dtype=weight.dtype, device=weight.device)
                for _ in range(2 * len(PRODUCTS) * TRIES + 1):  # a call more than every way's tries
                    self.final_argmax(hidden)

    def _argmax_float32(self, hidden: Tensor, x: Tensor, product: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        head = self.parts.lm_head
        logits = product(head.weight, x)  # (n, vocab)
        if head.bias is not None:
            logits = logits + head.bias
        top = logits.topk(2, dim=-1)
        unit = 2.0**-24  # fp32 unit roundoff
        k = x.shape[-1]
        gamma = k * unit / (1 - k * unit)
        largest_row, largest_bias = self.lm_head_norms()
        bound = (gamma + unit) * largest_row * x.norm(dim=-1) + unit * largest_bias  # (n,)
        return self._settle(hidden, top.indices[:, 0], (top.values[:, 0] - top.values[:, 1]) <= 4 * bound)

    def _argmax_screened(self, hidden: Tensor, x: Tensor, product: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        weight = self.parts.lm_head.weight
        screen = Bf16Head.of(self, weight)
        scores = product(screen.low, x.to(torch.bfloat16))  # (n, vocab) bf16 products, float32 sums
        wide = min(1 + SCREEN_EXTRA, scores.shape[-1])
        _, ids, unsure = screen_top(weight, screen, x, scores, wide, self.lm_head_norms()[0])
        return self._settle(hidden, ids[:, 0], unsure)

    def _settle(self, hidden: Tensor, picks: Tensor, unsure: Tensor) -> Tensor:
        """`picks` `(n,)`, with the rows where `unsure` `(n,)` read from the exact logits instead."""
        unsure = unsure.nonzero().squeeze(1)
        if len(unsure):
            picks = picks.clone()
            picks[unsure] = self.final_logits(hidden[unsure]).argmax(dim=-1)
        return picks

    def lm_head_norms(self) -> tuple[float, float]:
        """The largest row 2-norm of the LM head's weight and its largest |bias| (0 without one), for the rounding
        bounds of products with it; kept until the weights change."""
        head = self.parts.lm_head
        return kept(self, "head_norms", (head.weight, head.bias), lambda: (
            float(head.weight.norm(dim=-1).max()), 0.0 if head.bias is None else float(head.bias.abs().max())))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full-depth logits `(batch, seq, vocab)` from a fresh state (no cache kept)."""
        state = self.start(input_ids, attention_mask)
        return self.final_logits(self.run_to(state, self.num_layers))


@dataclass
class SharedPrefixes:
    """Rows of a batch split into a prefix, shared by the rows whose `keys` agree, and each row's own tail.

    Attributes:
        prefix: `(groups, p, ...)` each distinct prefix once, left-padded (`prefix_mask` 0 on padding), so every
            prefix ends where its rows go on.
        group_of: `(rows,)` long: the prefix of each row.
        tail: `(rows, t, ...)` each row's own values after its prefix, right-padded (`tail_mask`).
    """

    prefix: Tensor
    prefix_mask: Tensor
    group_of: Tensor
    tail: Tensor
    tail_mask: Tensor


def split_shared_prefixes(values: Tensor, keys: list[tuple], splits: list[int], ends: list[int]) -> SharedPrefixes:
    """Lay out rows `values[r, :ends[r]]` (`values` `(rows, width, ...)`) as prefixes `values[r, :splits[r]]`, one
    per distinct `keys[r]` (rows with equal keys must have equal prefixes: the first such row's is taken), and tails
    `values[r, splits[r]:ends[r]]`."""
    groups: dict[tuple, int] = {}
    group_of = [groups.setdefault(key, len(groups)) for key in keys]
    first_row = {g: r for r, g in reversed(list(enumerate(group_of)))}
    width = max(splits)
    shape, device = values.shape[2:], values.device
    prefix = values.new_zeros((len(groups), width, *shape))
    prefix_mask = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    for g, r in first_row.items():
        prefix[g, width - splits[r]:] = values[r, :splits[r]]
        prefix_mask[g, width - splits[r]:] = 1
    lengths = [end - split for split, end in zip(splits, ends, strict=True)]
    tail = values.new_zeros((len(keys), max(lengths), *shape))
    tail_mask = torch.zeros(len(keys), max(lengths), dtype=torch.long, device=device)
    for r, (split, n) in enumerate(zip(splits, lengths, strict=True)):
        tail[r, :n] = values[r, split: split + n]
        tail_mask[r, :n] = 1
    return SharedPrefixes(prefix, prefix_mask, torch.tensor(group_of, dtype=torch.long, device=device), tail,
                          tail_mask)


def _slice_layer(layer, stored: int, index: Tensor) -> None:
    """Keep stored positions `index` (`(length,)` for every row, or `(batch, length)` per row) of a cache layer."""
    if not getattr(layer, "is_initialized", False):
        return
    have = layer.keys.shape[-2]
    if have != stored:
        raise RuntimeError(
            f"a cache layer stores {have} positions, expected {stored}: sliding-window layers must record their past "
            "(start the engine state with rollback=True) to roll back"
        )
    if index.dim() == 1:
        layer.keys = layer.keys[:, :, index]
        layer.values = layer.values[:, :, index]
    else:
        gather = index[:, None, :, None]  # (batch, 1, length, 1)
        layer.keys = layer.keys.gather(2, gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
        layer.values = layer.values.gather(2, gather.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = index.shape[-1]


class KVWritten(Exception):
    """Raised by `_KVOnlyCache` right after a layer stored its keys and values."""


class _KVOnlyCache:
    """Stands in for the engine's cache during a KV-only pass: forwards everything, and stops the layer at the
    first `update` (after storing), before any attention or MLP work."""

    def __init__(self, cache: DynamicCache) -> None:
        self._cache = cache

    def update(self, *args, **kwargs):
        self._cache.update(*args, **kwargs)
        raise KVWritten

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def _concat(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None:
        return second
    if second is None:
        return first
    return torch.cat([first, second], dim=1)
