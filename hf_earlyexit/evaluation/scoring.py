"""Early exit on scored positions (lm-eval's loglikelihood requests), as small steps shared by one ε and a sweep.

The harness reads a log-probability only at the positions it scores (a request's continuation tokens), so
`forward_scored` runs the base model's layers over the padded batch once (a context shared by several requests, such
as a document's choices, once for all of them: `backbone_states`) and evaluates the 262k-token LM head, the exit
heads and the confidence metrics only at those positions (`scored_positions`: flattened, row after row), in the
model's dtype. Even there no whole vocabulary row is kept: the harness reads only the log-probability of each token
some request scores at a position (`candidate_tokens`) and whether it is the greedy one, so the LM head streams over
its rows keeping just that (`token_scores`), and no `positions x vocab` tensor is ever made. The steps on those flat
positions are `head_outputs` (the heads' logits) -> `exit_index` (per position, the first exit whose confidence
passes τ(ε)) -> `score_row` (per scored row: each position's scores from the exit it left at). Only `exit_index`
depends on ε, so `ScoringSweep` scores every ε of a grid from the same forward pass: it records, per request,
lm-eval's answer `(log-likelihood, is_greedy)` at each ε, and later ε points are answered from that record without
running the model.

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
from dataclasses import dataclass, field, replace

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
                   tokens: Tensor, softmax_dtype=None, stays: Callable[[HeadOutputs], Tensor | None] | None = None
                   ) -> tuple[TokenScores, HeadOutputs, list[slice]]:
    """The base model's layers over the right-padded batch `inps` `(batch, seq)` (row `r`: `lengths[r]` tokens, its
    last `contlens[r]` positions scored; `backbone_states`); the final norm's output, the LM head's scores of the
    candidate `tokens` (`(n, k)`, `candidate_tokens`) and the `wanted` exit heads only at the scored positions.

    `stays`, given the head outputs, names the positions that need the full model `(n,)` bool (`None`: all): the LM
    head runs only there; the other positions (they leave at an exit and take their exit head's scores,
    `score_row`) are left unset (NaN, not greedy).

    Returns `(scores, heads, spans)`: the full model's `TokenScores` at the `n` scored positions (flattened row after
    row; `spans[r]` is row `r`'s slice) as `--model hf` computes them (logits in the model's dtype, softmax in
    `softmax_dtype`), and `head_outputs` there.
    """
    at, spans = scored_positions(lengths, contlens)
    at = tuple(t.to(inps.device) for t in at)
    last, hidden_states = backbone_states(model, inps, lengths, contlens, any(wanted))
    normed = last[at]  # the backbone's last hidden state is after its final norm
    heads = head_outputs(model, hidden_states, inps, wanted, at) if any(wanted) else [None] * len(wanted)
    tokens = tokens.to(inps.device)
    needed = stays(heads) if stays is not None else None
    if needed is None or bool(needed.all()):
        return token_scores(model, normed, tokens, softmax_dtype), heads, spans
    part = token_scores(model, normed[needed], tokens[needed], softmax_dtype)
    scores = TokenScores(tokens, part.log_probs.new_full(tokens.shape, math.nan),
                         torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device))
    scores.log_probs[needed], scores.greedy[needed] = part.log_probs, part.greedy
    return scores, heads, spans


@dataclass
class TokenScores:
    """At flat scored positions, the log-probability of each candidate token (a token some request reads there) and
    whether it is that position's greedy token: HFLM's `argmax == token`, the lowest token id on ties."""

    tokens: Tensor  # (n, k) long; NO_TOKEN where a position has fewer than k candidates
    log_probs: Tensor  # (n, k), NaN where a candidate is NO_TOKEN
    greedy: Tensor  # (n, k) bool

    def __getitem__(self, index) -> TokenScores:
        return TokenScores(self.tokens[index], self.log_probs[index], self.greedy[index])

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def answer(self, cont_toks: Sequence[int]) -> tuple[float, bool]:
        """lm-eval's answer for a continuation scored at the last `len(cont_toks)` positions: `(sum of its tokens'
        log-probabilities, every token greedy)`, as HFLM sums them (in the log-probabilities' dtype)."""
        rows = self[len(self) - len(cont_toks):]
        cont = torch.tensor(list(cont_toks), dtype=torch.long, device=rows.tokens.device)
        match = rows.tokens == cont.unsqueeze(1)
        if len(cont_toks) > len(self) or not bool(match.any(dim=1).all()):
            raise ValueError(f"continuation {list(cont_toks)} is not among the scored candidate tokens "
                             f"{rows.tokens.tolist()}")
        column = match.int().argmax(dim=1, keepdim=True)
        return (float(rows.log_probs.gather(1, column).sum()), bool(rows.greedy.gather(1, column).all()))


def candidate_tokens(continuations: Sequence[Sequence[Sequence[int]]], contlens: Sequence[int]) -> Tensor:
    """`(n, k)` long: per flat scored position (row after row, row `r`'s last `contlens[r]` positions), the tokens
    that the requests sharing row `r` (`continuations[r]`, each aligned to the row's end) score there, `NO_TOKEN`
    padded to the most any position has (HFLM gives one-token continuations of one context a single input)."""
    per_position = []
    for conts, contlen in zip(continuations, contlens, strict=True):
        for p in range(contlen):
            back = contlen - p
            per_position.append(sorted({int(c[len(c) - back]) for c in conts if len(c) >= back}))
    k = max(1, max(map(len, per_position), default=1))
    return torch.tensor([t + [NO_TOKEN] * (k - len(t)) for t in per_position], dtype=torch.long).view(-1, k)


def token_scores(model, normed: Tensor, tokens: Tensor, softmax_dtype=None, chunk: int | None = None,
                 block: int | None = None) -> TokenScores:
    """The full model's scores of the candidate `tokens` `(n, k)` at positions whose final-norm output is `normed`
    `(n, hidden)`: their log-probabilities under the LM head (+ soft-capping) as `--model hf` computes them
    (`log_softmax(logits, dtype=softmax_dtype)`), and whether each is the greedy token there.

    No `(n, vocab)` tensor is made: the LM head runs `chunk` of its rows (`SCORE_CHUNK`) at a time over `block`
    positions (`SCORE_BLOCK`), keeping per position the largest logit, the sum of exponentials below it (merged as
    chunks raise it, `log_softmax`'s own `(x - max) - log(sum)`) and the candidates' logits. A candidate is greedy
    where its logit is the largest and no other logit lies within `TIE_ABS + TIE_REL·|max|` of it, a margin above
    any rounding that could make two log-probabilities equal; positions where another logit does lie that close
    (near-ties, rare) and LM heads that are not a plain `nn.Linear` or softmax dtypes below float32 are scored from
    whole rows, exactly as HFLM."""
    out_dtype = softmax_dtype or normed.dtype
    engine = model.engine
    if len(normed) == 0 or out_dtype not in (torch.float32, torch.float64) or not engine.lm_head_has_rows:
        return _whole_row_scores(model, normed, tokens, softmax_dtype)
    chunk, block = chunk or SCORE_CHUNK, block or SCORE_BLOCK
    parts = [_streamed_scores(engine, normed[s:s + block], tokens[s:s + block], out_dtype, chunk)
             for s in range(0, len(normed), block)]
    log_probs, greedy, near = (torch.cat(t) for t in zip(*parts, strict=True))
    if bool(near.any()):
        exact = _whole_row_scores(model, normed[near], tokens[near], softmax_dtype)
        log_probs[near], greedy[near] = exact.log_probs.to(log_probs.dtype), exact.greedy
    return TokenScores(tokens, log_probs, greedy)


SCORE_CHUNK = 4096  # LM-head rows per step of `token_scores`
SCORE_BLOCK = 256  # positions per pass of `token_scores` over the LM head
TIE_ABS, TIE_REL = 2.0 ** -10, 2.0 ** -16  # near-tie margin (logits), far above float32 rounding of log-softmax


def _streamed_scores(engine, normed: Tensor, tokens: Tensor, dtype, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """`token_scores` for one block of positions: `(log_probs (n, k), greedy (n, k), near_tie (n,))`."""
    n = normed.shape[0]
    vocab = engine.vocab_size
    top = torch.full((n,), -math.inf, dtype=dtype, device=normed.device)
    total = torch.zeros((n,), dtype=dtype, device=normed.device)
    picked = torch.full(tokens.shape, math.nan, dtype=dtype, device=normed.device)
    near = torch.zeros((n,), dtype=torch.bool, device=normed.device)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        z = engine.lm_logits_rows(normed, start, stop).to(dtype)
        inside = (tokens >= start) & (tokens < stop)
        if bool(inside.any()):
            rows, columns = inside.nonzero(as_tuple=True)
            picked[rows, columns] = z[rows, tokens[rows, columns] - start]
        chunk_top = z.amax(dim=-1)
        margin = TIE_ABS + chunk_top.abs() * TIE_REL
        z.sub_(chunk_top.unsqueeze(1))
        crowded = (z >= -margin.unsqueeze(1)).sum(dim=-1) > 1
        near = torch.where(chunk_top > top + margin, crowded, near | (chunk_top >= top - margin))
        new_top = torch.maximum(top, chunk_top)
        total = total * torch.exp(top - new_top) + z.exp_().sum(dim=-1) * torch.exp(chunk_top - new_top)
        top = new_top
    log_probs = (picked - top.unsqueeze(1)) - torch.log(total).unsqueeze(1)
    greedy = (picked == top.unsqueeze(1)) & ~near.unsqueeze(1)
    return log_probs, greedy, near


def _whole_row_scores(model, normed: Tensor, tokens: Tensor, softmax_dtype=None) -> TokenScores:
    """`token_scores` from whole log-softmax rows, `SCORE_BLOCK` positions at a time."""
    parts = [row_scores(F.log_softmax(model.engine.lm_logits(normed[s:s + SCORE_BLOCK]), dim=-1,
                                      dtype=softmax_dtype), tokens[s:s + SCORE_BLOCK])
             for s in range(0, max(len(normed), 1), SCORE_BLOCK)]  # no positions: one empty block
    return TokenScores(tokens, torch.cat([p.log_probs for p in parts]), torch.cat([p.greedy for p in parts]))


def row_scores(rows: Tensor, tokens: Tensor) -> TokenScores:
    """`TokenScores` of `tokens` `(n, k)` read from whole log-probability rows `(n, vocab)`: greedy where the token is
    its row's first maximum (argmax's tie rule)."""
    valid = tokens >= 0
    log_probs = rows.gather(1, tokens.clamp(min=0)).masked_fill(~valid, math.nan)
    first = (rows == rows.amax(dim=-1, keepdim=True)).int().argmax(dim=-1, keepdim=True)
    return TokenScores(tokens, log_probs, (tokens == first) & valid)


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


def scored_tokens(tokens: Tensor) -> Tensor:
    """`(n,)` long: the one token scored at each position from its candidates `(n, k)` (`candidate_tokens`), or
    `NO_TOKEN` where the requests sharing it score different tokens there (one-token continuations of one context)."""
    if tokens.shape[1] == 1:
        return tokens[:, 0]
    return torch.where(tokens[:, 1] == NO_TOKEN, tokens[:, 0], NO_TOKEN)



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


def score_row(model, full: TokenScores, heads: HeadOutputs, exits: Tensor, scored: Tensor | None = None
              ) -> tuple[TokenScores, Tensor]:
    """The scores of one row's candidate tokens and the exit each position really left at.

    Args:
        full: the full model's `TokenScores` at the row's `c` scored positions (as `--model hf` computes them; unset
            where a position leaves: `forward_scored` with `stays`).
        heads: per exit `(head logits, hidden, previous)` at those positions, or `None` (exit not run).
        exits: `(c,)` the first exit whose confidence passes, per position (`len(exit_heads)`: none).
        scored: `(c,)` the token scored at each position (rule `"top_token"`: a position leaves only where its
            head's top token is that token), or `None` (rule `"confidence"`).

    Returns:
        `(scores, exits (c,))`: the full model's scores where the position stays, else its head's (a draft head's
        `OTHER` mass spread over the tokens it cannot name), in `full`'s dtype.
    """
    exits = exits_taken(model, heads, exits, scored)
    if bool((exits == len(model.exit_heads)).all()):
        return full, exits
    mixed = TokenScores(full.tokens, full.log_probs.clone(), full.greedy.clone())
    vocab = model.engine.vocab_size
    for j, head in enumerate(model.exit_heads):
        leave = exits == j
        if bool(leave.any()):
            rows = head.vocab_scores(heads[j][0][leave], vocab, other="spread").to(full.log_probs.dtype)
            exact = row_scores(rows, full.tokens[leave])
            mixed.log_probs[leave], mixed.greedy[leave] = exact.log_probs, exact.greedy
    return mixed, exits


def score_positions(model, full: TokenScores, heads: HeadOutputs, index: Tensor | None, span: slice,
                    scored: Tensor | None) -> tuple[TokenScores, Tensor]:
    """`score_row` for one row's `span` of a batch's flat scored positions (`full`: the row's own), from the whole
    batch's head outputs and exit index (`index` `None`: no exit checked at this ε, the unmodified model)."""
    if index is None:
        return full, torch.full((len(full),), len(model.exit_heads), dtype=torch.long)
    return score_row(model, full, heads_at(heads, span), index[span], scored)



# scored positions of a task after which `exit_policy="auto"` reviews which exits pay there (`review_exits`)
SCORING_REVIEW_POSITIONS = 512


def review_exits(model, stats: ExitStats, checked: Sequence[bool], review_after: int | None = None) -> None:
    """`exit_policy="auto"` on scored positions: once a task's exit counts `stats` cover `review_after` positions
    (`SCORING_REVIEW_POSITIONS`), record in `stats.checked_exits` (the report's `checked_exits`) which of the
    `checked` exits keep being checked for the rest of the task (`reviewed`); once only. An exit stays only if its
    positions leave often enough to pay for the check: (positions that left there) x (the LM head's multiply-adds,
    which a position that leaves skips) >= (positions that reached it) x (its head's, context block included). A
    log-likelihood reads a given token, so far fewer positions leave than in decoding (under `top_token` with scoring
    gates, 1% of HellaSwag's): there a check costs more than it saves, and the positions that no longer check an exit
    are scored by the full model."""
    if stats.checked_exits is not None or stats.tokens < (review_after or SCORING_REVIEW_POSITIONS):
        return
    costs = model.costs
    reached, keep = stats.tokens, []
    for j, (layer, on) in enumerate(zip(model.config.exit_layers, checked, strict=True)):
        left = stats.exit_counts[j]
        if on and left * costs.final.macs >= reached * costs.heads[j].macs:
            keep.append(layer)
        reached -= left
    stats.checked_exits = keep


def reviewed(model, rule: ExitRule, stats: ExitStats | None) -> ExitRule:
    """`rule` checking only the exits that `review_exits` kept for the task `stats` counts (unchanged before that)."""
    if stats is None or stats.checked_exits is None:
        return rule
    kept = set(stats.checked_exits)
    return replace(rule, checked=tuple(on and layer in kept
                                       for on, layer in zip(rule.checked, model.config.exit_layers, strict=True)))


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

    def record_batch(self, model, task: str, heads: HeadOutputs, positions: int, device) -> None:
        """Keep one batch's head outputs at its `positions` scored positions and each ε's exit index there until
        its rows are scored (each ε checking the exits its own run of `task` would check: `review`)."""
        index = {}
        for eps, rule in self.rules(model).items():
            rule = reviewed(model, rule, self.scoring.get(eps, {}).get(task))
            index[eps] = exit_index(model, rule, heads, (positions,), device) if any(rule.checked) else None
        self.batch = {"heads": heads, "index": index}

    def review(self, model, task: str, review_after: int | None = None) -> None:
        """`review_exits` per ε from its own exit counts on `task`, as a run at that ε alone reviews them."""
        for eps, rule in self.rules(model).items():
            stats = self.scoring.get(eps, {}).get(task)
            if stats is not None:
                review_exits(model, stats, rule.checked, review_after)

    def record_row(self, model, task: str, span: slice, full: TokenScores, requests: Sequence[tuple[tuple, tuple]],
                   scored: Tensor | None) -> None:
        """Score one row of the recorded batch at every ε (`score_row`; the row's `span` of the flat positions, the
        full model's scores `full` there, `scored` as it takes them): answers for the `(context, continuation)`
        `requests` sharing the row, exit counts on its scored positions."""
        heads = heads_at(self.batch["heads"], span)
        full_exit = len(model.exit_heads)
        tops = head_tops(model, heads)  # once per row, not per ε
        answered: dict[bytes, list[tuple[float, bool]]] = {}  # ε points whose exits agree here share the answers
        for eps, index in self.batch["index"].items():
            stats = self.scoring.setdefault(eps, {}).setdefault(task, ExitStats(
                exit_layers=list(model.config.exit_layers), num_layers=model.num_layers))
            exits = (torch.full((len(full),), full_exit, dtype=torch.long, device=full.tokens.device)
                     if index is None else exits_taken(model, heads, index[span], scored, tops))
            key = exits.cpu().numpy().tobytes()
            if key not in answered:
                scores, _ = score_row(model, full, heads, exits)  # exits are final: no scored tokens
                answered[key] = [scores.answer(continuation) for _, continuation in requests]
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
