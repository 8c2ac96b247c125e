"""Early-exit generation (lossy; paper §3.3.2) on the layer engine (portable: torch + transformers + siblings).

Each new token runs the decoder layers up to the first exit, that head is read, and if the exit fires under the exit
rule (its confidence passes the calibrated threshold τ_k(ε)) the token is emitted from the head and no deeper layer is
computed for it; otherwise the next exit is tried, and finally the full model. With a batch (`batch_exit`):

- `"step"` (default): the iteration-level rule; a step ends when every row has exited (rows that exited early ride
  along to the deepest exit any row needs).
- `"row"`: each row runs only the layers up to its own exit; the layers above run for the rows still going
  (gathered, run, scattered back: `rows_earlyexit.py`), so a row's work does not depend on the other rows'.

Rows that finish leave the batch.

    step = choose tokens -> emit -> drop finished rows -> climb the exits (-> full model) -> fill skipped KV

The KV cache of the layers a token skipped is kept usable in one of two ways (`kv_fill`):

- `"recompute"` (EE-LLM): the skipped layers of an exited token are computed later, together with the next token
  that reaches them (with `batch_exit="row"`: the next token *of that row*; each row keeps its own lag), so every
  cache entry is exactly what the full model stores. It costs the skipped layers'
  work after all (batched with the next deep token, so it reads the weights once) and saves only when later tokens
  also exit; it is exact.
- `"propagate"` (CALM): the exit hidden state is copied up, and each skipped layer computes only its key/value
  projections from it (input norm + q/k/v projections, no attention, no MLP): a fraction of a layer's cost, but the
  deeper layers then attend to approximate keys and values. With `batch_exit="row"` the copy starts at the row's own
  exit; with `"step"` at the step's depth (rows that rode along computed the layers below it in full).

Decoding runs inside HF `generate()` (as its `custom_generate` loop), so generation configs, logits processors
(temperature, top-k/p, repetition penalty), stopping criteria, stop strings, EOS, streamers and
`return_dict_in_generate` work as usual. With sampling, a token that exits is sampled from its head's distribution.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .loop_earlyexit import DecodeRun, check_search, climb, pick, row_climb, run_decoding_loop
from .options_earlyexit import DecodingOptions
from .rows_earlyexit import RowSparse
from .stats_earlyexit import EarlyExitGenerateOutput


@dataclass
class _Outputs:
    """What a call returns besides the sequences: scores / logits when asked, and the exit of every token."""

    keep_scores: bool
    keep_logits: bool
    scores: tuple = ()
    logits: tuple = ()
    trace: list[Tensor] = field(default_factory=list)


def _choose_tokens(run: DecodeRun, rows: Tensor, logits: Tensor, input_ids: Tensor, processors, do_sample: bool,
                   kept: _Outputs) -> Tensor:
    """`(batch,)` next tokens from `logits` `(n, vocab)` of the running `rows` (zeros for the others)."""
    scores = logits.new_zeros(input_ids.shape[0], logits.shape[-1])
    scores[rows] = logits
    processed = processors(input_ids, scores)
    if kept.keep_scores:
        kept.scores += (processed,)
    if kept.keep_logits:
        kept.logits += (scores,)
    return pick(processed, do_sample)


def _emit(run: DecodeRun, rows: Tensor, exit_index: Tensor, batch_size: int, kept: _Outputs) -> None:
    """Count where the running rows' new tokens left and keep the exit of every row (-1: finished)."""
    step = torch.full((batch_size,), -1, dtype=torch.long, device=rows.device)
    step[rows] = exit_index
    kept.trace.append(step)
    run.stats.count_exits(exit_index)


def _full_scores(engine, hidden: Tensor, argmax_only: bool) -> Tensor:
    """`(m, vocab)` float32 scores of the full model at `hidden` `(m, hidden)`: its logits, or, where only their
    argmax is read (greedy, no logits processors, no scores returned), 0 at the model's own token and -inf
    elsewhere (`LayerEngine.final_argmax`: the same token, faster for several rows on a CPU)."""
    if not argmax_only:
        return engine.final_logits(hidden).float()
    picks = engine.final_argmax(hidden)
    scores = torch.full((len(picks), engine.config.vocab_size), float("-inf"), device=hidden.device)
    scores[torch.arange(len(picks), device=hidden.device), picks] = 0.0
    return scores


def _step(run: DecodeRun, tokens: Tensor, kv_fill: str, argmax_only: bool = False) -> tuple[Tensor, Tensor]:
    """Append `tokens` `(n,)` and run them up the exits; rows no exit took go through the full model.

    Returns:
        `(exit_index (n,), logits (n, vocab) float32)` of the new position.
    """
    engine = run.ee_model.engine
    engine.append(run.state, tokens[:, None])
    run.stats.steps += 1
    result = climb(run, torch.ones_like(tokens, dtype=torch.bool), tokens)
    logits, depth = result.logits, engine.num_layers if result.depth is None else result.depth
    if result.depth is None:  # some row goes to the full model
        rest = (~result.fired).nonzero().squeeze(1)
        hidden = engine.run_to(run.state, engine.num_layers)[:, -1]
        logits[rest] = _full_scores(engine, hidden[rest], argmax_only)
        run.tally.final_tokens += len(rest)
        run.tally.final_calls += 1
    elif kv_fill == "propagate":
        engine.fill_kv(run.state, depth)
    exit_depth = torch.tensor([*run.ee_model.config.exit_layers, engine.num_layers], device=tokens.device)
    run.stats.wasted_layer_tokens += int((depth - exit_depth[result.exit_index]).sum())
    return result.exit_index, logits


