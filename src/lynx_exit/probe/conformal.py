"""Split conformal calibration of exit thresholds (how-it-works §5): per-event and per-trajectory, and
give-up.

Per-event thresholds are computed per decision point kind (group-conditional conformal: the guarantee holds
for each kind). Per-trajectory thresholds calibrate the combined stopping rule, the first crossing over all
enabled kinds, with one loss per rollout. Pure functions over numpy arrays; no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_DELTAS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_threshold(name: str, value: float) -> None:
    """A score threshold lives in [0, 1]; +inf means "never exit"."""
    if not (0 <= value <= 1 or value == math.inf):
        raise ValueError(f"{name} must be in [0, 1] or inf, got {value}")


def conformal_quantile(scores: np.ndarray, delta: float) -> float:
    """The ⌈(n+1)(1−δ)⌉-th smallest score; +inf when that rank exceeds n (no clipping)."""
    _check_delta(delta)
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - delta))
    if rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


@dataclass(frozen=True)
class EventThreshold:
    """Class-conditional split conformal thresholds at one δ.

    Exit iff the prediction set is {safe}: p ≥ 1 − q_pos and p > q_neg. Under
    exchangeability, P(exit | event unsafe) ≤ δ for each cue event.
    """

    delta: float
    q_pos: float
    q_neg: float
    n_pos: int
    n_neg: int
    point: str = "cue"  # the decision point kind these events are of

    def __post_init__(self) -> None:
        _check_delta(self.delta)
        _check_threshold("q_pos", self.q_pos)
        _check_threshold("q_neg", self.q_neg)
        if self.n_pos < 0 or self.n_neg < 0:
            raise ValueError(f"n_pos and n_neg must be >= 0, got {self.n_pos}, {self.n_neg}")

    @property
    def never_exit(self) -> bool:
        """Too few unsafe calibration events for this δ: q_neg = +inf, so no score exits."""
        return math.isinf(self.q_neg)

    def should_exit(self, prob_safe: float) -> bool:
        return prob_safe >= 1 - self.q_pos and prob_safe > self.q_neg

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("q_pos", "q_neg"):
            if math.isinf(out[key]):
                out[key] = "inf"
        return {**out, "never_exit": self.never_exit}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventThreshold:
        return cls(
            delta=float(data["delta"]),
            q_pos=float(data["q_pos"]),
            q_neg=float(data["q_neg"]),
            n_pos=int(data["n_pos"]),
            n_neg=int(data["n_neg"]),
            point=str(data.get("point", "cue")),
        )


def calibrate_events(
    probs: np.ndarray, labels: np.ndarray, delta: float, point: str = "cue"
) -> EventThreshold:
    """Per-event thresholds from calibration scores `probs` (P(safe)) and 0/1 `labels` of events of kind
    `point`."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels).astype(bool)
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in shape")
    positives, negatives = probs[labels], probs[~labels]
    return EventThreshold(
        delta=delta,
        q_pos=conformal_quantile(1 - positives, delta) if len(positives) else math.inf,
        q_neg=conformal_quantile(negatives, delta) if len(negatives) else math.inf,
        n_pos=int(len(positives)),
        n_neg=int(len(negatives)),
        point=point,
    )


def first_exit_event(probs: Sequence[float], threshold: float) -> int | None:
    """Index of the first event whose score reaches `threshold`."""
    for index, prob in enumerate(probs):
        if prob >= threshold:
            return index
    return None


def trajectory_loss(probs: Sequence[float], labels: Sequence[int], threshold: float) -> int:
    """1 if the rollout's first exit at `threshold` lands on an unsafe event, else 0."""
    index = first_exit_event(probs, threshold)
    return int(index is not None and not labels[index])


