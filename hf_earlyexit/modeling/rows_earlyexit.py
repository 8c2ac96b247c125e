"""Row-sparse depth: in a batched step each row runs only the layers it needs (portable: torch + transformers +
siblings).

The layer engine lets layers lag, but all batch rows share one length per layer, so a batched step that ends only
when every row has exited makes one deep row take the whole batch deep. `RowSparse` keeps the lag *per row* on top
of an engine state whose prompt pass is complete:

- every step appends one slot to every cache layer for every row (zeros until that row computes it there),
- `done[r, j]`: slots row `r` has computed at layer `j`, non-increasing in `j` (model layers; context layers have
  their own columns, at least `done[r, source]`);
- `end[r]`: row `r`'s own slots are `[0, end[r])`; the slots after it are *holes* (masked, never computed). Early exit
  appends to every row (`end = n`); self-speculative decoding appends drafts only to the rows still drafting, so a
  round leaves holes at the end of the rows that drafted less, and `compact` drops them with the rejected drafts;
- `frontier[j, r]`: `(m, hidden)` the inputs of layer `j` for row `r`'s slots `[done[r, j], done[r, j-1])`.

A layer runs on the rows that have something pending there (gather), on the last `q` slots of each row (right-aligned
at the row's end: row `r` has `end[r] - done[r, j]` of them, the earlier ones are padding whose outputs are dropped
and whose keys and values are never written), and its keys and values are written into the shared cache at exactly
those rows and slots (scatter). A row that exited leaves its newest slot pending at its exit layer; the skipped
layers of that slot are computed (`kv_fill="recompute"`, exact) the next time that row's newest token climbs past
them, together with it, or filled at once from the exit state (`"propagate"`: key/value projections only,
`fill_kv`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine_earlyexit import EngineState, KVWritten, LayerEngine


class RowSparse:
    """Per-row lag on top of `state` (every position of the prompt computed by every layer it feeds).

    Args:
        engine: the layer engine.
        state: its state after the prompt pass; sliding-window cache layers must record their past
            (`engine.start(..., rollback=True)`), since a lagging row reaches back past the window.
    """

    def __init__(self, engine: LayerEngine, state: EngineState) -> None:
        if state.frontier:
            raise RuntimeError("row-sparse decoding starts from a state whose positions every layer has computed")
        self.engine, self.state = engine, state
        self.layers = [*range(engine.num_layers), *(engine.num_layers + m for m in state.contexts)]
        device = state.attention_mask.device
        self.done = torch.tensor(state.done, dtype=torch.long, device=device).repeat(state.batch_size, 1)
        self.end = torch.full((state.batch_size,), state.length, dtype=torch.long, device=device)
        self.frontier: dict[tuple[int, int], Tensor] = {}
        self.context_out: dict[int, Tensor] = {}  # context layer m -> (batch, hidden), each row's newest slot
        self.padding = 0  # row-slots run through a layer only to fill the batch (outputs dropped)
        attn = getattr(engine.config, "_attn_implementation", None) or "sdpa"
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"batch_exit='row' runs with attn_implementation 'sdpa' or 'eager', not {attn!r}")
        self.eager = attn == "eager"

    # -- rows and slots ---------------------------------------------------------------------------------------------

    def append(self, tokens: Tensor, take: Tensor | None = None) -> None:
        """Append one slot to every row and every cache layer; the rows in `take` `(batch,)` bool (default: all) put
        their token of `tokens` `(batch,)` there, pending at layer 0, the others leave it a hole (masked, never
        computed). A row cannot append after a hole."""
        engine, state = self.engine, self.state
        take = torch.ones_like(tokens, dtype=torch.bool) if take is None else take
        if bool((self.end[take] != state.length).any()):
            raise RuntimeError("a row appends a token after a hole")
        engine.append(state, tokens[:, None], attention_mask=take.long()[:, None])
        embeds = state.frontier.pop(0)  # (batch, 1, hidden)
        n = state.length
        for j in self.layers:
            layer = state.cache.layers[j]
            keys, values = layer.keys, layer.values  # (batch, heads, n - 1, d)
            layer.keys = torch.cat([keys, keys.new_zeros(*keys.shape[:2], 1, keys.shape[3])], dim=2)
            layer.values = torch.cat([values, values.new_zeros(*values.shape[:2], 1, values.shape[3])], dim=2)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = n
            state.done[j] = n
        for r in take.nonzero().squeeze(1).tolist():  # behind the row's slots still waiting there (lookup drafts)
            self.frontier[0, r] = _cat(self.frontier.get((0, r)), embeds[r])
        self.end[take] = n

    def select(self, keep: Tensor) -> None:
        """Keep only rows `keep` (1-D indices, in order): finished rows leave the batch."""
        self.state = self.engine.select_rows(self.state, keep)
        new = {int(r): i for i, r in enumerate(keep.tolist())}
        self.frontier = {(j, new[r]): h for (j, r), h in self.frontier.items() if r in new}
        self.done = self.done[keep]
        self.end = self.end[keep]
        self.context_out = {m: h[keep] for m, h in self.context_out.items()}

    def compact(self, ends: Tensor) -> None:
        """Keep slots `[0, ends[r])` of each row `r` `(batch,)` (self-speculative decoding: the accepted prefix) and
        drop the rest (rejected drafts and holes); rows are re-aligned behind left padding (`LayerEngine.compact`).
        Needs every own slot computed by every layer."""
        if self.frontier or bool((self.done[:, self.layers] < self.end[:, None]).any()):
            raise RuntimeError("compact needs every slot of every row computed by every layer")
        if bool((ends > self.end).any()):
            raise RuntimeError("compact keeps a row's own slots only")
        self.engine.compact(self.state, ends)
        self.done[:, self.layers] = self.state.length
        self.end.fill_(self.state.length)
        self.context_out.clear()

    # -- climbing ---------------------------------------------------------------------------------------------------

    def climb(self, rows: Tensor, k: int, every: bool = False) -> Tensor | list[Tensor]:
        """Bring `rows` `(m,)` up to the input of layer `k` (1..L): every slot they have pending below `k` runs the
        layers up to `k`, each layer once, batched over the rows that need it.

        Returns:
            `(m, hidden)` the input of layer `k` (for `k = L`: the final output, handed over) at each row's newest
            slot; with `every` (only for `k = L`), per row `(q_r, hidden)` the final outputs of all its slots that
            reached layer `L` in this climb.
        """
        engine = self.engine
        carry: dict[int, Tensor] = {}  # row -> outputs of the last layer it ran in this climb
        row_list = rows.tolist()
        done = dict(zip(row_list, self.done[rows, :k].tolist(), strict=True))  # before this climb
        end = dict(zip(row_list, self.end[rows].tolist(), strict=True))
        for i in range(k):
            here = [r for r in row_list if done[r][i] < end[r]]
            if not here:
                continue
            inputs = [_cat(self.frontier.pop((i, r), None), carry.pop(r, None)) for r in here]
            hidden = _right_align(inputs, max(end[r] - done[r][i] for r in here))  # (m_i, q, hidden)
            index = rows if len(here) == len(row_list) else torch.tensor(here, device=rows.device)
            self._feed_contexts(i, index, hidden)
            out = self.run_layer(i, index, hidden)
            for a, (r, pending) in enumerate(zip(here, inputs, strict=True)):
                carry[r] = out[a, out.shape[1] - pending.shape[0]:]
        for r in row_list:
            self.frontier[k, r] = _cat(self.frontier.get((k, r)), carry.pop(r, None))
        if k < engine.num_layers:
            pending = [self.frontier[k, r] for r in row_list]
            feed = [r for r, p in zip(row_list, pending, strict=True) if p.shape[0]]
            if feed:
                self._feed_contexts(k, torch.tensor(feed, device=rows.device),
                                    _right_align([self.frontier[k, r] for r in feed], max(
                                        self.frontier[k, r].shape[0] for r in feed)))
            return torch.stack([self.frontier[k, r][-1] for r in row_list])
        if every:
            return [self.frontier.pop((k, r)) for r in row_list]
        return torch.stack([self.frontier.pop((k, r))[-1] for r in row_list])

    def fill_kv(self, rows: Tensor, k: int) -> None:
        """`kv_fill="propagate"` for `rows` that left at exit `k`: their newest slot's layer-`k` input is copied up
        and each layer `k..L-1` computes only its keys and values from it (context layers reading those layers'
        inputs take it too)."""
        if k >= self.engine.num_layers or not len(rows):
            return
        hidden = []
        for r in rows.tolist():
            pending = self.frontier.pop((k, r))
            if pending.shape[0] != 1 or bool((self.done[r, :k] != self.end[r]).any()):
                raise RuntimeError(f"row {r} lags below layer {k}: propagate fills only the newest slot")
            hidden.append(pending)
        hidden = torch.stack(hidden)  # (m, 1, hidden)
        for i in range(k, self.engine.num_layers):
            if i > k:
                self._feed_contexts(i, rows, hidden)
            self.run_layer(i, rows, hidden, kv_only=True)

    def flush(self) -> None:
        """Run every row's pending slots through the remaining layers: the cache is then complete everywhere."""
        lagging = (self.done[:, : self.engine.num_layers] < self.end[:, None]).any(dim=1).nonzero().squeeze(1)
        if len(lagging):
            self.climb(lagging, self.engine.num_layers)

    def _feed_contexts(self, i: int, rows: Tensor, hidden: Tensor) -> None:
        """Hand the context layers reading layer `i` the slots of `hidden` `(m, q, hidden)` (layer `i`'s inputs of
        `rows`, right-aligned) they have not taken; keep their output at each row's newest slot."""
        for m in self.state.contexts:
            if self.engine.contexts[m].source != i:
                continue
            j = self.engine.num_layers + m
            need = self.done[rows, j] < self.end[rows]
            if not bool(need.any()):
                continue
            q = int((self.end[rows[need]] - self.done[rows[need], j]).max())
            out = self.run_layer(j, rows[need], hidden[need, -q:])
            if m not in self.context_out:
                self.context_out[m] = hidden.new_zeros(self.state.batch_size, hidden.shape[-1])
            self.context_out[m][rows[need]] = out[:, -1]

    # -- one layer on some rows ------------------------------------------------------------------------------------

    def run_layer(self, j: int, rows: Tensor, hidden: Tensor, kv_only: bool = False) -> Tensor | None:
        """Run layer `j` (model or context) for `rows` `(m,)` on each row's last `q` slots, `hidden` `(m, q, hidden)`
        right-aligned at the row's end: row `r`'s own slots are `[done[r, j], end[r])`, the earlier ones padding
        (outputs dropped, keys and values never written). `kv_only`: stop once the keys and values are written
        (returns `None`)."""
        engine, state = self.engine, self.state
        m, q = hidden.shape[:2]
        end = self.end[rows]  # (m,)
        slots = end[:, None] - q + torch.arange(q, device=rows.device)[None, :]  # (m, q)
        first = self.done[rows, j]  # (m,)
        if bool((first < end - q).any()):
            raise RuntimeError(f"layer {j}: rows have more than {q} pending slots")
        own = slots >= first[:, None]  # (m, q)
        layer_cache = state.cache.layers[j]
        everyone = m == state.batch_size  # rows are ascending: then they are every row, in order
        kwargs = {engine._cache_kwarg: _RowsCache(state.cache, j, None if everyone else rows, own, slots, kv_only)}
        position_ids = state.position_ids[rows].gather(1, slots.clamp(min=0))  # (m, q)
        if engine.parts.rotary is not None:
            layer_type = engine._layer_type(j)
            kwargs["position_embeddings"] = engine.parts.rotary(hidden, position_ids, *(
                (layer_type,) if layer_type else ()))
        mask = self._mask(rows, slots, own, getattr(layer_cache, "sliding_window", None), hidden.dtype)
        prefix = "kv_" if kv_only else ""
        state.work[prefix + "calls"][j] += 1
        state.work[prefix + "tokens"][j] += m * q
        self.padding += m * q - int(own.sum())
        try:
            out = engine._layer(j)(hidden, attention_mask=mask, position_ids=position_ids, use_cache=True, **kwargs)
        except KVWritten:
            self.done[rows, j] = end
            return None
        if kv_only:
            raise RuntimeError(f"decoder layer {j} never wrote its keys and values to the cache")
        self.done[rows, j] = end
        return out[0] if isinstance(out, tuple) else out

    def _mask(self, rows: Tensor, slots: Tensor, own: Tensor, window: int | None, dtype: torch.dtype) -> Tensor:
        """`(m, 1, q, n)`: query slot `s` of row `r` (`slots` `(m, q)`) sees real slots `t <= s` of that row (and
        `t > s - window` in a sliding-window layer, as transformers' masks count it: by slot). Padding queries (not
        `own`, outputs dropped) see every slot, so none of them is left with nothing to attend to."""
        n = self.state.length
        keys = torch.arange(n, device=rows.device)[None, None, :]  # (1, 1, n)
        queries = slots[:, :, None]  # (m, q, 1)
        allowed = keys <= queries  # (m, q, n)
        if window is not None:
            allowed = allowed & (keys > queries - window)
        allowed = allowed & self.state.attention_mask[rows][:, None, :].bool()  # (m, q, n)
        allowed = (allowed | ~own[:, :, None])[:, None]  # (m, 1, q, n)
        if self.eager:
            return torch.zeros(allowed.shape, dtype=dtype, device=rows.device).masked_fill(~allowed,
                                                                                           torch.finfo(dtype).min)
        return allowed