def _row_step(run: DecodeRun, tokens: Tensor, kv_fill: str, argmax_only: bool = False) -> tuple[Tensor, Tensor]:
    """`_step` with row-sparse depth (on `run.sparse`): each row climbs the exits only until its own exit fires; the
    layers above it run for the rows still going.

    Returns:
        `(exit_index (n,), logits (n, vocab) float32)` of the new position.
    """
    engine, tally, sparse = run.ee_model.engine, run.tally, run.sparse
    sparse.append(tokens)
    run.stats.steps += 1
    result = row_climb(run, torch.ones_like(tokens, dtype=torch.bool), tokens, kv_fill == "propagate")
    index, logits = result.exit_index, result.logits
    active = (~result.fired).nonzero().squeeze(1)
    if len(active):  # rows no exit took: the full model
        hidden = sparse.climb(active, engine.num_layers)  # (m, hidden)
        logits[active] = _full_scores(engine, hidden, argmax_only)
        tally.final_tokens += len(active)
        tally.final_calls += 1
    run.stats.wasted_layer_tokens += sparse.padding  # padding slots of rows that lag less than others
    sparse.padding = 0
    return index, logits


@torch.no_grad()
def early_exit_decode(
    model, input_ids: Tensor, logits_processor, stopping_criteria, generation_config, synced_gpus: bool = False,
    streamer=None, *, ee_model, ee_options: DecodingOptions, **model_kwargs,
):
    """The decoding loop HF `generate()` calls (as `custom_generate`) for early-exit generation.

    `model` is the base model HF prepared the inputs for; `ee_model` the `EarlyExitForCausalLM` holding the heads.
    """
    check_search(generation_config, "early-exit generation")
    engine = ee_model.engine
    # one row decodes the same under both rules: the engine's own lag is then that row's
    row_sparse = ee_options.rows_sparse("early_exit") and input_ids.shape[0] > 1
    # row-sparse lag reaches back past a sliding window: those cache layers keep their past
    run = DecodeRun.start(ee_model, input_ids, model_kwargs, ee_options, rollback=row_sparse)
    sparse = RowSparse(engine, run.state) if row_sparse else None
    run.sparse = sparse
    pad_token = generation_config._pad_token_tensor
    return_dict = generation_config.return_dict_in_generate
    kept = _Outputs(return_dict and generation_config.output_scores, return_dict and generation_config.output_logits)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    batch_size, device = input_ids.shape[0], input_ids.device
    # greedy, nothing reads the full model's scores but their argmax
    argmax_only = not (generation_config.do_sample or len(logits_processor) or kept.keep_scores or kept.keep_logits)

    rows = torch.arange(batch_size, device=device)  # engine rows -> batch rows
    unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
    exit_index = torch.full((batch_size,), run.rule.num_exits, dtype=torch.long, device=device)
    logits, dropped = run.first_logits, False
    while True:
        next_tokens = _choose_tokens(run, rows, logits, input_ids, logits_processor, generation_config.do_sample,
                                     kept)
        if has_eos:
            next_tokens = next_tokens * unfinished + pad_token * (1 - unfinished)
        _emit(run, rows, exit_index, batch_size, kept)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, kept.scores)
        if unfinished.max() == 0:
            break
        keep = unfinished[rows].bool()  # drop finished rows: their tokens cost nothing more
        if not bool(keep.all()):
            if sparse is not None:
                sparse.select(keep.nonzero().squeeze(1))
                run.state = sparse.state
            else:
                run.state = engine.select_rows(run.state, keep.nonzero().squeeze(1))
            rows, dropped = rows[keep], True
        if sparse is not None:
            exit_index, logits = _row_step(run, next_tokens[rows], ee_options.kv_fill, argmax_only)
        else:
            exit_index, logits = _step(run, next_tokens[rows], ee_options.kv_fill, argmax_only)

    stats = run.finish(streamer, run.stats.tokens - batch_size, run.stats.steps)
    if not return_dict:
        return input_ids
    cache = None
    if not dropped:
        if ee_options.kv_fill == "recompute" and sparse is not None:
            sparse.flush()
        elif ee_options.kv_fill == "recompute":
            engine.flush(run.state)
        cache = copy.copy(run.state.cache)  # the model's layers only: context heads' slots are ours
        cache.layers = [copy.copy(layer) for layer in cache.layers[: engine.num_layers]]
        for layer in cache.layers:
            if sparse is not None and getattr(layer, "is_sliding", False):
                layer.crop(0)  # it recorded its past: keep what a sliding-window layer keeps
    return EarlyExitGenerateOutput(
        sequences=input_ids, scores=kept.scores if kept.keep_scores else None,
        logits=kept.logits if kept.keep_logits else None, cache=cache, exit_stats=stats,
        exit_index=torch.stack(kept.trace, dim=1),
    )


def early_exit_generate(ee_model, inputs: Tensor | None, options: DecodingOptions, **kwargs):
    """`generate()` with early exits: HF prepares everything, `early_exit_decode` runs the loop."""
    return run_decoding_loop(ee_model, early_exit_decode, "early-exit generation", inputs, options, kwargs)
