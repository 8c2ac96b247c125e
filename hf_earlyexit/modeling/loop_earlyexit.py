"""What every decoding loop of ours shares with HF `generate()` (portable: torch + transformers + siblings).

HF prepares a call (generation config, logits processors, stopping criteria) and hands it to our loop as its
`custom_generate`; the loop starts a `DecodeRun` (engine state after the prompt pass, the exit rule, counters),
decodes, and `finish` charges the work to the cost model and adds it to the model's running statistics.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation import StoppingCriteriaList, StopStringCriteria

from .engine_earlyexit import EngineState
from .exits_earlyexit import ExitRule, take_first
from .options_earlyexit import DecodingOptions
from .stats_earlyexit import ExitStats, Tally, charge

# HF decoding methods a loop of ours cannot be combined with
_OTHER_LOOPS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "custom_generate")


def run_decoding_loop(ee_model, loop, what: str, inputs: Tensor | None, options: DecodingOptions, kwargs: dict,
                      **loop_kwargs):
    """Let the base model's `generate()` prepare everything (configs, processors, stopping criteria) and run `loop`
    as its `custom_generate` decoding loop, with `ee_model`, `options` and `loop_kwargs` bound."""
    for key in _OTHER_LOOPS:
        if kwargs.get(key) is not None:
            raise ValueError(f"{key} cannot be combined with {what}")
    _move_stop_strings(ee_model, kwargs)
    # HF hands a callable loop neither the streamer nor the tokenizer, so the streamer is bound here
    decode = functools.partial(loop, streamer=kwargs.get("streamer"), ee_model=ee_model, ee_options=options,
                               **loop_kwargs)
    return ee_model.backbone.generate(inputs, custom_generate=decode, **kwargs)


def _move_stop_strings(ee_model, kwargs: dict) -> None:
    """HF drops the tokenizer before a `custom_generate` loop is prepared, so stop strings become our own stopping
    criterion here (same class HF uses)."""
    config = kwargs.get("generation_config")
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None and config is not None and getattr(config, "stop_strings", None):
        config = copy.deepcopy(config)
        stop_strings, config.stop_strings = config.stop_strings, None
        kwargs["generation_config"] = config
    tokenizer = kwargs.pop("tokenizer", None) or getattr(ee_model, "tokenizer", None)
    if not stop_strings:
        return
    if tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer: pass tokenizer=... to generate()")
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria


def check_search(generation_config, what: str) -> None:
    if generation_config.num_beams > 1:
        raise ValueError(f"{what} decodes greedily or by sampling; got num_beams={generation_config.num_beams}")


def pick(scores: Tensor, do_sample: bool) -> Tensor:
    """`(n, vocab)` processed scores -> `(n,)` tokens (argmax, or a sample of their softmax)."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


@dataclass
class DecodeRun:
    """One generate call's decoding state.

    Attributes:
        state: the engine state (prompt pass done).
        first_logits: `(batch, vocab)` float32, the full model's logits after the prompt.
        rule: the exit rule at this call's ε.
        stats: this call's statistics.
        tally: head and final-head work.
        sparse: the `RowSparse` lag of a row-sparse loop (`batch_exit="row"`), else `None`.
    """

    ee_model: object
    state: EngineState
    first_logits: Tensor
    rule: ExitRule
    stats: ExitStats
    tally: Tally
    prefill: dict[str, list[int]]
    sparse: object | None = None  # the `RowSparse` of a row-sparse loop (`batch_exit="row"`), else `None`

    @classmethod
    def start(cls, ee_model, input_ids: Tensor, model_kwargs: dict, options: DecodingOptions,
              rollback: bool = False) -> DecodeRun:
        """Run the prompt `(batch, seq)` through the full model and set up the rule and counters."""
        engine = ee_model.engine
        eps = ee_model.config.eps if options.eps is None else options.eps
        rule = ExitRule.for_model(ee_model, eps, options.exit_policy, options.kv_fill)
        mask = model_kwargs.get("attention_mask")
        contexts = tuple(head.context_slot for head, on in zip(ee_model.exit_heads, rule.checked, strict=True)
                         if on and head.has_context)  # checked context heads see every position
        state = engine.start(input_ids, torch.ones_like(input_ids) if mask is None else mask, rollback=rollback,
                             contexts=contexts)
        first = engine.final_logits(engine.run_to(state, engine.num_layers)[:, -1]).float()  # (batch, vocab)
        exit_layers = list(ee_model.config.exit_layers)
        stats = ExitStats(exit_layers=exit_layers, num_layers=engine.num_layers, checked_exits=[
            layer for layer, on in zip(exit_layers, rule.checked, strict=True) if on])
        prefill = {key: list(values) for key, values in state.work.items()}  # the prompt pass, as in plain decoding
        return cls(ee_model, state, first, rule, stats, Tally.empty(len(exit_layers)), prefill)

    def finish(self, streamer, decode_tokens: int, plain_steps: int) -> ExitStats:
        """End the stream, charge the decoding work to the cost model and add this call's statistics to the
        model's."""
        if streamer is not None:
            streamer.end()
        work = {key: [a - b for a, b in zip(values, self.prefill[key], strict=True)]
                for key, values in self.state.work.items()}
        charge(self.stats, self.ee_model.costs, work, self.tally, decode_tokens, plain_steps)
        self.ee_model.exit_stats.add(self.stats)
        return self.stats


