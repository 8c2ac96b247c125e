"""The exit rule, written once (portable: torch + siblings).

At accuracy target ε every exit `j` has a threshold τ_j(ε) (`None`: it never fires). A position *fires* at exit `j`
when that exit is checked, its head's confidence reaches τ_j and the head's top class is a real token (not a draft
head's `OTHER`); it *leaves* at the first exit that fires, else it goes to the full model. Early-exit decoding, DSSD's
drafts, lm-eval's scored positions, calibration tables and the exit policy all call `take_first` / `first_exit`;
`ExitRule.fires` is the one place that turns head logits into a firing decision.

Which exits are checked (`exit_policy`): `"all"` checks every exit with a threshold; `"auto"` keeps the subset that
reads the fewest weight bytes per token on the calibration tokens (`choose_checked`), so an exit that seldom fires at
this ε does not cost a head evaluation on every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .costs_earlyexit import CostModel
from .metrics_earlyexit import confidence, threshold_for_eps
from .options_earlyexit import EXIT_POLICIES


def take_first(index: Tensor, j: int, fire: Tensor, num_exits: int) -> Tensor:
    """One rung of the rule: elements still going (`index == num_exits`) whose exit `j` fires leave there.

    Args:
        index: `(...)` long, the exit each element left at so far (`num_exits`: none yet).
        fire: `(...)` bool, exit `j` fires.
    """
    return torch.where(fire & (index == num_exits), j, index)


def first_exit(fires: Sequence[Tensor | None]) -> Tensor:
    """`fires[j]` `(...)` bool per exit (`None`: not checked) -> `(...)` long, the first exit that fires
    (`len(fires)`: none, the full model)."""
    shape = next(f.shape for f in fires if f is not None)
    device = next(f.device for f in fires if f is not None)
    index = torch.full(shape, len(fires), dtype=torch.long, device=device)
    for j, fire in enumerate(fires):
        if fire is not None:
            index = take_first(index, j, fire, len(fires))
    return index


@dataclass(frozen=True)
class ExitRule:
    """The exit rule of one ε: per exit its threshold, whether it is checked, and the confidence metric.

    `gates` (scored positions only, `scoring_delta`): per exit a second, higher confidence a position that leaves
    there must also reach for a log-likelihood to read the head; one below it is scored by the full model (it does
    not move on to a later exit: the first exit that fires still decides, as in decoding). `None`: no gates.
    """

    thresholds: tuple[float | None, ...]
    checked: tuple[bool, ...]
    metric: str
    gates: tuple[float, ...] | None = None

    @classmethod
    def for_model(cls, model, eps: float, policy: str = "all", kv_fill: str = "recompute") -> ExitRule:
        """The rule of `model` at `eps`: its calibrated thresholds, the exits `policy` checks."""
        if policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy={policy!r} is not one of {', '.join(EXIT_POLICIES)}")
        thresholds = tuple(model.thresholds_for(eps))
        checked = tuple(tau is not None for tau in thresholds)
        stats = model.calibration_stats
        if policy == "auto" and any(checked) and stats and "aligned" in stats:
            scores = torch.stack([stats[f"score.{j}"].double() for j in range(len(thresholds))], dim=1)  # (N, K)
            checked = choose_checked(scores, thresholds, model.costs, kv_fill)
        return cls(thresholds, checked, model.config.metric)

    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    @property
    def last(self) -> int:
        """Index of the deepest checked exit (-1: none)."""
        return max((j for j, on in enumerate(self.checked) if on), default=-1)

    @property
    def needs_hidden(self) -> bool:
        """The metric compares consecutive exits' hidden states, so every exit's layer output is needed."""
        return self.metric == "hidden_similarity"

    def fires(self, j: int, head, logits: Tensor, hidden: Tensor | None = None,
              previous: Tensor | None = None) -> Tensor:
        """`(...)` bool: exit `j` fires for head logits `(..., head_vocab)` (its hidden states `(..., hidden)` and the
        previous exit's, for `hidden_similarity`)."""
        tau = self.thresholds[j]
        if not self.checked[j] or tau is None:
            return torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        return self.fires_at(j, head, self.score(logits, hidden, previous), logits)

    def score(self, logits: Tensor, hidden: Tensor | None = None, previous: Tensor | None = None) -> Tensor:
        """`(...)` the confidence of head logits `(..., head_vocab)` under this rule's metric."""
        return confidence(self.metric, logits=logits, hidden=hidden, previous_hidden=previous)

    def fires_at(self, j: int, head, score: Tensor, logits: Tensor) -> Tensor:
        """`fires` from a head's confidence `score` `(...)` already taken."""
        tau = self.thresholds[j]
        if not self.checked[j] or tau is None:
            return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        return (score >= tau) & (head.to_token_ids(logits.argmax(dim=-1)) >= 0)

    def gated(self, index: Tensor, scores: Sequence[Tensor | None]) -> Tensor:
        """The first-exit `index` `(...)` with the positions that leave at an exit but score below its gate sent to
        the full model (`scores[j]` `(...)`: exit `j`'s confidence, `None` where not checked)."""
        if self.gates is None:
            return index
        for j, (gate, score) in enumerate(zip(self.gates, scores, strict=True)):
            if score is not None and gate > -math.inf:
                index = torch.where((index == j) & (score < gate), self.num_exits, index)
        return index

    def fires_from_scores(self, scores: Sequence[Tensor]) -> list[Tensor | None]:
        """Per exit, `(N,)` bool from precomputed confidence scores (calibration tokens): `score >= τ`."""
        return [scores[j] >= tau if on and tau is not None else None
                for j, (tau, on) in enumerate(zip(self.thresholds, self.checked, strict=True))]


def choose_checked(scores: Tensor, thresholds: Sequence[float | None], costs: CostModel,
                   kv_fill: str = "recompute") -> tuple[bool, ...]:
    """The subset of exits to check (`exit_policy="auto"`): the one with the fewest weight bytes read per token when
    every calibration token `scores` `(N, K)` leaves at the first checked exit that fires.

    Skipped layers cost nothing more with `kv_fill="recompute"` (their catch-up rides along with the next deep
    token's weight reads) and their KV-only projections with `"propagate"`.
    """
    candidates = [j for j, tau in enumerate(thresholds) if tau is not None]
    layer_bytes = [c.weight_bytes for c in costs.layers]
    kv_bytes = [c.weight_bytes for c in costs.kv()] if kv_fill == "propagate" else [0] * len(layer_bytes)
    full = float(costs.full.weight_bytes)
    best, best_cost = tuple(tau is not None for tau in thresholds), None
    for mask in range(1 << len(candidates)):
        chosen = tuple(j in {candidates[b] for b in range(len(candidates)) if mask >> b & 1}
                       for j in range(len(thresholds)))
        rule = ExitRule(tuple(thresholds), chosen, "")
        index = first_exit(rule.fires_from_scores(scores.unbind(1))) if any(chosen) else torch.full(
            (scores.shape[0],), len(thresholds), dtype=torch.long)
        checked_bytes, per_exit = 0.0, []
        for j, on in enumerate(chosen):  # cost of leaving at exit j, having checked every chosen exit up to it
            checked_bytes += costs.heads[j].weight_bytes if on else 0
            layer = costs.exit_layers[j]
            per_exit.append(sum(layer_bytes[:layer]) + sum(kv_bytes[layer:]) + checked_bytes)
        per_exit.append(full + checked_bytes)
        mean = float(torch.tensor(per_exit, dtype=torch.double)[index].mean())
        if best_cost is None or mean < best_cost:
            best, best_cost = chosen, mean
    return best


RULE_FITS = ("cascade", "per_head")


def fit_thresholds(scores: Sequence[Tensor], agree: Sequence[Tensor], eps: float, fit: str = "cascade"
                   ) -> list[float | None]:
    """Per-exit thresholds at `eps` from calibration tokens: `scores[j]`, `agree[j]` `(N,)` of exit `j`, aligned
    (entry `i` is one token for every exit).

    `fit="cascade"` fits the whole rule: each exit on the tokens the exits before it let through, so the tokens that
    leave at every exit agree at rate >= `eps` and so do all exited tokens together (an exit judged on every token
    would count the easy ones earlier exits already took, and let through too many hard ones). `fit="per_head"`
    fits each exit alone on every token (how folders calibrated before the cascade fit were made).
    """
    if fit not in RULE_FITS:
        raise ValueError(f"fit={fit!r} is not one of {', '.join(RULE_FITS)}")
    if fit == "per_head":
        return [threshold_for_eps(s, a.bool(), eps) for s, a in zip(scores, agree, strict=True)]
    through = torch.ones_like(scores[0], dtype=torch.bool)  # tokens no earlier exit took
    thresholds: list[float | None] = []
    for score, hit in zip(scores, agree, strict=True):
        tau = threshold_for_eps(score[through], hit.bool()[through], eps) if bool(through.any()) else None
        thresholds.append(tau)
        if tau is not None:
            through &= score < tau
    return thresholds

