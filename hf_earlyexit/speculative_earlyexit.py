"""Dynamic self-speculative decoding (DSSD, lossless) with the exit heads (portable: torch + transformers + siblings).

A round feeds the last emitted token, then drafts: each draft token runs the layers up to the first exit whose head
is confident at ε (the same thresholds as early exit) and takes that head's token; the draft ends at the first
position where no head is confident (the full model produces that token) or at the draft cap. One pass of the
remaining layers then verifies every drafted position at once: the layers a draft already ran are not recomputed
(the engine's lagging layers keep them), only the deeper ones. The longest prefix the full model agrees with is kept,
plus the full model's own next token; rejected positions are cut from every layer of the one KV cache.

Greedy output equals plain greedy decoding; with sampling, drafts are accepted with probability min(1, p/q) and a
rejection resamples from the residual max(0, p − q), so tokens follow the base model's distribution exactly.

Rows of a batch accept different numbers of tokens: after each round every row keeps its own accepted prefix and
shorter rows are shifted right behind left padding, so each row stays one contiguous sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decoding_earlyexit import (
    EXIT_POLICIES,
    EarlyExitGenerateOutput,
    ExitPlan,
    ExitStats,
    Tally,
    _costs,
    exit_cascade,
    finish_stats,
    run_decoding_loop,
)

DEFAULT_MAX_DRAFT = 16
FIRST_CAP = 4  # adaptive drafting: the cap of a row's first round


def next_cap(cap: int, drafted: int, accepted: int, max_draft: int) -> int:
    """The draft cap after a round: doubled (up to `max_draft`) when the round drafted its cap and the full model
    kept everything, else one more than the round accepted when a draft was rejected (verifying a position costs
    compute on a CPU, so drafts the model will not keep are not free), else unchanged."""
    if accepted < drafted:
        return max(1, min(max_draft, accepted + 1))
    if drafted >= cap:
        return min(max_draft, 2 * cap)
    return cap


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

    def ids(self, row: int, extra: list[int] = ()) -> Tensor:
        """`(1, len)`: the row's emitted tokens, those waiting, and `extra`."""
        tail = torch.tensor(self.pending(row) + list(extra), dtype=self.input_ids.dtype, device=self.input_ids.device)
        return torch.cat([self.input_ids[row], tail])[None]

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


def _pick(scores: Tensor, do_sample: bool) -> Tensor:
    """`(n, vocab)` processed scores -> `(n,)` tokens (argmax, or a sample of their softmax)."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def lookup_token(history: list[int], max_ngram: int, pad: int) -> int:
    """Prompt lookup: the token that followed the latest earlier occurrence of the longest suffix n-gram of
    `history` (n from `max_ngram` down to 2, or 1 when `max_ngram` is 1), or -1 when no suffix occurred before (or
    it was followed by `pad`). Single-token matches are not used beside longer ones: on the embedded model they are
    kept by the full model far less often (lookup acceptance 0.72 with them, 0.85 without) and push the heads'
    better drafts aside."""
    length = len(history)
    shortest = min(2, max_ngram)
    for n in range(min(max_ngram, length - 1), shortest - 1, -1):
        suffix = history[length - n:]
        for begin in range(length - n - 1, -1, -1):
            if history[begin: begin + n] == suffix:
                token = history[begin + n]
                if token != pad:
                    return token
                break
    return -1


@dataclass
class _Drafts:
    """What one round drafted, per step `(n,)` tensors over the round's rows."""

    made: Tensor  # (n,) long: real drafts per row (contiguous from the round's start)
    tokens: list[Tensor] = field(default_factory=list)
    exits: list[Tensor] = field(default_factory=list)  # exit index of each draft (len(exits): prompt lookup)
    looked_up: list[Tensor] = field(default_factory=list)  # (n,) bool: the draft came from prompt lookup
    probs: list[Tensor | None] = field(default_factory=list)  # (n, vocab) draft distribution q when sampling


@dataclass
class _Round:
    """Fixed inputs of one generate call's rounds."""

    ee_model: object
    plan: ExitPlan
    tally: Tally
    processors: object
    do_sample: bool
    pad: int
    num_exits: int
    max_draft: int
    lookup: int


