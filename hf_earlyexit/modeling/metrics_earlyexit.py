"""Confidence metrics and the calibration threshold rule (portable: torch + siblings only).

Every metric is turned into a score where higher means more confident in `confidence()`, the one place that
knows each metric's direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .configuration_earlyexit import METRICS

DEFAULT_EPS_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
# nats: a scored position reads a head only where, at rate >= ε on the calibration tokens, the head's log-probability
# of the scored token lies this close to the full model's (`gate_for_eps`); chosen before measuring any task
DEFAULT_SCORING_DELTA = 0.1


def breaking_ties(logits: Tensor) -> Tensor:
    """`(..., vocab)` -> `(...)`: top-1 minus top-2 probability (the paper's metric)."""
    top = F.softmax(logits.float(), dim=-1).topk(2, dim=-1).values  # (..., 2)
    return top[..., 0] - top[..., 1]


def max_prob(logits: Tensor) -> Tensor:
    """`(..., vocab)` -> `(...)`: top-1 probability."""
    return F.softmax(logits.float(), dim=-1).amax(dim=-1)


def entropy(logits: Tensor) -> Tensor:
    """`(..., vocab)` -> `(...)`: Shannon entropy in nats (lower = more confident)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def hidden_similarity(hidden: Tensor, previous: Tensor) -> Tensor:
    """`(..., d)` x `(..., d)` -> `(...)`: cosine similarity of consecutive exits' hidden states."""
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


def confidence(
    metric: str, logits: Tensor | None = None, hidden: Tensor | None = None, previous_hidden: Tensor | None = None
) -> Tensor:
    """Score of `metric`, oriented so that higher always means more confident (entropy is negated here)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {', '.join(METRICS)}")
    if metric == "hidden_similarity":
        if hidden is None or previous_hidden is None:
            raise ValueError("metric 'hidden_similarity' needs hidden and previous_hidden")
        return hidden_similarity(hidden, previous_hidden)
    if logits is None:
        raise ValueError(f"metric {metric!r} needs logits")
    score = {"breaking_ties": breaking_ties, "max_prob": max_prob, "entropy": entropy}[metric](logits)
    return -score if metric == "entropy" else score


def _check(scores: Tensor, agree: Tensor, eps: float) -> None:
    if not isinstance(eps, int | float) or not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={eps!r} must be a number in [0, 1]")
    if scores.dim() != 1 or agree.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and agree {tuple(agree.shape)} must be 1-D of equal length")
    if scores.numel() == 0:
        raise ValueError("no calibration samples (scores is empty)")


def threshold_for_eps(scores: Tensor, agree: Tensor, eps: float) -> float | None:
    """The lowest score whose tail (all samples scoring >= it) agrees at rate >= `eps`; `None`: never exit.

    `eps == 1` always gives `None` (ε = 1 means plain decoding).
    """
    _check(scores, agree, eps)
    if eps >= 1.0:
        return None
    order = scores.argsort()
    values = scores[order].double()  # (N,) ascending
    hits = agree[order].double()
    n = len(values)
    tail_hits = hits.flip(0).cumsum(0).flip(0)  # (N,) agreements among samples j..N-1
    tail_count = torch.arange(n, 0, -1, dtype=torch.double)
    first_of_group = torch.ones(n, dtype=torch.bool)
    first_of_group[1:] = values[1:] != values[:-1]  # a tail starts at the first of equal values
    ok = first_of_group & (tail_hits >= eps * tail_count - 1e-12)
    index = ok.nonzero()
    return float(values[index[0, 0]]) if len(index) else None


def exit_rate_and_agreement(scores: Tensor, agree: Tensor, threshold: float | None) -> tuple[float, float]:
    """Fraction of samples that would exit at `threshold`, and their agreement (nan when none exit)."""
    if threshold is None:
        return 0.0, math.nan
    leaves = scores >= threshold
    count = int(leaves.sum())
    return count / len(scores), (float(agree[leaves].double().mean()) if count else math.nan)


def thresholds_for_grid(scores: Tensor, agree: Tensor, grid: Sequence[float]) -> dict[str, float | None]:
    """`f"{eps:g}"` -> threshold for every ε in `grid`."""
    return {f"{float(eps):g}": threshold_for_eps(scores, agree, float(eps)) for eps in grid}


def auroc(scores: Tensor, agree: Tensor) -> float:
    """Area under the ROC curve of `scores` `(N,)` separating agreeing (`agree` `(N,)` true) from disagreeing samples.

    The probability that a random agreeing sample scores above a random disagreeing one (ties count one half), from
    average ranks (Mann-Whitney U). `nan` when either class is empty.
    """
    if scores.dim() != 1 or agree.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and agree {tuple(agree.shape)} must be 1-D of equal length")
    positive = agree.bool()
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)  # sorted values
    ends = counts.cumsum(0).double()  # (U,) 1-based rank of the last sample of each distinct value
    mean_rank = (ends - (counts.double() - 1) / 2)[inverse]  # (N,) average rank over ties
    u = float(mean_rank[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def coverage_at_agreement(scores: Tensor, agree: Tensor, target: float) -> float:
    """The largest fraction of samples one threshold can let exit while those agree at rate >= `target` (the most
    confident first): the exit rate at `threshold_for_eps(scores, agree, target)`; 0 when no threshold reaches it."""
    return exit_rate_and_agreement(scores, agree, threshold_for_eps(scores, agree, target))[0]


def row_logsumexp(logits: Tensor) -> Tensor:
    """`(batch, seq, vocab)` -> `(batch, seq)` float32 log-sum-exp, a row at a time (no second full-size tensor)."""
    return torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])


def next_token_errors(head, logits: Tensor, full_logits: Tensor, following: Tensor) -> tuple[Tensor, Tensor]:
    """Where a log-likelihood would read a head: its log-probability of the text's next token minus the full model's.

    Args:
        head: the exit head (maps its classes to token ids).
        logits: `(batch, seq, head_vocab)` the head's logits.
        full_logits: `(batch, seq, vocab)` the full model's logits.
        following: `(batch, seq)` long, the token each position predicts in the text (`-1`: none).

    Returns:
        `(error, top_is_next)`, both `(batch, seq)`: the head's log-probability of the next token (its class; where
        that is a real token, the same number scoring reads) minus the full model's, float32; and whether the head's
        top token is that next token (where `scoring_rule="top_token"` lets a position leave).
    """
    nxt = following.clamp(min=0)
    full_next = full_logits.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).float() - row_logsumexp(full_logits)
    head_next = F.log_softmax(logits.float(), dim=-1).gather(-1, head.classes_of(nxt).unsqueeze(-1)).squeeze(-1)
    top_is_next = (head.to_token_ids(logits.argmax(-1)) == following) & (following >= 0)
    return head_next - full_next, top_is_next


def gate_for_eps(scores: Tensor, errors: Tensor, eps: float, delta: float) -> float:
    """The scoring gate of one head at `eps`: the lowest confidence whose tail, among calibration tokens where the
    head's top token is the text's next token (`errors` finite there, NaN elsewhere), has the head's log-probability
    of that token within `delta` nats of the full model's at rate >= `eps`. `inf`: no score reaches it (the head
    never scores); `-inf`: no gate (`eps == 1` or `delta` infinite)."""
    if not (isinstance(delta, int | float) and delta > 0):
        raise ValueError(f"scoring_delta={delta!r} must be a positive number of nats")
    if eps >= 1.0 or math.isinf(delta):
        return -math.inf
    read = errors.isfinite() & scores.isfinite()
    if not bool(read.any()):
        return math.inf
    tau = threshold_for_eps(scores[read].double(), errors[read].abs() <= delta, eps)
    return math.inf if tau is None else tau


def gates_from_stats(stats: dict[str, Tensor] | None, num_exits: int, eps: float, delta: float
                     ) -> tuple[float, ...] | None:
    """Every exit's scoring gate (`gate_for_eps`) from calibration statistics (`score.j`, `error.j`); `None` where
    they hold no log-probability errors (calibrated before they were recorded) or `delta` is infinite: no gates."""
    stats = stats or {}
    if math.isinf(delta) or any(f"error.{j}" not in stats for j in range(num_exits)):
        return None
    return tuple(gate_for_eps(stats[f"score.{j}"], stats[f"error.{j}"], eps, delta) for j in range(num_exits))
