"""Early exit on scored positions (lm-eval's loglikelihood requests), as small steps shared by one ε and a sweep.

The harness reads a log-probability only at the positions it scores (a request's continuation tokens), so
`forward_scored` runs the base model's layers over the padded batch once (a context shared by several requests, such
as a document's choices, once for all of them: `backbone_states`) and evaluates the 262k-token LM head, the exit
heads and the confidence metrics only at those positions (`scored_positions`: flattened, row after row), in the
model's dtype: no `batch x length x vocab` tensor is ever made. The steps on those flat positions are
`head_outputs` (the heads' logits) -> `exit_index` (per position, the first exit whose confidence passes τ(ε)) ->
`score_row` (per scored row: each position's log-probabilities from the exit it left at). Only `exit_index` depends
on ε, so `ScoringSweep` scores every ε of a grid from the same forward pass: it records, per request, lm-eval's
answer `(log-likelihood, is_greedy)` at each ε, and later ε points are answered from that record without running
the model.

Which scored positions may leave (`SCORING_RULES`): a log-likelihood reads the probability of a *given* token,
which a head estimates well only where it would have produced that token itself. `"top_token"` (the default) lets
a position leave at its exit only where that head's top token is the token scored there, so every exited position
is one token-by-token decoding would also have left at (and emitted this token); elsewhere the full model scores
it. `"confidence"` lets every confident position leave (the paper's way), whatever the scored token is.

Under `"top_token"` a head's top-1 agreement is not enough: a log-likelihood reads the *size* of its log-probability.
`scoring_delta` (δ nats) adds per exit a scoring gate (`ExitRule.gates`, fitted from the calibration statistics by
`gate_for_eps`): a position leaving at an exit reads the head only where its confidence also reaches the lowest
value above which, on calibration tokens whose next token is the head's top token, the head's log-probability of it
lies within δ of the full model's at rate ≥ ε; below the gate the full model scores it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling.engine_earlyexit import split_shared_prefixes
from ..modeling.exits_earlyexit import ExitRule, take_first
from ..modeling.stats_earlyexit import ExitStats

HeadOutputs = list[tuple[Tensor, Tensor, Tensor] | None]  # per exit: (head logits, hidden, previous hidden) or None
Positions = tuple[Tensor, Tensor]  # (rows, columns) of the scored positions of a padded batch, flattened
SCORING_RULES = ("top_token", "confidence")
NO_TOKEN = -1  # a scored position whose token differs between the requests sharing it
# the LM head skips the scored positions that leave only when more than 1 in FEW_LEAVE do: on a 2-core AVX-512 CPU
# one 262k-token row of the LM head and its log-softmax costs 3.4 ms, copying a computed row into place 0.35 ms
FEW_LEAVE = 10


def check_scoring_rule(rule: str) -> str:
    if rule not in SCORING_RULES:
        raise ValueError(f"scoring_rule={rule!r} is not one of {', '.join(SCORING_RULES)}")
    return rule


def check_scoring_delta(value) -> float:
    """`scoring_delta` as a positive float (lm-eval passes model args as text; `inf` / `none`: no gates)."""
    if isinstance(value, str) and value.strip().lower() in ("none", "inf"):
        return math.inf
    try:
        delta = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        delta = math.nan
    if not delta > 0:  # NaN fails too
        raise ValueError(f"scoring_delta={value!r} must be a positive number of nats (or inf: no scoring gates)")
    return delta


def scored_positions(inplens: Sequence[int], contlens: Sequence[int]) -> tuple[Positions, list[slice]]:
    """The scored positions of a right-padded batch, flattened row after row: row `r`'s input is `inplens[r]` tokens
    and its last `contlens[r]` positions are scored. Returns `((rows, columns), spans)`; `spans[r]` is row `r`'s
    slice of the flat positions."""
    rows, columns, spans, start = [], [], [], 0
    for row, (inplen, contlen) in enumerate(zip(inplens, contlens, strict=True)):
        rows += [row] * contlen
        columns += range(inplen - contlen, inplen)
        spans.append(slice(start, start + contlen))
        start += contlen
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)), spans


def forward_scored(model, inps: Tensor, lengths: Sequence[int], contlens: Sequence[int], wanted: Sequence[bool],
                   softmax_dtype=None, stays: Callable[[HeadOutputs], Tensor | None] | None = None
                   ) -> tuple[Tensor, HeadOutputs, list[slice]]:
    """The base model's layers over the right-padded batch `inps` `(batch, seq)` (row `r`: `lengths[r]` tokens, its
    last `contlens[r]` positions scored; `backbone_states`); the final norm's output, the LM head (+ the model's logit
    soft-capping), its log-softmax and the `wanted` exit heads only at the scored positions.

    `stays`, given the head outputs, names the positions that need the full model `(n,)` bool (`None`: all): when
    more than one in `FEW_LEAVE` leave, the LM head runs only there (positions that leave at an exit take their exit
    head's distribution) and the other rows are left unset, for `score_row(..., in_place=True)` to fill from the
    heads; else it runs at every scored position.

    Returns `(log_probs (n, vocab), heads, spans)`: the full model's log-probabilities at the `n` scored positions
    (flattened row after row; `spans[r]` is row `r`'s slice) as `--model hf` computes them (logits in the model's
    dtype, softmax in `softmax_dtype`), and `head_outputs` there.
    """
    at, spans = scored_positions(lengths, contlens)
    at = tuple(t.to(inps.device) for t in at)
    last, hidden_states = backbone_states(model, inps, lengths, contlens, any(wanted))
    normed = last[at]  # the backbone's last hidden state is after its final norm
    heads = head_outputs(model, hidden_states, inps, wanted, at) if any(wanted) else [None] * len(wanted)
    needed = stays(heads) if stays is not None else None
    if needed is None or int((~needed).sum()) * FEW_LEAVE <= len(needed):
        # every row; a row that leaves is overwritten by its head's (`score_row(..., in_place=True)`): where few
        # leave, their LM-head rows cost less than the copy of every other row that skipping them takes
        return F.log_softmax(model.engine.lm_logits(normed), dim=-1, dtype=softmax_dtype), heads, spans
    part = F.log_softmax(model.engine.lm_logits(normed[needed]), dim=-1, dtype=softmax_dtype)
    log_probs = part.new_empty((normed.shape[0], part.shape[-1]))
    log_probs[needed] = part
    return log_probs, heads, spans


def backbone_states(model, inps: Tensor, lengths: Sequence[int], contlens: Sequence[int], hidden: bool
                    ) -> tuple[Tensor, dict[int, Tensor]]:
    """The backbone's last hidden state `(batch, seq, d)` for the right-padded batch `inps` and, with `hidden`, the
    raw hidden states at the exit layers (`{layer: (batch, seq, d)}`), as one pass over the batch gives them.

    Rows that start with the same tokens up to their first scored position (a multiple-choice document's choices
    after one context) share them: where that saves at least `1 - SHARED_PREFIX_GAIN` of the positions, each
    distinct prefix runs once (left-padded, its KV cache kept) and every row's remaining tokens run on a copy of its
    prefix's cache. The result is laid out as the one-pass result, equal to float rounding.
    """
    backbone = getattr(model.get_base_model(), model.engine.parts.spec.backbone)
    shared = _shared_prefix_states(model, backbone, inps, lengths, contlens, hidden)
    if shared is not None:
        return shared
    out = backbone(inps, output_hidden_states=hidden)
    return out.last_hidden_state, ({layer: out.hidden_states[layer] for layer in model.config.exit_layers}
                                   if hidden else {})


SHARED_PREFIX_GAIN = 0.8  # run shared prefixes apart only where that leaves at most this share of the positions


def _shared_prefix_states(model, backbone, inps: Tensor, lengths: Sequence[int], contlens: Sequence[int],
                          hidden: bool) -> tuple[Tensor, dict[int, Tensor]] | None:
    """`backbone_states` with shared prefixes run once, or `None` where that would not save enough. Sliding-window
    layers stay exact: left padding keeps every row's real tokens contiguous in the cache (tested across windows)."""
    rows, width = inps.shape
    prefix = [n - c + 1 for n, c in zip(lengths, contlens, strict=True)]  # up to and including the first scored one
    suffix = [n - p for n, p in zip(lengths, prefix, strict=True)]
    parts = split_shared_prefixes(inps, [tuple(inps[r, :p].tolist()) for r, p in enumerate(prefix)], prefix,
                                  list(lengths))
    starts, starts_mask, index = parts.prefix, parts.prefix_mask, parts.group_of
    groups, prefix_width, suffix_width = starts.shape[0], starts.shape[1], max(suffix)
    if groups * prefix_width + rows * suffix_width > SHARED_PREFIX_GAIN * rows * width:
        return None
    device = inps.device
    # transformers renamed `past_key_values` to `cache` (5.2x): pass and read whichever this backbone uses
    cache_name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    out = backbone(starts, attention_mask=starts_mask, position_ids=(starts_mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=True, output_hidden_states=hidden)
    layers = list(model.config.exit_layers) if hidden else []
    first = [out.last_hidden_state] + [out.hidden_states[layer] for layer in layers]
    group_of = index.tolist()
    if suffix_width:
        tails, tails_mask = parts.tail, parts.tail_mask
        cache = getattr(out, cache_name)
        cache.batch_select_indices(index)
        positions = torch.tensor(prefix, device=device).unsqueeze(1) + torch.arange(suffix_width, device=device)
        rest = backbone(tails, attention_mask=torch.cat([starts_mask[index], tails_mask], dim=1),
                        position_ids=positions, use_cache=True, output_hidden_states=hidden, **{cache_name: cache})
        second = [rest.last_hidden_state] + [rest.hidden_states[layer] for layer in layers]
    else:
        second = [None] * len(first)
    laid_out = []
    for a, b in zip(first, second, strict=True):
        states = a.new_zeros((rows, width, a.shape[-1]))
        for r in range(rows):
            states[r, :prefix[r]] = a[group_of[r], prefix_width - prefix[r]:]
            if suffix[r]:
                states[r, prefix[r]:lengths[r]] = b[r, :suffix[r]]
        laid_out.append(states)
    return laid_out[0], dict(zip(layers, laid_out[1:], strict=True))


def head_outputs(model, hidden_states: Sequence[Tensor] | dict[int, Tensor], inps: Tensor, wanted: Sequence[bool],
                 at: Positions) -> HeadOutputs:
    """Per exit `j` with `wanted[j]`: its head's logits, its hidden states and the previous exit's (the embeddings
    before the first exit) at positions `at`, `(n, ...)`; `None` for the others. A context head's block runs whole
    only at `at`; earlier positions only write its keys and values, once per distinct prefix (`features_at`)."""
    previous = model.get_input_embeddings()(inps[at])
    outputs: HeadOutputs = []
    for j, (layer, head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
        hidden = hidden_states[layer][at]  # raw output of decoder layer `layer - 1`
        outputs.append((head.logits_from(head.features_at(hidden_states[layer], at, inps)), hidden, previous)
                       if wanted[j] else None)
        previous = hidden
    return outputs


def heads_at(heads: HeadOutputs, span: slice) -> HeadOutputs:
    """One row's `span` of a batch's head outputs at its flat scored positions."""
    return [None if h is None else tuple(t[span] for t in h) for h in heads]


def exit_index(model, rule: ExitRule, heads: HeadOutputs, shape: torch.Size, device) -> Tensor:
    """`shape` long (the heads' positions): the first exit of `rule` that fires at each position (`rule.num_exits`:
    the full model), and where that exit has a scoring gate (`rule.gates`) the position's confidence passes it, else
    the full model."""
    index = torch.full(shape, rule.num_exits, dtype=torch.long, device=device)
    scores: list[Tensor | None] = [None] * rule.num_exits
    for j, head in enumerate(model.exit_heads):
        if rule.checked[j] and rule.thresholds[j] is not None:
            head_logits, hidden, previous = heads[j]
            scores[j] = rule.score(head_logits, hidden, previous)
            index = take_first(index, j, rule.fires_at(j, head, scores[j], head_logits), rule.num_exits)
    return rule.gated(index, scores)


def scored_tokens(continuations: Sequence[Sequence[int]], contlen: int) -> Tensor:
    """`(contlen,)` long: the token whose log-probability each scored position of one model input gives, from the
    continuations of the requests sharing that input (HFLM gives one-token continuations of one context a single
    input; they differ only in the last token). Where they differ: `NO_TOKEN`."""
    tokens = torch.tensor([list(c[-contlen:]) for c in continuations], dtype=torch.long)  # (requests, contlen)
    same = (tokens == tokens[:1]).all(dim=0)
    return torch.where(same, tokens[0], NO_TOKEN)


def head_tops(model, heads: HeadOutputs) -> list[Tensor | None]:
    """Per exit, its head's top token (a token id of the full vocabulary) at each position, or `None` (not run)."""
    return [None if h is None else head.to_token_ids(h[0].argmax(dim=-1))
            for head, h in zip(model.exit_heads, heads, strict=True)]


def exits_taken(model, heads: HeadOutputs, exits: Tensor, scored: Tensor | None,
                tops: list[Tensor | None] | None = None) -> Tensor:
    """The exit each position really leaves at (`len(exit_heads)`: none) from the first confident exit `exits`:
    under rule `"top_token"` (`scored` given: the token scored at each position) only where that head's top token
    (`tops`, else `head_tops`) is the scored token."""
    if scored is None:
        return exits
    full = len(model.exit_heads)
    for j, top in enumerate(head_tops(model, heads) if tops is None else tops):
        if top is not None:
            exits = torch.where((exits == j) & (top.to(scored.device) != scored), full, exits)
    return exits


def score_row(model, full_log_probs: Tensor, heads: HeadOutputs, exits: Tensor, scored: Tensor | None = None,
              in_place: bool = False) -> tuple[Tensor, Tensor]:
    """The log-probabilities of one row's scored positions and the exit each really left at.

    Args:
        full_log_probs: `(contlen, vocab)` the full model's log-probabilities there (as `--model hf` computes them).
        heads: per exit `(head logits, hidden, previous)` at those positions, or `None` (exit not run).
        exits: `(contlen,)` the first exit whose confidence passes, per position (`len(exit_heads)`: none).
        scored: `(contlen,)` the token scored at each position (rule `"top_token"`: a position leaves only where its
            head's top token is that token), or `None` (rule `"confidence"`).
        in_place: write the heads' rows into `full_log_probs` itself (its rows where a position leaves may be
            unset: `forward_scored` with `stays`) instead of a copy.

    Returns:
        `(log_probs (contlen, vocab), exits (contlen,))`: the full model's rows where the position stays, else the
        head's (a draft head's `OTHER` mass spread over the tokens it cannot name), in `full_log_probs`' dtype.
    """
    full = len(model.exit_heads)
    exits = exits_taken(model, heads, exits, scored)
    if bool((exits == full).all()):
        return full_log_probs, exits
    mixed = full_log_probs if in_place else full_log_probs.clone()
    for j, head in enumerate(model.exit_heads):
        leave = exits == j
        if bool(leave.any()):
            mixed[leave] = head.vocab_scores(heads[j][0][leave], mixed.shape[-1], other="spread").to(mixed.dtype)
    return mixed, exits


def score_positions(model, full_log_probs: Tensor, heads: HeadOutputs, index: Tensor | None, span: slice,
                    scored: Tensor | None, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """`score_row` for one row's `span` of a batch's flat scored positions, from the whole batch's head outputs and
    exit index (`index` `None`: no exit checked at this ε, the unmodified model)."""
    if index is None:
        return full_log_probs, torch.full((full_log_probs.shape[0],), len(model.exit_heads), dtype=torch.long)
    return score_row(model, full_log_probs, heads_at(heads, span), index[span], scored, in_place)


def count_exits(stats: ExitStats, model, exits: Tensor) -> None:
    """Add scored positions that left at `exits` `(n,)` (exit index per position) to `stats`, with the layers and
    multiply-adds token-by-token decoding would spend on them."""
    exits = exits.cpu()
    stats.count_exits(exits)
    depth = torch.tensor(model.config.exit_layers + [model.num_layers])[exits]
    stats.layer_tokens += int(depth.sum())
    stats.layer_tokens_full += len(exits) * model.num_layers
    macs = torch.tensor(model.costs.scoring_macs(), dtype=torch.long)
    stats.macs += int(macs[exits].sum())
    stats.macs_full += int(macs[-1]) * len(exits)


def answer(log_probs: Tensor, cont_toks: list[int], top: Tensor | None = None) -> tuple[float, bool]:
    """lm-eval's answer for one continuation from the `(contlen, vocab)` log-probabilities of its scored positions:
    `(sum of the continuation's log-probabilities, every token greedy)`, in HFLM's own steps (its one-token-
    continuation groups share the longest member's positions). `top` `(contlen,)`: each row's maximum, if known.

    "Greedy" is HFLM's `argmax == token`, taken as: the token's log-probability is its row's maximum and no lower
    token id reaches it (argmax's first-index tie rule). On a CPU a row's maximum costs a seventh of its argmax
    (262k-token rows), and the ids below the token are read only where every position is at its maximum."""
    rows = log_probs[-len(cont_toks):]  # (n, vocab)
    cont = torch.tensor(cont_toks, dtype=torch.long, device=rows.device)
    picked = rows.gather(1, cont.unsqueeze(1)).squeeze(1)  # (n,)
    top = rows.amax(dim=-1) if top is None else top[-len(cont_toks):]
    greedy = bool((picked == top).all()) and not any(
        bool((rows[p, :token] == picked[p]).any()) for p, token in enumerate(cont_toks))
    return float(picked.sum()), greedy


@dataclass
class ScoringSweep:
    """The scoring answers and exit counts of every ε in `grid`, recorded in one pass over lm-eval's requests.

    `answers[ε][(task, context tokens, continuation tokens)]` is what lm-eval's HFLM answers for that request at ε;
    `scoring[ε][task]` the exit counts on scored positions, as a run at that ε alone counts them.
    """

    grid: list[float]
    rule_of: Callable[[float], ExitRule] | None = None  # the exit rule at an ε (default: every calibrated exit)
    answers: dict[float, dict[tuple, tuple[float, bool]]] = field(default_factory=dict)
    scoring: dict[float, dict[str, ExitStats]] = field(default_factory=dict)
    replaying: float | None = None  # the ε whose answers are being served (None: recording)
    batch: dict | None = None  # while recording: the current batch's head outputs and each ε's exit index
    _rules: dict[float, ExitRule] | None = field(default=None, repr=False)

    def rules(self, model) -> dict[float, ExitRule]:
        if self._rules is None:  # the thresholds do not change while a sweep records
            self._rules = {eps: self.rule_of(eps) if self.rule_of else ExitRule.for_model(model, eps)
                           for eps in self.grid}
        return self._rules

    def record_batch(self, model, heads: HeadOutputs, positions: int, device) -> None:
        """Keep one batch's head outputs at its `positions` scored positions and each ε's exit index there until
        its rows are scored."""
        index = {eps: exit_index(model, rule, heads, (positions,), device) if any(rule.checked) else None
                 for eps, rule in self.rules(model).items()}
        self.batch = {"heads": heads, "index": index}

    def record_row(self, model, task: str, span: slice, full_log_probs: Tensor,
                   requests: Sequence[tuple[tuple, tuple]], scored: Tensor | None) -> None:
        """Score one row of the recorded batch at every ε (`score_row`; the row's `span` of the flat positions, the
        full model's `full_log_probs` there, `scored` as it takes them): answers for the `(context, continuation)`
        `requests` sharing the row, exit counts on its scored positions."""
        heads = heads_at(self.batch["heads"], span)
        full = len(model.exit_heads)
        tops = head_tops(model, heads)  # once per row, not per ε
        full_top = full_log_probs.amax(dim=-1)
        answered: dict[bytes, list[tuple[float, bool]]] = {}  # ε points whose exits agree here share the answers
        for eps, index in self.batch["index"].items():
            stats = self.scoring.setdefault(eps, {}).setdefault(task, ExitStats(
                exit_layers=list(model.config.exit_layers), num_layers=model.num_layers))
            exits = (torch.full((full_log_probs.shape[0],), full, dtype=torch.long, device=full_log_probs.device)
                     if index is None else exits_taken(model, heads, index[span], scored, tops))
            key = exits.cpu().numpy().tobytes()
            if key not in answered:
                log_probs, _ = score_row(model, full_log_probs, heads, exits)  # exits are final: no scored tokens
                top, leave = full_top, exits != full
                if bool(leave.any()):  # a row's maximum changes only where a position left
                    top = full_top.clone()
                    top[leave] = log_probs[leave].amax(dim=-1)
                answered[key] = [answer(log_probs, list(continuation), top) for _, continuation in requests]
            count_exits(stats, model, exits)
            table = self.answers.setdefault(eps, {})
            for (context, continuation), value in zip(requests, answered[key], strict=True):
                table[(task, context, continuation)] = value

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
