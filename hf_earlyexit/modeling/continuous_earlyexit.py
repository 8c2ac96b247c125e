"""Continuous batching for early-exit decoding (portable: torch + transformers + siblings).

`generate()` decodes one batch to its end: as rows finish the batch shrinks, and the last long request runs alone.
Here requests wait in a queue and the batch is refilled at the next step whenever rows finish (iteration-level
scheduling, as in Orca / vLLM): the newcomers' prompts run through the full model on their own, the running rows'
pending layers are caught up (`LayerEngine.flush`, work the next deep token would do anyway), and both states are
joined (`LayerEngine.concat_rows`, left-padded to one length). Each step is the early-exit step of `generate()`
(`batch_exit="step"`, `kv_fill` as asked), so a request decodes as it would in any batch: at ε = 1 its tokens are
plain greedy decoding's.

Greedy only; stopping per request: end-of-sequence ids, a token budget, and an optional `stop(request, tokens)`
callback (the harness's stop strings).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .decoding_earlyexit import _step
from .loop_earlyexit import DecodeRun
from .options_earlyexit import DecodingOptions


def _left_pad(prompts: list[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):  # every prompt holds a token (checked by the caller)
        ids[r, length - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
        mask[r, length - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def continuous_generate(
    ee_model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *, batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None, stop: Callable[[int, list[int]], bool] | None = None,
    options: DecodingOptions | None = None, progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy early-exit decoding of many requests with continuous batching.

    Args:
        prompts: token ids of each request (no padding, at least one token each).
        max_new_tokens: the token budget, one for all or one per request.
        batch_size: at most this many requests decode at once.
        eos_token_id: id(s) that end a request (kept in its output, as `generate()` keeps it).
        stop: `stop(i, tokens)` -> True ends request `i` after its newest token (e.g. a stop string).
        options: ε, exit policy and `kv_fill` (`DecodingOptions`, mode `early_exit`; `plain` is ε = 1, the same loop
            without exits); default: early exit at the heads' saved ε. Batches follow the step rule.
        progress: called with the number of requests finished by each step.

    Returns:
        The new tokens of each request, in the order of `prompts`.
    """
    options = options or DecodingOptions(mode="early_exit")
    if options.mode == "dssd" or options.batch_exit == "row":
        raise ValueError(f"continuous batching decodes by early exit with the step rule; got mode={options.mode!r}, "
                         f"batch_exit={options.batch_exit!r}")
    if options.mode == "plain":
        options = DecodingOptions.build(options, mode="early_exit", eps=1.0)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(budgets)} values for {len(prompts)} prompts")
    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty; every request needs at least one token")
        if budget < 1:
            raise ValueError(f"max_new_tokens={budget!r} for prompts[{i}] must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be at least 1")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    engine = ee_model.engine
    device = engine.parts.lm_head.weight.device
    pad = next(iter(eos), 0)
    outputs: list[list[int]] = [[] for _ in prompts]
    pending = deque(range(len(prompts)))
    run: DecodeRun | None = None
    requests: list[int] = []  # engine row -> request
    scores = None  # (rows, vocab) scores of each running row's next token
    exit_index = None  # (rows,) where each running row's next token left (`num_exits`: the full model)
    decoded = steps = 0

    def finished(i: int) -> bool:
        tokens = outputs[i]
        return len(tokens) >= budgets[i] or tokens[-1] in eos or (stop is not None and stop(i, tokens))

    while pending or requests:
        if pending and len(requests) < batch_size:  # refill: newcomers' prompt pass, then join the running rows
            take = [pending.popleft() for _ in range(min(batch_size - len(requests), len(pending)))]
            ids, mask = _left_pad([prompts[i] for i in take], pad, device)
            new = DecodeRun.start(ee_model, ids, {"attention_mask": mask}, options, rollback=True)
            first = torch.full((len(take),), new.rule.num_exits, dtype=torch.long, device=device)
            if run is None:
                run, scores, exit_index = new, new.first_logits, first
            elif not requests:  # every earlier row finished: the newcomers' state replaces theirs, work kept
                run.prefill = {k: [p - (w - q) for p, w, q in zip(new.prefill[k], run.state.work[k], run.prefill[k],
                                                                   strict=True)] for k in run.prefill}
                run.state, scores, exit_index = new.state, new.first_logits, first
            else:
                engine.flush(run.state)
                run.state = engine.concat_rows(run.state, new.state)
                run.prefill = {k: [a + b for a, b in zip(run.prefill[k], new.prefill[k], strict=True)]
                               for k in run.prefill}
                scores, exit_index = torch.cat([scores, new.first_logits]), torch.cat([exit_index, first])
            requests += take
        tokens = scores.argmax(dim=-1)
        run.stats.count_exits(exit_index)
        keep = []
        for r, (i, token) in enumerate(zip(requests, tokens.tolist(), strict=True)):
            outputs[i].append(token)
            if not finished(i):
                keep.append(r)
        decoded += len(requests)
        if progress is not None and len(keep) < len(requests):
            progress(len(requests) - len(keep))
        if len(keep) < len(requests):  # finished rows leave: they cost nothing more
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            run.state = engine.select_rows(run.state, rows)
            requests, tokens = [requests[r] for r in keep], tokens[rows]
        if not requests:
            scores = exit_index = None
            continue
        exit_index, scores = _step(run, tokens, options.kv_fill, argmax_only=True)
        steps += 1
    if run is not None:
        run.finish(None, decoded - len(prompts), steps)
    return outputs