def harm_labels(
    rollouts: Sequence[tuple[Sequence[float], Sequence[int]]], full_cot_correct: Sequence[bool]
) -> list[tuple[Sequence[float], list[int]]]:
    """Relabel for the "harm" loss: in a rollout whose full chain of thought is wrong anyway, no exit
    can cost accuracy, so all its events count as safe; other rollouts keep their labels."""
    if len(rollouts) != len(full_cot_correct):
        raise ValueError(f"{len(rollouts)} rollouts but {len(full_cot_correct)} correctness flags")
    pairs = zip(rollouts, full_cot_correct, strict=True)
    return [(probs, list(labels) if correct else [1] * len(labels)) for (probs, labels), correct in pairs]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k), summed in log space.

    The direct sum multiplies `math.comb(n, i)` (an exact integer) by a float and overflows
    from about n = 1,200 (`binomial_cdf(300, 3000, 0.1)`); the paper calibrates on 1,400 problems.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0:
        return 1.0
    if p == 1:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n_factorial = math.lgamma(n + 1)
    logs = [
        log_n_factorial - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


@dataclass(frozen=True)
class TrajectoryThreshold:
    """Learn-then-Test threshold on P(safe) for the first exit of a rollout.

    With probability ≥ 1 − ε over the calibration rollouts, a new exchangeable rollout
    exits prematurely (first passing event unsafe) with probability ≤ δ.
    """

    delta: float
    epsilon: float
    threshold: float  # +inf: never exit
    n_rollouts: int
    empirical_risk: float
    points: str = "cue"  # the decision point kinds of the stopping rule (`points_key`)

    def __post_init__(self) -> None:
        _check_delta(self.delta)
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        _check_threshold("threshold", self.threshold)

    @property
    def never_exit(self) -> bool:
        return math.isinf(self.threshold)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if math.isinf(self.threshold):
            out["threshold"] = "inf"
        return {**out, "never_exit": self.never_exit}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrajectoryThreshold:
        return cls(
            delta=float(data["delta"]),
            epsilon=float(data["epsilon"]),
            threshold=float(data["threshold"]),
            n_rollouts=int(data["n_rollouts"]),
            empirical_risk=float(data["empirical_risk"]),
            points=str(data.get("points", "cue")),
        )


def trajectory_losses(
    rollouts: Sequence[tuple[Sequence[float], Sequence[int]]], thresholds: Sequence[float]
) -> np.ndarray:
    """`trajectory_loss` summed over the rollouts, at each threshold at once. A rollout's first exit at t is
    its first running maximum that reaches t, so only the points that raise the running maximum matter."""
    grid = np.asarray(thresholds, dtype=np.float64)
    totals = np.zeros(len(grid), dtype=np.int64)
    for probs, labels in rollouts:
        if not len(probs):
            continue
        values = np.asarray(probs, dtype=np.float64)
        running = np.maximum.accumulate(values)
        raises = np.flatnonzero(np.r_[True, running[1:] > running[:-1]])  # where the running maximum goes up
        records, unsafe = values[raises], 1 - np.asarray(labels, dtype=np.int64)[raises]
        first = np.searchsorted(records, grid, side="left")  # the first record ≥ t (records increase)
        totals += np.where(first < len(records), unsafe[np.minimum(first, len(records) - 1)], 0)
    return totals


def fixed_sequence(
    thresholds: Sequence[float],
    losses: Callable[[float], int],
    n: int,
    delta: float,
    epsilon: float,
    none: float,
    what: str,
) -> tuple[float, float]:
    """Fixed-sequence Learn-then-Test over `thresholds`, most conservative first: test H_t: risk(t) > δ with
    the exact binomial p-value P(Bin(n, δ) ≤ losses(t)), accept while p ≤ ε, stop at the first failure (this
    controls the family-wise error at ε without assuming the risk is monotone in t). (The last accepted
    threshold, its empirical risk); (`none`, 0) if the first is refused."""
    _check_delta(delta)
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if n == 0:
        raise ValueError(f"{what} calibration needs at least one rollout")
    chosen, chosen_risk = none, 0.0
    for threshold in thresholds:
        count = losses(threshold)
        if binomial_cdf(count, n, delta) > epsilon:
            break
        chosen, chosen_risk = float(threshold), count / n
    return chosen, chosen_risk


def calibrate_trajectories(
    rollouts: Sequence[tuple[Sequence[float], Sequence[int]]],
    delta: float,
    epsilon: float = 0.1,
    grid: Sequence[float] | None = None,
    points: str = "cue",
) -> TrajectoryThreshold:
    """Learn-then-Test with fixed-sequence testing from the strictest threshold down.

    For each threshold t (descending) test H_t: risk(t) > δ with the exact binomial
    p-value P(Bin(n, δ) ≤ n·R̂(t)); accept thresholds while p ≤ ε, stop at the first
    failure (fixed-sequence testing controls the family-wise error at ε without assuming
    the risk is monotone in t). The chosen threshold is the last accepted one.
    """
    n = len(rollouts)
    thresholds = sorted(grid if grid is not None else np.linspace(0.0, 1.0, 201)[1:], reverse=True)
    totals = dict(zip(thresholds, trajectory_losses(rollouts, thresholds).tolist(), strict=True))
    chosen, chosen_risk = fixed_sequence(
        thresholds, totals.__getitem__, n, delta, epsilon, none=math.inf, what="trajectory"
    )
    return TrajectoryThreshold(
        delta=delta,
        epsilon=epsilon,
        threshold=chosen,
        n_rollouts=n,
        empirical_risk=chosen_risk,
        points=points,
    )


@dataclass(frozen=True)
class GiveUpThreshold:
    """Learn-then-Test lower threshold: give up at a decision point (from `min_tokens` generated tokens on)
    whose P(safe) ≤ `threshold`, answering at once as a trace judged lost.

    With probability ≥ 1 − ε over the calibration rollouts, a new exchangeable rollout whose full chain
    would have ended right is given up on with probability ≤ δ. The loss counts every crossing of the lower
    threshold, whether or not an exit would have come first: an exit rule only removes give-ups, so the bound
    holds with any exit rule, and the exit rule's own guarantee holds whatever the give-up does (a give-up
    only stops traces; it never makes an exit happen)."""

    delta: float
    epsilon: float
    threshold: float  # 0: never give up
    min_tokens: int
    n_rollouts: int
    empirical_risk: float
    points: str = "cue"

    def __post_init__(self) -> None:
        _check_delta(self.delta)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"give-up threshold must be in [0, 1], got {self.threshold}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def never(self) -> bool:
        return self.threshold <= 0

    def should_give_up(self, prob_safe: float, tokens: int) -> bool:
        return not self.never and tokens >= self.min_tokens and prob_safe <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "never": self.never}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GiveUpThreshold:
        return cls(
            delta=float(data["delta"]),
            epsilon=float(data["epsilon"]),
            threshold=float(data["threshold"]),
            min_tokens=int(data["min_tokens"]),
            n_rollouts=int(data["n_rollouts"]),
            empirical_risk=float(data["empirical_risk"]),
            points=str(data.get("points", "cue")),
        )