@dataclass
class Climb:
    """Where the rows of one `climb` left."""

    exit_index: Tensor  # (n,) long: the exit each row left at (`num_exits`: none fired)
    logits: Tensor  # (n, vocab) float32: the exiting head's scores over the model vocabulary (rows that left)
    depth: int | None  # the layer every row had left by, or None when some row passed every checked exit
    num_exits: int

    @property
    def fired(self) -> Tensor:
        """`(n,)` bool: the row left at some exit."""
        return self.exit_index < self.num_exits


def _ask_head(run: DecodeRun, rule: ExitRule, j: int, head, read: Tensor, hidden: Tensor,
              previous: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exit `j`'s head on the rows it is asked for: `read` `(m, hidden)` what the head reads (its context block's
    output for a context head), `hidden` / `previous` the rows' states for the rule's metric. Counts the head's work.

    Returns:
        `(head_logits (m, head_vocab), fire (m,) bool)`.
    """
    tally = run.tally
    started = time.perf_counter()
    head_logits = head.logits_from(read)
    tally.head_tokens[j] += len(read)
    tally.head_calls[j] += 1
    fire = rule.fires(j, head, head_logits, hidden, previous)
    tally.head_seconds += time.perf_counter() - started
    return head_logits, fire


def row_climb(run: DecodeRun, todo: Tensor, tokens: Tensor, propagate: bool = False) -> Climb:
    """`climb` with row-sparse depth (on `run.sparse`): each row in `todo` `(n,)` bool climbs the checked exits only
    until its own exit fires; rows not in `todo` run nothing. `propagate`: a row that leaves fills its skipped
    layers' keys and values at once (`kv_fill="propagate"`). `depth` is always `None`."""
    model, rule, sparse = run.ee_model, run.rule, run.sparse
    n, num_exits, device = todo.shape[0], rule.num_exits, todo.device
    vocab_size = model.engine.config.vocab_size
    index = torch.full((n,), num_exits, dtype=torch.long, device=device)
    logits = torch.empty(n, vocab_size, dtype=torch.float32, device=device)
    previous = model.get_input_embeddings()(tokens) if rule.needs_hidden else None  # (n, hidden)
    active = todo.nonzero().squeeze(1)  # rows no exit has taken yet
    for j, (layer, head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
        if j > rule.last or not len(active):
            break
        if not rule.checked[j] and not rule.needs_hidden:
            continue
        hidden = sparse.climb(active, layer)  # (m, hidden): the newest slot of each active row after `layer`
        if rule.checked[j]:
            read = sparse.context_out[head.context_slot][active] if head.has_context else hidden
            head_logits, fire = _ask_head(run, rule, j, head, read, hidden,
                                          previous[active] if previous is not None else None)
            left = active[fire]
            if len(left):
                index[left] = j
                logits[left] = head.vocab_scores(head_logits[fire], vocab_size, other="drop")
                if propagate:
                    sparse.fill_kv(left, layer)
            active, hidden = active[~fire], hidden[~fire]
        if previous is not None:
            previous[active] = hidden
    return Climb(index, logits, None, num_exits)


def climb(run: DecodeRun, todo: Tensor, tokens: Tensor, rule: ExitRule | None = None) -> Climb:
    """Run the newest position of `run.state` up the checked exits; each row in `todo` `(n,)` bool leaves at the
    first exit that fires (the rule), others ride along. Stops at the exit by which every row in `todo` has left.

    Args:
        tokens: `(n,)` the newest tokens (the first exit's hidden-state similarity compares with their embedding).
        rule: another rule than the call's (a drafter of its own, e.g. the bench's oracle).
    """
    model = run.ee_model
    rule = rule or run.rule
    engine = model.engine
    n, num_exits = todo.shape[0], rule.num_exits
    vocab_size = engine.config.vocab_size
    index = torch.full((n,), num_exits, dtype=torch.long, device=todo.device)
    index[~todo] = -1  # rows not asking never leave (and are never looked at)
    logits = torch.empty(n, vocab_size, dtype=torch.float32, device=todo.device)
    previous = model.get_input_embeddings()(tokens) if rule.needs_hidden else None
    for j, (layer, head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
        if j > rule.last:
            break
        if not rule.checked[j] and not rule.needs_hidden:
            continue
        hidden = engine.run_to(run.state, layer)[:, -1]  # (n, hidden): the newest token after `layer` layers
        if rule.checked[j]:
            rows = (index == num_exits).nonzero().squeeze(1)
            # a context head reads its block's output, which has seen every earlier position (its own cache)
            read = run.state.context_out[head.context_slot][:, -1] if head.has_context else hidden
            head_logits, fire = _ask_head(run, rule, j, head, read[rows], hidden[rows],
                                          previous[rows] if previous is not None else None)
            index[rows] = take_first(index[rows], j, fire, num_exits)
            left = rows[fire]
            if len(left):
                logits[left] = head.vocab_scores(head_logits[fire], vocab_size, other="drop")
            if not bool((index == num_exits).any()):
                return Climb(index.where(todo, num_exits), logits, layer, num_exits)
        previous = hidden
    return Climb(index.where(todo, num_exits), logits, None, num_exits)