def _draft(ctx: _Round, state, history: list[list[int]], last: Tensor, room: Tensor) -> _Drafts:
    """Draft: each step, a row takes its prompt-lookup token when lookup is on and finds one, else runs up the exits
    and takes the first confident head's token; a row's draft ends at its first step with neither."""
    engine = ctx.ee_model.engine
    n = last.shape[0]
    drafts = _Drafts(made=torch.zeros(n, dtype=torch.long, device=last.device))
    drafting = room > 0
    newest = last
    while bool(drafting.any()) and len(drafts.tokens) < ctx.max_draft:
        looked = torch.full_like(newest, -1)
        if ctx.lookup:
            for i in drafting.nonzero().squeeze(1).tolist():
                looked[i] = lookup_token(history[i], ctx.lookup, ctx.pad)
        from_lookup = drafting & (looked >= 0)
        need_head = drafting & ~from_lookup
        fired = torch.zeros_like(drafting)
        exit_index = torch.full_like(newest, ctx.num_exits)
        head_scores = None
        if bool(need_head.any()):
            result = exit_cascade(ctx.ee_model, state, ctx.plan, need_head, newest, ctx.tally)
            fired, exit_index, head_scores = need_head & result.fired, result.exit_index, result.logits
        ok = from_lookup | fired
        if not bool(ok.any()):
            break
        token, probs = _draft_tokens(ctx, head_scores, fired, from_lookup, looked, history)
        drafts.tokens.append(token)
        drafts.exits.append(torch.where(from_lookup, ctx.num_exits, exit_index))
        drafts.looked_up.append(from_lookup)
        drafts.probs.append(probs)
        drafts.made += ok.long()
        drafting = ok & (room > len(drafts.tokens))
        newest = token
        engine.append(state, token[:, None])
        for i in ok.nonzero().squeeze(1).tolist():
            history[i].append(int(token[i]))
    return drafts


