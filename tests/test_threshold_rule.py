"""Confidence metrics on hand-built logits and the paper's threshold rule against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from hf_earlyexit.modeling.metrics_earlyexit import (
    breaking_ties,
    confidence,
    entropy,
    exit_rate_and_agreement,
    max_prob,
    threshold_for_eps,
)


def brute_force(scores: list[float], agree: list[bool], eps: float) -> float | None:
    """The lowest value whose tail (every sample scoring >= it) agrees at rate >= eps."""
    if eps >= 1.0:
        return None
    for value in sorted(set(scores)):
        tail = [a for s, a in zip(scores, agree, strict=True) if s >= value]
        if sum(tail) >= eps * len(tail) - 1e-12:
            return value
    return None


def test_metrics_on_hand_built_logits():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert breaking_ties(logits).item() == pytest.approx(0.2)
    assert max_prob(logits).item() == pytest.approx(0.5)
    assert entropy(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)))
    flat = torch.zeros(2, 3, 8)
    assert torch.allclose(entropy(flat), torch.full((2, 3), math.log(8)))
    assert torch.allclose(breaking_ties(flat), torch.zeros(2, 3))


@pytest.mark.parametrize("metric", ["breaking_ties", "max_prob", "entropy"])
def test_confidence_is_higher_for_peaked_distributions(metric):
    peaked, flat = torch.tensor([5.0, 0.0, 0.0]), torch.tensor([1.0, 0.9, 0.8])
    assert confidence(metric, logits=peaked) > confidence(metric, logits=flat)
    if metric == "entropy":
        assert confidence(metric, logits=flat) == -entropy(flat)


def test_hidden_similarity_and_bad_metric():
    h = torch.tensor([[1.0, 2.0]])
    assert confidence("hidden_similarity", hidden=h, previous_hidden=h).item() == pytest.approx(1.0)
    assert confidence("hidden_similarity", hidden=h, previous_hidden=-h).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="metric='vibes' is not one of"):
        confidence("vibes", logits=h)
    with pytest.raises(ValueError, match="needs hidden and previous_hidden"):
        confidence("hidden_similarity", logits=h)


@pytest.mark.parametrize("case", range(300))
def test_threshold_rule_matches_brute_force(case):
    gen = torch.Generator().manual_seed(case)
    n = int(torch.randint(1, 60, (1,), generator=gen))
    if case % 3 == 0:  # heavy ties: a handful of discrete values
        scores = torch.randint(0, 4, (n,), generator=gen).float() / 4
    else:
        scores = torch.rand(n, generator=gen)
    kind = case % 5
    if kind == 0:
        agree = torch.ones(n, dtype=torch.bool)
    elif kind == 1:
        agree = torch.zeros(n, dtype=torch.bool)
    else:  # agreement more likely at high scores, as with a useful metric
        agree = torch.rand(n, generator=gen) < scores * 0.8 + 0.2
    for eps in (0.0, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0):
        expected = brute_force(scores.tolist(), agree.tolist(), eps)
        got = threshold_for_eps(scores, agree, eps)
        assert got == (None if expected is None else pytest.approx(expected)), (eps, scores, agree)


def test_never_exits_and_coverage():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    agree = torch.tensor([True, False, True, False])
    assert threshold_for_eps(scores, agree, 0.9) is None  # the top sample disagrees: no tail reaches 0.9
    assert threshold_for_eps(scores, agree, 0.5) == pytest.approx(0.1)
    assert exit_rate_and_agreement(scores, agree, 0.3) == (0.5, 0.5)
    coverage, agreement = exit_rate_and_agreement(scores, agree, None)
    assert coverage == 0.0 and math.isnan(agreement)


@pytest.mark.parametrize(("eps", "message"), [(1.5, "eps=1.5"), (-0.1, "eps=-0.1"), (float("nan"), "eps=nan")])
def test_bad_eps(eps, message):
    with pytest.raises(ValueError, match=message):
        threshold_for_eps(torch.tensor([0.1]), torch.tensor([True]), eps)


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal length"):
        threshold_for_eps(torch.tensor([0.1, 0.2]), torch.tensor([True]), 0.5)
    with pytest.raises(ValueError, match="empty"):
        threshold_for_eps(torch.tensor([]), torch.tensor([], dtype=torch.bool), 0.5)
