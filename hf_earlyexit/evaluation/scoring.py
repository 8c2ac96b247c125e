"""Early exit on scored positions (lm-eval's loglikelihood requests), as small steps shared by one ε and a sweep.

One forward of the base model gives the full model's logits and every exit's hidden states; the steps are
`head_outputs` (the heads' logits) -> `exit_index` (per position, the first exit whose confidence passes τ(ε)) ->
`mixed_log_probs` (each position's distribution from the exit it left at). Only `exit_index` depends on ε, so
`ScoringSweep` scores every ε of a grid from the same forward pass: it records, per request, lm-eval's answer
`(log-likelihood, is_greedy)` at each ε, and later ε points are answered from that record without running the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from ..modeling.exits_earlyexit import ExitRule, take_first
from ..modeling.stats_earlyexit import ExitStats

HeadOutputs = list[tuple[Tensor, Tensor, Tensor] | None]  # per exit: (head logits, hidden, previous hidden) or None


def head_outputs(model, hidden_states: Sequence[Tensor], inps: Tensor, wanted: Sequence[bool]) -> HeadOutputs:
    """Per exit `j` with `wanted[j]`: its head's logits `(batch, seq, head_vocab)`, its hidden states and the previous
    exit's `(batch, seq, hidden)` (the embeddings before the first exit); `None` for the others."""
    previous = model.get_input_embeddings()(inps)  # (batch, seq, hidden)
    outputs: HeadOutputs = []
    for j, (layer, head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
        hidden = hidden_states[layer]  # raw output of decoder layer `layer - 1`
        outputs.append((head(hidden), hidden, previous) if wanted[j] else None)
        previous = hidden
    return outputs


def exit_index(model, rule: ExitRule, heads: HeadOutputs, shape: torch.Size, device) -> Tensor:
    """`(batch, seq)` long: the first exit of `rule` that fires at each position (`rule.num_exits`: the full model)."""
    index = torch.full(shape, rule.num_exits, dtype=torch.long, device=device)
    for j, head in enumerate(model.exit_heads):
        if rule.checked[j]:
            head_logits, hidden, previous = heads[j]
            index = take_first(index, j, rule.fires(j, head, head_logits, hidden, previous), rule.num_exits)
    return index


def mixed_log_probs(model, logits: Tensor, heads: HeadOutputs, index: Tensor) -> Tensor:
    """`(..., vocab)` log-probabilities: the full model's `logits` where `index` says full, else the head's (a draft
    head's `OTHER` mass spread over the tokens it cannot name). Every position is computed on its own, so any slice
    of positions gives the same values as the whole batch."""
    mixed = F.log_softmax(logits.float(), dim=-1)  # (..., vocab)
    for j, head in enumerate(model.exit_heads):
        leave = index == j
        if heads[j] is not None and bool(leave.any()):
            mixed[leave] = head.vocab_scores(heads[j][0][leave], mixed.shape[-1], other="spread")
    return mixed


def count_exits(stats: ExitStats, model, exits: Tensor) -> None:
    """Add scored positions that left at `exits` `(n,)` (exit index per position) to `stats`."""
    exits = exits.cpu()
    counts = torch.bincount(exits, minlength=len(stats.exit_counts)).tolist()
    stats.exit_counts = [a + b for a, b in zip(stats.exit_counts, counts, strict=True)]
    stats.tokens += len(exits)
    depth = torch.tensor(model.config.exit_layers + [model.num_layers])[exits]
    stats.layer_tokens += int(depth.sum())
    stats.layer_tokens_full += len(exits) * model.num_layers
    macs = torch.tensor(model.costs.scoring_macs(), dtype=torch.long)
    stats.macs += int(macs[exits].sum())
    stats.macs_full += int(macs[-1]) * len(exits)


def answer(log_probs: Tensor, cont_toks: list[int]) -> tuple[float, bool]:
    """lm-eval's answer for one continuation from the `(contlen, vocab)` log-probabilities of its scored positions:
    `(sum of the continuation's log-probabilities, every token greedy)`, in HFLM's own steps (its one-token-
    continuation groups share the longest member's positions)."""
    logits = log_probs.unsqueeze(0)  # (1, contlen, vocab)
    greedy = logits.argmax(dim=-1)
    cont = torch.tensor(cont_toks, dtype=torch.long, device=logits.device).unsqueeze(0)  # (1, n)
    max_equal = (greedy[:, -cont.shape[1]:] == cont).all()
    picked = torch.gather(logits, 2, cont.unsqueeze(-1)).squeeze(-1)  # (1, n)
    return float(picked.sum()), bool(max_equal)


@dataclass
class ScoringSweep:
    """The scoring answers and exit counts of every ε in `grid`, recorded in one pass over lm-eval's requests.

    `answers[ε][(task, context tokens, continuation tokens)]` is what lm-eval's HFLM answers for that request at ε;
    `scoring[ε][task]` the exit counts on scored positions, as a run at that ε alone counts them.
    """

    grid: list[float]
    answers: dict[float, dict[tuple, tuple[float, bool]]] = field(default_factory=dict)
    scoring: dict[float, dict[str, ExitStats]] = field(default_factory=dict)
    replaying: float | None = None  # the ε whose answers are being served (None: recording)
    # while recording: inputs of the current `_model_call` and their continuations
    conts: dict[tuple, list[tuple[tuple, tuple]]] = field(default_factory=dict)
    batch: dict | None = None

    def rules(self, model) -> dict[float, ExitRule]:
        return {eps: ExitRule.for_model(model, eps) for eps in self.grid}

    def record_batch(self, model, logits: Tensor, heads: HeadOutputs, inps: Tensor) -> None:
        """Keep one `_model_call`'s full logits, head outputs and each ε's exit index until its rows are scored."""
        index = {eps: exit_index(model, rule, heads, inps.shape, inps.device) if any(rule.checked) else None
                 for eps, rule in self.rules(model).items()}
        self.batch = {"inps": inps, "logits": logits, "heads": heads, "index": index}

    def record_row(self, model, task: str, row: int, contlen: int, inplen: int, softmax_dtype) -> None:
        """Score one row of the recorded batch at every ε: answers for every request sharing its input, exit counts
        on its continuation positions."""
        batch = self.batch
        inp = tuple(batch["inps"][row, :inplen].tolist())
        positions = slice(inplen - contlen, inplen)
        for eps, index in batch["index"].items():
            stats = self.scoring.setdefault(eps, {}).setdefault(task, ExitStats(
                exit_layers=list(model.config.exit_layers), num_layers=model.num_layers))
            if index is None:  # no exit checked at this ε: the unmodified model, as `_model_call` returns it
                log_probs = F.log_softmax(batch["logits"][row, positions], dim=-1, dtype=softmax_dtype)
                exits = torch.full((contlen,), len(model.exit_heads), dtype=torch.long)
            else:
                heads = [None if h is None else tuple(t[row, positions] for t in h) for h in batch["heads"]]
                exits = index[row, positions]
                mixed = mixed_log_probs(model, batch["logits"][row, positions], heads, exits)
                log_probs = F.log_softmax(mixed, dim=-1, dtype=softmax_dtype)
            count_exits(stats, model, exits)
            table = self.answers.setdefault(eps, {})
            for context, continuation in self.conts.get(inp, ()):
                table[(task, context, continuation)] = answer(log_probs, list(continuation))

    def replay(self, task: str, requests: list) -> list[tuple[float, bool]]:
        """The recorded answers at the ε being replayed, for HFLM's encoded `(strings, context, continuation)`."""
        table = self.answers.get(self.replaying, {})
        out = []
        for _, context, continuation in requests:
            key = (task, tuple(context), tuple(continuation))
            if key not in table:
                raise RuntimeError(f"task {task!r}: a request the one-pass sweep did not record at eps="
                                   f"{self.replaying} (the tasks or --limit differ between its ε points)")
            out.append(table[key])
        return out