def _draft_tokens(ctx: _Round, head_scores: Tensor | None, fired: Tensor, from_lookup: Tensor, looked: Tensor,
                  history: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    """`(n,)` draft tokens (a filler `pad` for rows that stopped) and, when sampling, `(n, vocab)` their draft
    distributions q (a head's processed softmax; one-hot for a looked-up token)."""
    n = fired.shape[0]
    if head_scores is not None and ctx.processors is not None:
        head_scores = head_scores.clone()
        for i in fired.nonzero().squeeze(1).tolist():
            prefix = torch.tensor(history[i], dtype=torch.long, device=head_scores.device)[None]
            head_scores[i] = ctx.processors(prefix, head_scores[i: i + 1])[0]
    token = torch.where(from_lookup, looked, torch.full_like(looked, ctx.pad))
    if not ctx.do_sample:
        if head_scores is not None:
            token = torch.where(fired, head_scores.argmax(dim=-1), token)
        return token, None
    vocab = ctx.ee_model.engine.config.vocab_size
    probs = torch.zeros(n, vocab, dtype=torch.float32, device=fired.device)
    if head_scores is not None:
        probs[fired] = torch.softmax(head_scores[fired], dim=-1)
    rows = from_lookup.nonzero().squeeze(1)
    probs[rows, looked[rows]] = 1.0
    idle = ~(fired | from_lookup)
    probs[idle, ctx.pad] = 1.0  # rows that stopped drafting: a filler, never verified
    sampled = torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.where(fired, sampled, token), probs


@dataclass
class _Verdict:
    """The full model's view of one round's positions `(n, m + 1)`: its own tokens (greedy without logits
    processors, where only the argmax matters) or its float32 logits `(n, m + 1, vocab)` (zeros where unneeded)."""

    picks: Tensor | None = None
    logits: Tensor | None = None


def _verify(ctx: _Round, state, made: list[int], drafted: int, vocab: int) -> _Verdict:
    """One pass of the remaining layers over every position of the round, read at the positions each row needs (its
    drafts and the one after them)."""
    engine = ctx.ee_model.engine
    hidden = engine.run_to(state, engine.num_layers)  # (n, m + 1, hidden)
    n = hidden.shape[0]
    needed = torch.arange(drafted + 1, device=hidden.device)[None, :] <= torch.tensor(made, device=hidden.device)[
        :, None]  # (n, m + 1)
    final = engine.final_logits(hidden[needed])  # (needed, vocab), the model's dtype
    ctx.tally.final_tokens += int(needed.sum())
    ctx.tally.final_calls += 1
    if not ctx.do_sample and ctx.processors is None:
        picks = torch.full((n, drafted + 1), -1, dtype=torch.long, device=hidden.device)
        picks[needed] = final.argmax(dim=-1)  # the argmax of the float32 logits too: widening keeps the order
        return _Verdict(picks=picks)
    logits = torch.zeros(n, drafted + 1, vocab, dtype=torch.float32, device=hidden.device)
    logits[needed] = final.float()
    return _Verdict(logits=logits)


def _accept(ctx: _Round, verdict: _Verdict, drafts: _Drafts, i: int, made: int, prefix: list[int]
            ) -> tuple[list[tuple[int, int]], int, int]:
    """Row `i`'s new tokens `(token, exit index)`: its drafts while the full model agrees (greedy) or accepts them
    (min(1, p/q)), then the full model's own token. Returns them with the accepted draft and lookup counts."""
    new, accepted, looked_up = [], 0, 0
    for step in range(made + 1):
        target = None  # (1, vocab) processed logits, when the verdict has logits
        if verdict.logits is not None:
            target = verdict.logits[i, step: step + 1]
            if ctx.processors is not None:
                ids = torch.tensor(prefix + [t for t, _ in new], dtype=torch.long, device=target.device)[None]
                target = ctx.processors(ids, target)
        if step == made:  # no draft here: the full model's token (the bonus after all accepted drafts)
            token = int(verdict.picks[i, step]) if target is None else int(_pick(target, ctx.do_sample)[0])
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
        accepted += 1
        looked_up += int(drafts.looked_up[step][i])
    return new, accepted, looked_up


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


@torch.no_grad()
def dssd_decode(
    model,
    input_ids: Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    *,
    ee_model,
    ee_eps: float,
    ee_max_draft: int = DEFAULT_MAX_DRAFT,
    ee_exit_policy: str = "auto",
    ee_lookup: int = 0,
    ee_adaptive: bool = True,
    **model_kwargs,
):
    """The decoding loop HF `generate()` calls (as `custom_generate`) for self-speculative decoding."""
    if generation_config.num_beams > 1:
        beams = generation_config.num_beams
        raise ValueError(f"self-speculative decoding is greedy or sampling; got num_beams={beams}")
    batch_size = input_ids.shape[0]
    engine = ee_model.engine
    exit_layers = list(ee_model.config.exit_layers)
    num_exits, num_layers = len(exit_layers), engine.num_layers
    plan = ExitPlan.build(ee_model, ee_eps, ee_exit_policy)
    costs = _costs(ee_model)
    processors = logits_processor if len(logits_processor) else None
    pad = generation_config._pad_token_tensor
    pad = int(pad) if pad is not None else 0
    max_length = generation_config.max_length
    device = input_ids.device
    tally = Tally([0] * num_exits, [0] * num_exits)
    ctx = _Round(ee_model, plan, tally, processors, generation_config.do_sample, pad, num_exits, ee_max_draft,
                 ee_lookup)

    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    state = engine.start(input_ids, mask, rollback=True)
    first = engine.final_logits(engine.run_to(state, num_layers)[:, -1]).float()  # (batch, vocab)
    prefill = {key: list(values) for key, values in state.work.items()}
    stats = ExitStats(exit_layers=exit_layers, num_layers=num_layers, checked_exits=[
        layer for layer, on in zip(exit_layers, plan.active, strict=True) if on
    ])

    eos = generation_config._eos_token_tensor
    eos_ids = set(eos.reshape(-1).tolist()) if eos is not None else set()
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    out = _Emitter(input_ids, stopping_criteria, streamer, pad, has_eos, stats)

    scores = processors(input_ids, first) if processors else first
    for row, token in enumerate(_pick(scores, ctx.do_sample).tolist()):
        out.push(row, [(token, num_exits)])
    out.flush()

    def generating(row: int) -> bool:
        """Still worth drafting for: unfinished, below the length limit, no EOS waiting in its queue."""
        return (out.needs_tokens(row) and bool(out.unfinished.any()) and out.length(row) < max_length
                and not (eos_ids and eos_ids & set(out.pending(row))))

    # per row, the most tokens the next round may draft: fixed at `max_draft`, or adapted to what rounds accept
    caps = {r: min(FIRST_CAP, ee_max_draft) if ee_adaptive else ee_max_draft for r in range(batch_size)}
    rows = [r for r in range(batch_size) if generating(r)]
    if len(rows) < batch_size and rows:
        state = engine.select_rows(state, torch.tensor(rows, device=device))
    clock = {"draft": 0.0, "verify": 0.0, "bookkeeping": 0.0}
    while rows:
        started = time.perf_counter()
        history = [out.ids(r)[0].tolist() for r in rows]  # each row's tokens so far, drafts appended as made
        prefixes = [list(h) for h in history] if processors is not None else None
        last = torch.tensor([h[-1] for h in history], device=device)
        base = state.length
        engine.append(state, last[:, None])
        # a row drafts at most its cap and until its length limit (the round also adds the full model's own token)
        room = torch.tensor([min(caps[r], max_length - out.length(r) - 1) for r in rows], device=device)
        drafts = _draft(ctx, state, history, last, room)
        drafted_at = time.perf_counter()
        clock["draft"] += drafted_at - started

        made = drafts.made.tolist()
        verdict = _verify(ctx, state, made, len(drafts.tokens), first.shape[-1])
        verified_at = time.perf_counter()
        clock["verify"] += verified_at - drafted_at

        ends = []
        for i, row in enumerate(rows):
            new, accepted, looked_up = _accept(ctx, verdict, drafts, i, made[i], prefixes[i] if prefixes else [])
            stats.drafted += made[i]
            stats.accepted += accepted
            stats.lookup_drafted += sum(int(d[i]) for d in drafts.looked_up[: made[i]])
            stats.lookup_accepted += looked_up
            stats.rounds += 1
            if ee_adaptive:
                caps[row] = next_cap(caps[row], made[i], accepted, ee_max_draft)
            out.push(row, new)
            ends.append(base + accepted + 1)
        stats.steps += 1
        engine.compact(state, torch.tensor(ends, device=device))
        out.flush()
        keep = [i for i, row in enumerate(rows) if generating(row)]
        if len(keep) < len(rows):
            rows = [rows[i] for i in keep]
            if rows:
                state = engine.select_rows(state, torch.tensor(keep, device=device))
        clock["bookkeeping"] += time.perf_counter() - verified_at
    out.flush()

    if streamer is not None:
        streamer.end()
    decode_tokens = stats.tokens - batch_size
    plain_steps = out.input_ids.shape[1] - input_ids.shape[1] - 1  # one batch pass per column after the first
    finish_stats(stats, costs, state.work, prefill, tally, decode_tokens, plain_steps)
    stats.seconds = {**clock, "heads": tally.head_seconds}
    ee_model.exit_stats.add(stats)
    if not generation_config.return_dict_in_generate:
        return out.input_ids
    exits = torch.stack(out.trace, dim=1) if out.trace else None
    return EarlyExitGenerateOutput(sequences=out.input_ids, exit_stats=stats, exit_index=exits)


def dssd_generate(
    ee_model, inputs: Tensor | None = None, *, eps: float, max_draft: int = DEFAULT_MAX_DRAFT,
    exit_policy: str = "auto", lookup: int = 0, adaptive_draft: bool = True, **kwargs,
):
    """`generate()` with self-speculative decoding: HF prepares everything, `dssd_decode` runs the loop.

    `lookup > 0` also drafts by prompt lookup (n-grams up to `lookup` tokens matched in the sequence so far): a
    position whose suffix occurred before takes the token that followed it, at no layer cost; the heads draft the
    others. Verification is unchanged, so the output is still the base model's.

    `adaptive_draft=True` caps each row's draft at what its recent rounds earned (`next_cap`: from 4, doubled after a
    round kept everything, cut to one past the accepted length after a rejection, never above `max_draft`);
    `False` drafts up to `max_draft` every round (a fixed draft length, as LayerSkip).
    """
    if not isinstance(max_draft, int) or max_draft < 1:
        raise ValueError(f"max_draft={max_draft!r} must be a positive integer")
    if not isinstance(lookup, int) or isinstance(lookup, bool) or lookup < 0:
        raise ValueError(f"lookup={lookup!r} must be a non-negative integer (0: no prompt lookup drafts)")
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy={exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
    ee_model.thresholds_for(eps)  # checks eps and that the heads are calibrated, before any work
    return run_decoding_loop(ee_model, dssd_decode, "self-speculative decoding", inputs, kwargs,
                             ee_eps=float(eps), ee_max_draft=max_draft, ee_exit_policy=exit_policy, ee_lookup=lookup,
                             ee_adaptive=bool(adaptive_draft))
