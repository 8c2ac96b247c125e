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

import functools

import torch
from torch import Tensor

from .decoding_earlyexit import (
    EXIT_POLICIES,
    EarlyExitGenerateOutput,
    ExitPlan,
    ExitStats,
    Tally,
    _costs,
    _move_stop_strings,
    exit_cascade,
    finish_stats,
)

DEFAULT_MAX_DRAFT = 16


class _Rows:
    """Per-row token bookkeeping of a batch whose rows grow at different speeds."""

    def __init__(self, input_ids: Tensor, num_exits: int) -> None:
        self.prompt = input_ids
        self.generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        self.exits: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        self.finished = [False] * input_ids.shape[0]
        self.num_exits = num_exits

    def ids(self, row: int, extra: list[int] = ()) -> Tensor:
        """`(1, len)`: the row's prompt (with its padding), generated tokens and `extra`."""
        tail = torch.tensor(self.generated[row] + list(extra), dtype=self.prompt.dtype, device=self.prompt.device)
        return torch.cat([self.prompt[row], tail])[None]

    def sequences(self, pad: int) -> tuple[Tensor, Tensor]:
        """All rows right-padded with `pad` to one tensor, and the exit of each generated token (-1: padding)."""
        width = max(len(g) for g in self.generated)
        out = torch.full((len(self.generated), width), pad, dtype=self.prompt.dtype, device=self.prompt.device)
        exits = torch.full((len(self.generated), width), -1, dtype=torch.long, device=self.prompt.device)
        for r, (tokens, where) in enumerate(zip(self.generated, self.exits, strict=True)):
            out[r, : len(tokens)] = torch.tensor(tokens, dtype=out.dtype)
            exits[r, : len(where)] = torch.tensor(where, dtype=torch.long)
        return torch.cat([self.prompt, out], dim=1), exits


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
    if streamer is not None and batch_size > 1:
        raise ValueError(f"streaming self-speculative decoding needs batch size 1, got {batch_size}")
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
    book = _Rows(input_ids, num_exits)

    def emit(row: int, token: int, exit_index: int) -> bool:
        """Append one token to `row`; True when the row is finished."""
        book.generated[row].append(token)
        book.exits[row].append(exit_index)
        stats.tokens += 1
        stats.exit_counts[exit_index] += 1
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        done = bool(stopping_criteria(book.ids(row), None)[0])
        book.finished[row] = done
        return done

    scores = processors(input_ids, first) if processors else first
    for row, token in enumerate(_pick(scores, do_sample).tolist()):
        emit(row, token, num_exits)
    rows = [r for r in range(batch_size) if not book.finished[r]]
    if len(rows) < batch_size:
        state = engine.select_rows(state, torch.tensor(rows, device=device))

    while rows:
        n = len(rows)
        last = torch.tensor([book.generated[r][-1] for r in rows], device=device)
        base = state.length
        engine.append(state, last[:, None])
        # a row drafts at most until its length limit (the round also adds the full model's own token)
        room = torch.tensor([max_length - book.ids(r).shape[1] - 1 for r in rows], device=device)
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
                    prefix = book.ids(rows[i], [int(t[i]) for t in drafts])
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
        hidden = engine.run_to(state, num_layers)  # (n, m + 1, hidden)
        m = len(drafts)
        made = made.tolist()
        needed = torch.tensor([[p <= made[i] for p in range(m + 1)] for i in range(n)], device=device)
        logits = torch.zeros(n, m + 1, first.shape[-1], dtype=torch.float32, device=device)
        logits[needed] = engine.final_logits(hidden[needed]).float()
        tally.final_tokens += int(needed.sum())
        tally.final_calls += 1

        ends = []
        for i, row in enumerate(rows):
            accepted, new = 0, []  # new: (token, exit index)
            for step in range(made[i] + 1):
                target = logits[i, step: step + 1]
                if processors is not None:
                    target = processors(book.ids(row, [t for t, _ in new]), target)
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
            for token, exit_index in new:
                if emit(row, token, exit_index):
                    break
            ends.append(base + accepted + 1)
        stats.steps += 1
        engine.compact(state, torch.tensor(ends, device=device))
        keep = [i for i, row in enumerate(rows) if not book.finished[row]]
        if len(keep) < n:
            if not keep:
                break
            state = engine.select_rows(state, torch.tensor(keep, device=device))
            rows = [rows[i] for i in keep]

    if streamer is not None:
        streamer.end()
    decode_tokens = stats.tokens - batch_size
    plain_steps = max(len(g) for g in book.generated) - 1  # one batch pass per token of the longest row
    finish_stats(stats, costs, state.work, prefill, tally, decode_tokens, plain_steps)
    ee_model.exit_stats.add(stats)
    sequences, exits = book.sequences(pad)
    if not generation_config.return_dict_in_generate:
        return sequences
    return EarlyExitGenerateOutput(sequences=sequences, exit_stats=stats, exit_index=exits)


def dssd_generate(
    ee_model, inputs: Tensor | None = None, *, eps: float, max_draft: int = DEFAULT_MAX_DRAFT,
    exit_policy: str = "auto", **kwargs,
):
    """`generate()` with self-speculative decoding: HF prepares everything, `dssd_decode` runs the loop."""
    if not isinstance(max_draft, int) or max_draft < 1:
        raise ValueError(f"max_draft={max_draft!r} must be a positive integer")
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy={exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
    ee_model.thresholds_for(eps)
    for key in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{key} cannot be combined with self-speculative decoding")
    _move_stop_strings(ee_model, kwargs)
    decode = functools.partial(
        dssd_decode, streamer=kwargs.get("streamer"), ee_model=ee_model, ee_eps=float(eps), ee_max_draft=max_draft,
        ee_exit_policy=exit_policy,
    )
    return ee_model.backbone.generate(inputs, custom_generate=decode, **kwargs)
