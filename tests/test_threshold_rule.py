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
    gate_for_eps,
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


@pytest.mark.parametrize("case", range(60))
def test_scoring_gate_matches_brute_force_over_the_tokens_a_head_would_be_read_at(case):
    """The gate is the lowest confidence whose tail, among tokens whose error is recorded (the head's top token is
    the next token: finite; elsewhere NaN), has |error| <= δ at rate >= ε; no such tail: the head is never read."""
    gen = torch.Generator().manual_seed(case)
    n = int(torch.randint(1, 50, (1,), generator=gen))
    scores = torch.rand(n, generator=gen)
    errors = (torch.randn(n, generator=gen) * (1.2 - scores)).float()  # confident tokens err less
    errors[torch.rand(n, generator=gen) < 0.3] = math.nan
    for eps in (0.5, 0.8, 0.9):
        for delta in (0.05, 0.3):
            read = [i for i in range(n) if not math.isnan(float(errors[i]))]
            expected = brute_force([float(scores[i]) for i in read], [abs(float(errors[i])) <= delta for i in read],
                                   eps) if read else None
            got = gate_for_eps(scores, errors, eps, delta)
            assert got == (math.inf if expected is None else pytest.approx(expected)), (eps, delta)


def test_scoring_gate_edge_cases_and_bad_delta():
    scores = torch.tensor([0.2, 0.5, 0.9, 0.95])
    errors = torch.tensor([0.5, math.nan, 0.05, -0.02])
    assert gate_for_eps(scores, errors, 0.9, 0.1) == pytest.approx(0.9)  # 0.2's error is too large; 0.5 is not read
    assert gate_for_eps(scores, errors, 0.6, 0.1) == pytest.approx(0.2)  # 2 of 3 read tokens within δ
    assert gate_for_eps(scores, errors, 0.9, 0.01) == math.inf  # no tail stays within 0.01
    assert gate_for_eps(scores, errors, 1.0, 0.1) == -math.inf  # ε = 1 never exits: no gate
    assert gate_for_eps(scores, errors, 0.9, math.inf) == -math.inf
    assert gate_for_eps(scores, torch.full((4,), math.nan), 0.9, 0.1) == math.inf  # never read on calibration
    for bad in (0, -0.1, "0.1", None):
        with pytest.raises(ValueError, match=f"scoring_delta={bad!r} must be a positive number"):
            gate_for_eps(scores, errors, 0.9, bad)


def test_gates_send_a_position_below_its_exits_gate_to_the_full_model_not_to_a_later_exit():
    from hf_earlyexit.modeling.exits_earlyexit import ExitRule, first_exit

    rule = ExitRule((0.5, 0.5), (True, True), "breaking_ties", gates=(0.8, -math.inf))
    scores = [torch.tensor([0.9, 0.6, 0.1, 0.6]), torch.tensor([0.9, 0.9, 0.9, 0.1])]
    index = first_exit(rule.fires_from_scores(scores))
    assert index.tolist() == [0, 0, 1, 0]
    # position 1 fires at exit 0 below its gate: the full model scores it, although exit 1 would fire there
    assert rule.gated(index, scores).tolist() == [0, 2, 1, 2]
    assert ExitRule((0.5, 0.5), (True, True), "breaking_ties").gated(index, scores).tolist() == [0, 0, 1, 0]