def give_up_loss(
    probs: Sequence[float], tokens: Sequence[int], full_correct: bool, threshold: float, min_tokens: int
) -> int:
    """1 if a rollout whose full chain is right crosses the lower threshold at a point from `min_tokens`
    on."""
    return int(
        full_correct
        and threshold > 0
        and any(t >= min_tokens and p <= threshold for p, t in zip(probs, tokens, strict=True))
    )


def calibrate_give_up(
    rollouts: Sequence[tuple[Sequence[float], Sequence[int], bool]],
    delta: float,
    epsilon: float = 0.1,
    min_tokens: int = 200,
    grid: Sequence[float] | None = None,
    points: str = "cue",
) -> GiveUpThreshold:
    """Fixed-sequence Learn-then-Test from the conservative end (the lowest threshold) up: each rollout is
    (P(safe) at its points, their token indices, whether its full chain ended right)."""
    n = len(rollouts)
    thresholds = sorted(grid if grid is not None else np.linspace(0.0, 1.0, 201)[1:])
    # A right rollout is lost at threshold g iff its lowest score from `min_tokens` on is ≤ g
    # (`give_up_loss`).
    lowest = np.array(
        [
            min((p for p, t in zip(probs, tokens, strict=True) if t >= min_tokens), default=math.inf)
            for probs, tokens, right in rollouts
            if right
        ]
    )
    chosen, chosen_risk = fixed_sequence(
        thresholds,
        lambda g: int((lowest <= g).sum()) if g > 0 else 0,
        n,
        delta,
        epsilon,
        none=0.0,
        what="give-up",
    )
    return GiveUpThreshold(
        delta=delta,
        epsilon=epsilon,
        threshold=chosen,
        min_tokens=min_tokens,
        n_rollouts=n,
        empirical_risk=chosen_risk,
        points=points,
    )