class _RowsCache:
    """Stands in for the engine's cache while a layer runs on some rows: `update` writes the new keys and values at
    those rows' own slots only, and returns those rows' whole cache (every slot, as the mask expects)."""

    def __init__(self, cache, j: int, rows: Tensor | None, own: Tensor, slots: Tensor, kv_only: bool) -> None:
        """`rows`: `(m,)` batch rows, or `None` for every row; `slots` `(m, q)` each row's slots."""
        self._cache, self._layer, self._rows, self._own, self._kv_only = cache, cache.layers[j], rows, own, kv_only
        m, q = own.shape
        rows = torch.arange(m, device=own.device) if rows is None else rows
        self._at_rows = rows[:, None].expand(m, q)[own]  # (k,)
        self._at_slots = slots[own]  # (k,)

    def update(self, keys: Tensor, values: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        layer = self._layer
        for stored, new in ((layer.keys, keys), (layer.values, values)):  # (batch, heads, n, d) <- (m, heads, q, d)
            stored.transpose(1, 2)[self._at_rows, self._at_slots] = new.transpose(1, 2)[self._own].to(stored.dtype)
        if self._kv_only:
            raise KVWritten
        if self._rows is None:
            return layer.keys, layer.values
        return layer.keys[self._rows], layer.values[self._rows]

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def _cat(first: Tensor | None, second: Tensor | None) -> Tensor:
    parts = [t for t in (first, second) if t is not None]
    if not parts:
        raise RuntimeError("a row climbing a layer has no pending slot there")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _right_align(pending: list[Tensor], q: int) -> Tensor:
    """`(m, q, hidden)` from per-row `(q_r, hidden)` (`q_r <= q`), each at the end of its row (zeros before)."""
    out = pending[0].new_zeros(len(pending), q, pending[0].shape[-1])
    for a, p in enumerate(pending):
        out[a, q - p.shape[0]:] = p
    return out
