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
    do_sample = generation_config.do_sample
    processors = logits_processor if len(logits_processor) else None
    pad = generation_config._pad_token_tensor
    pad = int(pad) if pad is not None else 0
    max_length = generation_config.max_length
    device = input_ids.device

    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    state = engine.start(input_ids, mask, rollback=True)
    first = engine.final_logits(engine.run_to(state, num_layers)[:, -1]).float()  # (batch, vocab)
    prefill = {key: list(values) for key, values in state.work.items()}
    stats = ExitStats(exit_layers=exit_layers, num_layers=num_layers, checked_exits=[
        layer for layer, on in zip(exit_layers, plan.active, strict=True) if on
    ])
    tally = Tally([0] * num_exits, [0] * num_exits)

    eos = generation_config._eos_token_tensor
    eos_ids = set(eos.reshape(-1).tolist()) if eos is not None else set()
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    out = _Emitter(input_ids, stopping_criteria, streamer, pad, has_eos, stats)

    scores = processors(input_ids, first) if processors else first
    for row, token in enumerate(_pick(scores, do_sample).tolist()):
        out.push(row, [(token, num_exits)])
    out.flush()

    def generating(row: int) -> bool:
        """Still worth drafting for: unfinished, below the length limit, no EOS waiting in its queue."""
        return (out.needs_tokens(row) and bool(out.unfinished.any()) and out.length(row) < max_length
                and not (eos_ids and eos_ids & set(out.pending(row))))

    rows = [r for r in range(batch_size) if generating(r)]
    if len(rows) < batch_size and rows:
        state = engine.select_rows(state, torch.tensor(rows, device=device))
    clock = {"draft": 0.0, "verify": 0.0, "bookkeeping": 0.0}
    while rows:
        started = time.perf_counter()
        n = len(rows)
        last = torch.tensor([int(out.ids(r)[0, -1]) for r in rows], device=device)
        base = state.length
        engine.append(state, last[:, None])
        # a row drafts at most until its length limit (the round also adds the full model's own token)
        room = torch.tensor([max_length - out.length(r) - 1 for r in rows], device=device)
        drafting = room > 0
        made = torch.zeros(n, dtype=torch.long, device=device)  # real drafts per row (contiguous from the start)
        drafts, draft_exit, draft_probs = [], [], []
        newest = last
        while bool(drafting.any()) and len(drafts) < ee_max_draft:
            result = exit_cascade(ee_model, state, plan, drafting, newest, tally)
            ok = drafting & result.fired
            if not bool(ok.any()):
                break
            head_scores = result.logits  # (n, vocab); rows that fired hold their head's logits
            probs = None
            if processors is not None:
                head_scores = head_scores.clone()
                for i in ok.nonzero().squeeze(1).tolist():
                    prefix = out.ids(rows[i], [int(t[i]) for t in drafts])
                    head_scores[i] = processors(prefix, head_scores[i: i + 1])[0]
            if do_sample:
                probs = torch.softmax(head_scores, dim=-1)
                probs = torch.where(ok[:, None], probs, torch.zeros_like(probs))
                probs[~ok, pad] = 1.0  # rows that stopped drafting: a filler, never verified
                token = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                token = torch.where(ok, head_scores.argmax(dim=-1), torch.full_like(newest, pad))
            drafts.append(token)
            draft_exit.append(result.exit_index)
            draft_probs.append(probs)
            made += ok.long()
            drafting = ok & (room > len(drafts))
            newest = token
            engine.append(state, token[:, None])

        # verify every position of the round with the remaining layers, in one pass
        drafted_at = time.perf_counter()
        clock["draft"] += drafted_at - started
        hidden = engine.run_to(state, num_layers)  # (n, m + 1, hidden)
        m = len(drafts)
        made = made.tolist()
        needed = torch.tensor([[p <= made[i] for p in range(m + 1)] for i in range(n)], device=device)
        logits = torch.zeros(n, m + 1, first.shape[-1], dtype=torch.float32, device=device)
        logits[needed] = engine.final_logits(hidden[needed]).float()
        tally.final_tokens += int(needed.sum())
        tally.final_calls += 1
        verified_at = time.perf_counter()
        clock["verify"] += verified_at - drafted_at

        ends = []
        for i, row in enumerate(rows):
            accepted, new = 0, []  # new: (token, exit index)
            for step in range(made[i] + 1):
                target = logits[i, step: step + 1]
                if processors is not None:
                    target = processors(out.ids(row, [t for t, _ in new]), target)
                if step == made[i]:  # no draft here: the full model's token (the bonus after all accepted drafts)
                    new.append((int(_pick(target, do_sample)[0]), num_exits))
                    break
                draft = int(drafts[step][i])
                if do_sample:
                    p = torch.softmax(target[0], dim=-1)
                    q = draft_probs[step][i]
                    if float(torch.rand(())) < min(1.0, float(p[draft] / q[draft])):
                        new.append((draft, int(draft_exit[step][i])))
                        accepted += 1
                        continue
                    residual = (p - q).clamp(min=0)
                    total = residual.sum()
                    token = int(torch.multinomial(residual / total, 1)) if total > 0 else int(p.argmax())
                    new.append((token, num_exits))
                    break
                chosen = int(target[0].argmax())
                if chosen == draft:
                    new.append((draft, int(draft_exit[step][i])))
                    accepted += 1
                    continue
                new.append((chosen, num_exits))
                break
            stats.drafted += made[i]
            stats.accepted += accepted
            stats.rounds += 1
            out.push(row, new)
            ends.append(base + accepted + 1)
        stats.steps += 1
        engine.compact(state, torch.tensor(ends, device=device))
        out.flush()
        keep = [i for i, row in enumerate(rows) if generating(row)]
        if len(keep) < n:
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
    exit_policy: str = "auto", **kwargs,
):
    """`generate()` with self-speculative decoding: HF prepares everything, `dssd_decode` runs the loop."""
    if not isinstance(max_draft, int) or max_draft < 1:
        raise ValueError(f"max_draft={max_draft!r} must be a positive integer")
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy={exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
    ee_model.thresholds_for(eps)  # checks eps and that the heads are calibrated, before any work
    return run_decoding_loop(ee_model, dssd_decode, "self-speculative decoding", inputs, kwargs,
                             ee_eps=float(eps), ee_max_draft=max_draft, ee_exit_policy=exit_policy)
