import math

import numpy as np
import pytest

from lynx_exit.probe.conformal import (
    binomial_cdf,
    calibrate_events,
    calibrate_trajectories,
    conformal_quantile,
    harm_labels,
    trajectory_loss,
)


def test_quantile_rank_and_no_clipping():
    scores = np.arange(1, 11) / 10.0  # n = 10
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.9)  # rank ceil(11 * 0.8) = 9
    assert math.isinf(conformal_quantile(scores, 0.05))  # rank 11 > n: never clipped to n
    with pytest.raises(ValueError, match="delta"):
        conformal_quantile(scores, 1.5)


def test_never_exit_when_too_few_unsafe_events():
    rule = calibrate_events(np.array([0.9, 0.2, 0.95]), np.array([1, 0, 1]), delta=0.05)
    assert rule.never_exit and not rule.should_exit(0.999999)
    assert rule.to_dict()["q_neg"] == "inf"


def _synthetic(rng, n):
    labels = rng.random(n) < 0.5
    probs = np.clip(rng.normal(np.where(labels, 0.7, 0.35), 0.18), 0, 1)
    return probs, labels.astype(int)


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.2])
def test_event_guarantee_holds_over_random_splits(delta):
    """Mean unsafe-exit rate over 200 splits ≤ δ + 3 standard errors.

    The conformal bound is exact in expectation; with 200 splits of ~500 unsafe test events
    the mean's standard error is ≤ sqrt(δ(1-δ)/(200·500)), so a correct implementation fails
    this only with probability ≈ 0.13 % (one-sided 3σ).
    """
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):
        cal_p, cal_y = _synthetic(rng, 400)
        test_p, test_y = _synthetic(rng, 1000)
        rule = calibrate_events(cal_p, cal_y, delta)
        exits = np.array([rule.should_exit(p) for p in test_p[test_y == 0]])
        rates.append(exits.mean())
    n_unsafe = 500
    bound = delta + 3 * math.sqrt(delta * (1 - delta) / (200 * n_unsafe))
    assert np.mean(rates) <= bound
    assert np.mean(rates) > 0  # it does exit


def _rollouts(rng, n):
    out = []
    for _ in range(n):
        length = rng.integers(2, 8)
        safe_from = rng.integers(0, length + 1)
        labels = [int(i >= safe_from) for i in range(length)]
        probs = [float(np.clip(rng.normal(0.75 if y else 0.4, 0.15), 0, 1)) for y in labels]
        out.append((probs, labels))
    return out


def test_trajectory_guarantee_holds_over_random_splits():
    """P(calibration gives premature-rollout risk > δ) ≤ ε: check it over 150 splits.

    Learn-then-Test guarantees P(risk(t̂) > δ) ≤ ε = 0.1; with 150 splits the count of
    violations exceeds 150·ε + 3·sqrt(150·ε(1-ε)) ≈ 26.0 with probability ≈ 0.2 %.
    The true risk of each chosen threshold is estimated on 4000 fresh rollouts.
    """
    rng = np.random.default_rng(1)
    delta, epsilon = 0.1, 0.1
    test = _rollouts(rng, 4000)
    violations, exits = 0, 0
    for _ in range(150):
        rule = calibrate_trajectories(_rollouts(rng, 300), delta, epsilon, grid=np.linspace(0.01, 1.0, 100))
        risk = np.mean([trajectory_loss(p, y, rule.threshold) for p, y in test])
        violations += risk > delta + 0.01  # 0.01: the test-set estimate's own error (~4.7 σ)
        exits += not rule.never_exit
    assert violations <= 150 * epsilon + 3 * math.sqrt(150 * epsilon * (1 - epsilon))
    assert exits > 100


def test_harm_labels_forgive_rollouts_that_are_wrong_anyway():
    rollouts = [([0.2, 0.9], [0, 1]), ([0.8, 0.9], [0, 0])]
    relabelled = harm_labels(rollouts, [True, False])
    assert relabelled == [([0.2, 0.9], [0, 1]), ([0.8, 0.9], [1, 1])]
    assert [trajectory_loss(p, y, 0.5) for p, y in relabelled] == [0, 0]
    with pytest.raises(ValueError, match="correctness flags"):
        harm_labels(rollouts, [True])


def test_binomial_cdf():
    assert binomial_cdf(0, 3, 0.5) == pytest.approx(0.125)
    assert binomial_cdf(3, 3, 0.5) == pytest.approx(1.0)
    assert (
        binomial_cdf(-1, 3, 0.5) == 0.0 and binomial_cdf(2, 3, 0.0) == 1.0 and binomial_cdf(2, 3, 1.0) == 0.0
    )


def _exact_cdf_tenths(k, n, tenths):
    """P(Binomial(n, tenths/10) <= k) in exact integer arithmetic."""
    total, comb = 0, 1
    for i in range(k + 1):
        total += comb * tenths**i * (10 - tenths) ** (n - i)
        comb = comb * (n - i) // (i + 1)
    return total / 10**n


@pytest.mark.parametrize(
    "k,n,tenths",
    [(300, 3000, 1), (130, 1400, 1), (950, 10_000, 1), (1000, 10_000, 1), (2900, 10_000, 3), (5, 10_000, 1)],
)
def test_binomial_cdf_at_paper_scale_matches_exact_arithmetic(k, n, tenths):
    """Reproduction: the float sum raised OverflowError from about 1,200 calibration rollouts."""
    exact = _exact_cdf_tenths(k, n, tenths)
    assert binomial_cdf(k, n, tenths / 10) == pytest.approx(exact, rel=1e-9, abs=1e-300)
