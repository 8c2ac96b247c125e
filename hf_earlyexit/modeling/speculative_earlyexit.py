"""Dynamic self-speculative decoding (DSSD, lossless) with the exit heads (portable: torch + transformers + siblings).

A round feeds the last emitted token, then drafts: at each draft position a row asks its drafters in order (prompt
lookup when on, then the exit heads, which run the layers up to the first exit that fires under the exit rule) and
takes the first proposal; a row's draft ends at the first position with none (the full model produces that token) or
at its draft cap. One pass of the remaining layers then verifies every drafted position at once: the layers a draft
already ran are not recomputed (the engine's lagging layers keep them), only the deeper ones. The longest prefix the
full model agrees with is kept, plus the full model's own next token; rejected positions are cut from every layer of
the one KV cache.

    round = feed last token -> draft -> verify -> accept -> update cache

Greedy output equals plain greedy decoding; with sampling, drafts are accepted with probability min(1, p/q) and a
rejection resamples from the residual max(0, p − q), so tokens follow the base model's distribution exactly.

Rows of a batch accept different numbers of tokens: after each round every row keeps its own accepted prefix and
shorter rows are shifted right behind left padding, so each row stays one contiguous sequence. With a batch
(`batch_exit`):

- `"step"`: every draft position is a batch step; rows that stopped drafting carry a filler through the
  layers the others run, and every row verifies as many positions as the longest draft.
- `"row"` (default; row-sparse, `rows_earlyexit.py`): a row runs layers only for its own positions: it climbs the
  exits only until its own head fires, a row that stopped drafting appends nothing (its slot stays a masked hole),
  and the verify pass runs each row's own drafts (right-aligned; shorter rows pad only up to the longest row *in
  that layer call*).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .drafters_earlyexit import Drafter, DraftLength, HeadDrafter, LookupDrafter
from .loop_earlyexit import DecodeRun, check_search, pick, run_decoding_loop
from .options_earlyexit import DecodingOptions
from .rows_earlyexit import RowSparse
from .stats_earlyexit import EarlyExitGenerateOutput, ExitStats


class _Emitter:
    """Hands accepted tokens to the output one column at a time, the way HF decoding grows `input_ids`.

    Rows accept different numbers of tokens per round; each row's accepted tokens wait in its queue, and a column
    is emitted whenever every unfinished row has a token waiting. Stopping criteria (EOS, stop strings, lengths,
    a caller's own batch-aware criteria) then see the whole batch exactly as in plain decoding; finished rows get
    padding.
    """

    def __init__(self, input_ids: Tensor, stopping_criteria, streamer, pad: int, pad_finished: bool,
                 stats: ExitStats) -> None:
        self.input_ids = input_ids
        self.queues: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.trace: list[Tensor] = []
        self.stopping_criteria, self.streamer, self.pad = stopping_criteria, streamer, pad
        self.pad_finished = pad_finished
        self.stats = stats

    def pending(self, row: int) -> list[int]:
        return [t for t, _ in self.queues[row]]

    def ids(self, row: int) -> list[int]:
        """The row's emitted tokens and those waiting."""
        return self.input_ids[row].tolist() + self.pending(row)

    def length(self, row: int) -> int:
        return self.input_ids.shape[1] + len(self.queues[row])

    def push(self, row: int, tokens: list[tuple[int, int]]) -> None:
        self.queues[row].extend(tokens)

    def needs_tokens(self, row: int) -> bool:
        """Whether the row still takes real tokens: unfinished, or finished without EOS padding (HF then keeps
        generating for it until every row has finished)."""
        return bool(self.unfinished[row]) or not self.pad_finished

    def flush(self) -> None:
        """Emit every complete column."""
        rows = range(len(self.queues))
        while bool(self.unfinished.any()) and all(self.queues[r] for r in rows if self.needs_tokens(r)):
            tokens, exits = [], []
            for r in rows:
                if not self.needs_tokens(r):
                    tokens.append(self.pad)
                    exits.append(-1)
                    continue
                token, exit_index = self.queues[r].pop(0)
                if self.unfinished[r]:
                    self.stats.tokens += 1
                    self.stats.exit_counts[exit_index] += 1
                else:
                    exit_index = -1
                tokens.append(token)
                exits.append(exit_index)
            column = torch.tensor(tokens, dtype=self.input_ids.dtype, device=self.input_ids.device)
            self.input_ids = torch.cat([self.input_ids, column[:, None]], dim=1)
            self.trace.append(torch.tensor(exits, device=self.input_ids.device))
            if self.streamer is not None:
                self.streamer.put(column.cpu())
            self.unfinished = self.unfinished & ~self.stopping_criteria(self.input_ids, None)
            for r in rows:
                if not self.needs_tokens(r):
                    self.queues[r].clear()


@dataclass
class _Round:
    """Fixed inputs of one generate call's rounds."""

    run: DecodeRun
    drafters: list[Drafter]
    processors: object
    do_sample: bool
    pad: int
    max_draft: int

    @property
    def num_exits(self) -> int:
        return self.run.rule.num_exits


@dataclass
class _Drafts:
    """What one round drafted, per draft position `(n,)` tensors over the round's rows."""

    made: Tensor  # (n,) long: drafts per row (contiguous from the round's start)
    tokens: list[Tensor] = field(default_factory=list)
    exits: list[Tensor] = field(default_factory=list)  # exit index of each draft (num_exits: not from a head)
    sources: list[Tensor] = field(default_factory=list)  # (n,) long: index of the drafter that proposed it
    probs: list[Tensor | None] = field(default_factory=list)  # (n, vocab) draft distribution q when sampling


def _draft(ctx: _Round, history: list[list[int]], last: Tensor, room: Tensor) -> _Drafts:
    """Draft: at each position the rows still drafting ask the drafters in order and take the first proposal; a
    row's draft ends at its first position with none, or when its room is used up."""
    drafts = _Drafts(made=torch.zeros_like(last))
    drafting = room > 0
    newest = last
    while bool(drafting.any()) and len(drafts.tokens) < ctx.max_draft:
        source = torch.full_like(newest, -1)
        exits = torch.full_like(newest, ctx.num_exits)
        proposals = []
        for d, drafter in enumerate(ctx.drafters):
            wanted = drafting & (source < 0)
            proposal = drafter.propose(wanted, newest, history)
            taken = wanted & proposal.ok
            source[taken] = d
            exits[taken] = proposal.exits[taken]
            proposals.append(proposal)
        ok = source >= 0
        if not bool(ok.any()):
            break
        token, probs = _choose(ctx, proposals, source, history)
        drafts.tokens.append(token)
        drafts.exits.append(exits)
        drafts.sources.append(source)
        drafts.probs.append(probs)
        drafts.made += ok.long()
        drafting = ok & (room > len(drafts.tokens))
        newest = token
        _append(ctx.run, token, ok)  # row-sparse: rows without a draft leave a hole, never computed
        for i in ok.nonzero().squeeze(1).tolist():
            history[i].append(int(token[i]))
    return drafts


def _choose(ctx: _Round, proposals: list, source: Tensor, history: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    """`(n,)` draft tokens (a filler `pad` for rows without a proposal) and, when sampling, `(n, vocab)` their draft
    distributions q (a drafter's processed softmax; one-hot for a fixed token)."""
    n = source.shape[0]
    token = torch.full_like(source, ctx.pad)
    vocab = ctx.run.first_logits.shape[-1]
    probs = torch.zeros(n, vocab, dtype=torch.float32, device=source.device) if ctx.do_sample else None
    for d, proposal in enumerate(proposals):
        rows = (source == d).nonzero().squeeze(1)
        if not len(rows):
            continue
        if proposal.tokens is not None:
            token[rows] = proposal.tokens[rows]
            if probs is not None:
                probs[rows, proposal.tokens[rows]] = 1.0
            continue
        scores = proposal.scores[rows]  # (m, vocab)
        if ctx.processors is not None:
            scores = torch.cat([ctx.processors(torch.tensor([history[i]], device=scores.device), scores[k: k + 1])
                                for k, i in enumerate(rows.tolist())])
        token[rows] = pick(scores, ctx.do_sample)
        if probs is not None:
            probs[rows] = torch.softmax(scores, dim=-1)
    if probs is not None:
        idle = (source < 0).nonzero().squeeze(1)
        probs[idle, ctx.pad] = 1.0  # rows that stopped drafting: a filler, never verified
    return token, probs


@dataclass
class _Verdict:
    """The full model's view of one round's positions `(n, m + 1)`: its own tokens (greedy without logits
    processors, where only the argmax matters) or its float32 logits `(n, m + 1, vocab)` (zeros where unneeded)."""

    picks: Tensor | None = None
    logits: Tensor | None = None


def _verify(ctx: _Round, made: list[int], drafted: int) -> _Verdict:
    """One pass of the remaining layers over every position of the round, read at the positions each row needs (its
    drafts and the one after them)."""
    engine, sparse = ctx.run.ee_model.engine, ctx.run.sparse
    if sparse is not None:  # each row's own positions only: its newest token and its drafts
        outputs = sparse.climb(torch.arange(len(made), device=ctx.run.state.attention_mask.device),
                               engine.num_layers, every=True)
        ctx.run.stats.wasted_layer_tokens += sparse.padding
        sparse.padding = 0
        hidden = torch.cat(outputs)  # (sum of made + 1, hidden)
        device, n = hidden.device, len(made)
    else:
        hidden = engine.run_to(ctx.run.state, engine.num_layers)  # (n, m + 1, hidden)
        device, n = hidden.device, hidden.shape[0]
    needed = torch.arange(drafted + 1, device=device)[None, :] <= torch.tensor(made, device=device)[
        :, None]  # (n, m + 1)
    hidden = hidden if sparse is not None else hidden[needed]  # (needed, hidden)
    ctx.run.tally.final_tokens += int(needed.sum())
    ctx.run.tally.final_calls += 1
    if not ctx.do_sample and ctx.processors is None:
        picks = torch.full((n, drafted + 1), -1, dtype=torch.long, device=device)
        picks[needed] = engine.final_argmax(hidden)  # the argmax of the float32 logits too: widening keeps the order
        return _Verdict(picks=picks)
    final = engine.final_logits(hidden)  # (needed, vocab), the model's dtype
    logits = torch.zeros(n, drafted + 1, final.shape[-1], dtype=torch.float32, device=device)
    logits[needed] = final.float()
    return _Verdict(logits=logits)


def _accept(ctx: _Round, verdict: _Verdict, drafts: _Drafts, i: int, made: int, prefix: list[int]
            ) -> tuple[list[tuple[int, int]], list[int]]:
    """Row `i`'s new tokens `(token, exit index)`: its drafts while the full model agrees (greedy) or accepts them
    (min(1, p/q)), then the full model's own token. Also returns the drafter index of every accepted draft."""
    new, accepted_from = [], []
    for step in range(made + 1):
        target = None  # (1, vocab) processed logits, when the verdict has logits
        if verdict.logits is not None:
            target = verdict.logits[i, step: step + 1]
            if ctx.processors is not None:
                ids = torch.tensor(prefix + [t for t, _ in new], dtype=torch.long, device=target.device)[None]
                target = ctx.processors(ids, target)
        if step == made:  # no draft here: the full model's token (the bonus after all accepted drafts)
            token = int(verdict.picks[i, step]) if target is None else int(pick(target, ctx.do_sample)[0])
            new.append((token, ctx.num_exits))
            break
        draft = int(drafts.tokens[step][i])
        if target is None:
            chosen = int(verdict.picks[i, step])
            correction = None if chosen == draft else chosen
        else:
            correction = _judge(target[0], draft, drafts.probs[step][i] if ctx.do_sample else None)
        if correction is not None:
            new.append((correction, ctx.num_exits))
            break
        new.append((draft, int(drafts.exits[step][i])))
        accepted_from.append(int(drafts.sources[step][i]))
    return new, accepted_from


def _judge(target: Tensor, draft: int, q: Tensor | None) -> int | None:
    """`None` when the full model keeps `draft`, else its own token instead. Greedy (`q` is `None`): keep when the
    draft is the argmax of `target` `(vocab,)`. Sampling: keep with probability min(1, p/q) at the draft, else
    sample from the residual max(0, p - q)."""
    if q is None:
        chosen = int(target.argmax())
        return None if chosen == draft else chosen
    p = torch.softmax(target, dim=-1)
    if float(torch.rand(())) < min(1.0, float(p[draft] / q[draft])):
        return None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return int(torch.multinomial(residual / total, 1)) if total > 0 else int(p.argmax())


def _count(stats: ExitStats, ctx: _Round, drafts: _Drafts, i: int, made: int, accepted_from: list[int]) -> None:
    stats.drafted += made
    stats.accepted += len(accepted_from)
    stats.rounds += 1
    for step in range(made):
        name = ctx.drafters[int(drafts.sources[step][i])].name
        stats.drafted_by[name] = stats.drafted_by.get(name, 0) + 1
    for d in accepted_from:
        name = ctx.drafters[d].name
        stats.accepted_by[name] = stats.accepted_by.get(name, 0) + 1


@torch.no_grad()
def dssd_decode(
    model, input_ids: Tensor, logits_processor, stopping_criteria, generation_config, synced_gpus: bool = False,
    streamer=None, *, ee_model, ee_options: DecodingOptions, ee_drafters: tuple = (), **model_kwargs,
):
    """The decoding loop HF `generate()` calls (as `custom_generate`) for self-speculative decoding.

    `ee_drafters`: factories `(DecodeRun) -> Drafter` of drafters asked before prompt lookup and the heads.
    """
    check_search(generation_config, "self-speculative decoding")
    batch_size, device = input_ids.shape[0], input_ids.device
    run = DecodeRun.start(ee_model, input_ids, model_kwargs, ee_options, rollback=True)
    engine, stats = ee_model.engine, run.stats
    if ee_options.rows_sparse("dssd") and batch_size > 1:
        run.sparse = RowSparse(engine, run.state)
    pad = generation_config._pad_token_tensor
    pad = int(pad) if pad is not None else 0
    drafters = [make(run) for make in ee_drafters]
    if ee_options.lookup:
        drafters.append(LookupDrafter(ee_options.lookup, pad, run.rule.num_exits))
    ctx = _Round(run, [*drafters, HeadDrafter(run)], logits_processor if len(logits_processor) else None,
                 generation_config.do_sample, pad, ee_options.max_draft)
    max_length = generation_config.max_length
    eos = generation_config._eos_token_tensor
    eos_ids = set(eos.reshape(-1).tolist()) if eos is not None else set()
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    out = _Emitter(input_ids, stopping_criteria, streamer, pad, has_eos, stats)

    scores = ctx.processors(input_ids, run.first_logits) if ctx.processors else run.first_logits
    for row, token in enumerate(pick(scores, ctx.do_sample).tolist()):
        out.push(row, [(token, run.rule.num_exits)])
    out.flush()

    def generating(row: int) -> bool:
        """Still worth drafting for: unfinished, below the length limit, no EOS waiting in its queue."""
        return (out.needs_tokens(row) and bool(out.unfinished.any()) and out.length(row) < max_length
                and not (eos_ids and eos_ids & set(out.pending(row))))

    length = DraftLength(batch_size, ee_options.max_draft, ee_options.adaptive_draft)
    rows = [r for r in range(batch_size) if generating(r)]
    if len(rows) < batch_size and rows:
        _select(run, torch.tensor(rows, device=device))
    clock = {"draft": 0.0, "verify": 0.0, "bookkeeping": 0.0}
    while rows:
        started = time.perf_counter()
        # feed the last token, then draft: a row drafts at most its cap and until its length limit (the round also
        # adds the full model's own token)
        history = [out.ids(r) for r in rows]  # each row's tokens so far, drafts appended as made
        prefixes = [list(h) for h in history] if ctx.processors is not None else None
        last = torch.tensor([h[-1] for h in history], device=device)
        base = run.state.length
        _append(run, last)
        room = torch.tensor([min(length.room(r), max_length - out.length(r) - 1) for r in rows], device=device)
        drafts = _draft(ctx, history, last, room)
        drafted_at = time.perf_counter()
        clock["draft"] += drafted_at - started

        made = drafts.made.tolist()
        verdict = _verify(ctx, made, len(drafts.tokens))
        verified_at = time.perf_counter()
        clock["verify"] += verified_at - drafted_at

        ends = []
        for i, row in enumerate(rows):
            new, accepted_from = _accept(ctx, verdict, drafts, i, made[i], prefixes[i] if prefixes else [])
            _count(stats, ctx, drafts, i, made[i], accepted_from)
            length.update(row, made[i], len(accepted_from))
            out.push(row, new)
            ends.append(base + len(accepted_from) + 1)
        stats.steps += 1
        if run.sparse is not None:  # update the cache: keep accepted positions
            run.sparse.compact(torch.tensor(ends, device=device))
        else:
            engine.compact(run.state, torch.tensor(ends, device=device))
        out.flush()
        keep = [i for i, row in enumerate(rows) if generating(row)]
        if len(keep) < len(rows):
            rows = [rows[i] for i in keep]
            if rows:
                _select(run, torch.tensor(keep, device=device))
        clock["bookkeeping"] += time.perf_counter() - verified_at
    out.flush()

    plain_steps = out.input_ids.shape[1] - input_ids.shape[1] - 1  # one batch pass per column after the first
    stats.seconds = {**clock, "heads": run.tally.head_seconds}
    run.finish(streamer, stats.tokens - batch_size, plain_steps)
    if not generation_config.return_dict_in_generate:
        return out.input_ids
    exits = torch.stack(out.trace, dim=1) if out.trace else None
    return EarlyExitGenerateOutput(sequences=out.input_ids, exit_stats=stats, exit_index=exits)


def _append(run: DecodeRun, tokens: Tensor, take: Tensor | None = None) -> None:
    """Append `tokens` `(n,)` to the run's rows; under the row rule only the rows in `take` `(n,)` bool (default:
    all) take theirs, the others leave a masked hole. Under the step rule every row appends (a filler where it
    drafts nothing)."""
    if run.sparse is not None:
        run.sparse.append(tokens, take)
    else:
        run.ee_model.engine.append(run.state, tokens[:, None])


def _select(run: DecodeRun, keep: Tensor) -> None:
    """Keep only rows `keep` of the run's state (finished rows leave the batch)."""
    if run.sparse is not None:
        run.sparse.select(keep)
        run.state = run.sparse.state
    else:
        run.state = run.ee_model.engine.select_rows(run.state, keep)


def dssd_generate(ee_model, inputs: Tensor | None, options: DecodingOptions, drafters: tuple = (), **kwargs):
    """`generate()` with self-speculative decoding: HF prepares everything, `dssd_decode` runs the loop.

    `options.lookup > 0` also drafts by prompt lookup (n-grams up to `lookup` tokens matched in the sequence so far):
    a position whose suffix occurred before takes the token that followed it, at no layer cost; the heads draft the
    others. `drafters`: factories `(DecodeRun) -> Drafter` of your own drafters, asked first. Verification is
    unchanged, so the output is still the base model's.
    """
    return run_decoding_loop(ee_model, dssd_decode, "self-speculative decoding", inputs, options, kwargs,
                             ee_drafters=tuple(drafters))
