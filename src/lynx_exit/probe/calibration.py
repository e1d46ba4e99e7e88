"""Probe training and conformal calibration of a probe folder (how-it-works §4-§5), from build-data
folders."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lynx_exit.artifacts import FolderLock, command_line
from lynx_exit.decision_points import DEFAULT_EXIT_PREFIX, points_key
from lynx_exit.probe import (
    ProbeBundle,
    ProbeTrainConfig,
    load_probe,
    save_probe,
    train_probe,
    write_conformal,
)
from lynx_exit.probe.conformal import (
    DEFAULT_DELTAS,
    calibrate_events,
    calibrate_give_up,
    calibrate_trajectories,
    give_up_loss,
    harm_labels,
    trajectory_loss,
)
from lynx_exit.probe.dataset import Dataset
from lynx_exit.probe.sharing import write_model_card


def dataset_summary(dataset: Dataset) -> dict[str, Any]:
    """What a probe records about the data it was trained or calibrated on (shown in its model card)."""
    labels = [int(e["label"]) for e in dataset.events]
    return {
        "folder": str(dataset.folder) if dataset.folder is not None else None,
        "task": dataset.meta.get("task"),
        "model": dataset.meta.get("model"),
        "problems": len(dataset.problem_ids),
        "rollouts": len(dataset.rollouts),
        "events": len(labels),
        "safe_events": sum(labels),
        "events_by_point": {kind: dataset.points.count(kind) for kind in dataset.kinds},
        "generation": dataset.meta.get("generation"),
        "command": dataset.meta.get("command"),
    }


def train_probe_folder(
    dataset: Dataset, out_dir: Path, config: ProbeTrainConfig, dataset_dir: str
) -> dict[str, Any]:
    """Train a probe on `dataset` and write it to `out_dir` (locked meanwhile)."""
    if len(dataset.events) == 0:
        raise ValueError(f"dataset {dataset_dir!r} has no events to train on")
    with FolderLock(out_dir, "lynx-exit train/calibrate"):
        return _train(dataset, out_dir, config, dataset_dir)


def _train(dataset: Dataset, out_dir: Path, config: ProbeTrainConfig, dataset_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    probe, metrics = train_probe(dataset.features, dataset.labels, config, dataset.points)
    meta: dict[str, Any] = {
        "format": "lynx-exit-probe-v1",
        "training_data": dataset_dir,
        "training_task": dataset.meta.get("task"),
        "exit_prefix": dataset.meta.get("build", {}).get("exit_prefix", DEFAULT_EXIT_PREFIX),
        "training_problem_ids": sorted(dataset.problem_ids),
        "training_dataset": dataset_summary(dataset),
        "command": command_line(),
        "train_config": asdict(config),
        "metrics": {**metrics, "train_seconds": round(time.perf_counter() - started, 2)},
    }
    save_probe(out_dir, probe, dataset.spec, meta)
    return meta["metrics"]


@dataclass
class RolloutScores:
    """One rollout's events of some decision point kinds, in order: P(safe), labels, token indices."""

    probs: list[float]
    labels: list[int]
    tokens: list[int]
    correct: bool  # its full chain ended right

    @property
    def pair(self) -> tuple[list[float], list[int]]:
        return self.probs, self.labels


def event_probs(bundle: ProbeBundle, dataset: Dataset) -> np.ndarray:
    """The probe's P(safe) of every event (each scored as its own kind)."""
    if not dataset.events:
        return np.zeros(0)
    return bundle.probe.prob_safe(dataset.features, dataset.points).numpy()


def rollout_scores(
    bundle: ProbeBundle,
    dataset: Dataset,
    points: Sequence[str] | None = None,
    probs: np.ndarray | None = None,
) -> list[RolloutScores]:
    """Per rollout, its events of kinds `points` (all kinds: None) in order, scored by the probe."""
    probs = event_probs(bundle, dataset) if probs is None else probs
    grouped: dict[tuple[str, int], list[tuple[int, float, int]]] = defaultdict(list)
    for event, kind, prob in zip(dataset.events, dataset.points, probs, strict=True):
        if points is None or kind in points:
            grouped[(event["problem_id"], event["rollout"])].append(
                (event["token_index"], float(prob), int(event["label"]))
            )
    out = []
    for rollout in dataset.rollouts:
        items = sorted(grouped.get((rollout["problem_id"], rollout["rollout"]), []))
        out.append(
            RolloutScores(
                [p for _, p, _ in items],
                [label for _, _, label in items],
                [t for t, _, _ in items],
                bool(rollout["correct"]),
            )
        )
    return out


def point_sets(kinds: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty set of `kinds`: the stopping rules a request may enable, each calibrated on its own."""
    return [combo for size in range(1, len(kinds) + 1) for combo in itertools.combinations(kinds, size)]


def calibrate_probe_folder(
    probe_dir: Path,
    dataset: Dataset,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    epsilon: float = 0.1,
    give_up_after: int = 200,
) -> dict[str, Any]:
    """Write `conformal.json` (per-event thresholds per decision point kind; trajectory, harm and give-up
    thresholds per set of kinds) from a disjoint calibration set, and the folder's `README.md` model card.
    `give_up_after`: generated tokens before a give-up may happen."""
    with FolderLock(probe_dir, "lynx-exit train/calibrate"):
        report = _calibrate(probe_dir, dataset, deltas, epsilon, give_up_after)
        write_model_card(probe_dir)
        return report


def _calibrate(
    probe_dir: Path, dataset: Dataset, deltas: Sequence[float], epsilon: float, give_up_after: int
) -> dict[str, Any]:
    bundle = load_probe(probe_dir, calibration=False)
    bundle.spec.check_compatible(dataset.spec, what=f"probe {str(probe_dir)!r}")
    overlap = set(bundle.meta.get("training_problem_ids", [])) & dataset.problem_ids
    if overlap:
        raise ValueError(
            f"calibration data shares {len(overlap)} problems with the probe's training data "
            f"(e.g. {sorted(overlap)[:3]}); conformal guarantees need disjoint problems"
        )
    if not dataset.events:
        raise ValueError("calibration dataset has no events")
    if give_up_after < 0:
        raise ValueError(f"give_up_after must be >= 0 tokens, got {give_up_after}")
    bundle.check_points(dataset.kinds)
    probs = event_probs(bundle, dataset)
    labels = dataset.labels.numpy()
    kinds = np.array(dataset.points)
    event = [
        calibrate_events(probs[kinds == kind], labels[kinds == kind], d, point=kind)
        for kind in dataset.kinds
        for d in deltas
    ]
    trajectory, harm, give_up = [], [], []
    for points in point_sets(dataset.kinds):
        key = points_key(points)
        rollouts = rollout_scores(bundle, dataset, points, probs)
        pairs = [r.pair for r in rollouts]
        relabelled = harm_labels(pairs, [r.correct for r in rollouts])
        triples = [(r.probs, r.tokens, r.correct) for r in rollouts]
        for d in deltas:
            trajectory.append(calibrate_trajectories(pairs, d, epsilon, points=key))
            harm.append(calibrate_trajectories(relabelled, d, epsilon, points=key))
            give_up.append(calibrate_give_up(triples, d, epsilon, min_tokens=give_up_after, points=key))
    report = {
        "calibration_data": str(dataset.meta.get("task")),
        "calibration_dataset": dataset_summary(dataset),
        "epsilon": epsilon,
        "command": command_line(),
        "n_events": int(len(labels)),
        "n_rollouts": len(dataset.rollouts),
        "decision_points": list(dataset.kinds),
        "give_up_after": give_up_after,
        "event": [t.to_dict() for t in event],
        "trajectory": [t.to_dict() for t in trajectory],
        "harm": [t.to_dict() for t in harm],
        "give_up": [t.to_dict() for t in give_up],
    }
    write_conformal(probe_dir, report)
    return report


def clustered_se(hits: np.ndarray, clusters: np.ndarray, rate: float) -> float | None:
    """Standard error of a rate over events grouped in rollouts (a rollout's events are not independent): the
    ratio estimator's, with rollouts as the units. None with fewer than two rollouts."""
    names, index = np.unique(clusters, return_inverse=True)
    if len(names) < 2:
        return None
    per_hits, per_events = (
        np.bincount(index, weights=hits.astype(np.float64)),
        np.bincount(index).astype(np.float64),
    )
    residual = per_hits - rate * per_events
    return float(np.sqrt((residual**2).sum() / (len(names) * (len(names) - 1))) / per_events.mean())


def empirical_rates(bundle: ProbeBundle, dataset: Dataset) -> list[dict[str, Any]]:
    """On held-out data, at each calibrated δ: the exit rate of unsafe events per kind (event mode), the rate
    of rollouts whose first exit is premature (trajectory) or harmful (harm), and of right rollouts given up
    on; each with its count, so a reader can put the sampling margin on it."""
    probs = event_probs(bundle, dataset)
    labels = dataset.labels.numpy().astype(bool)
    kinds = np.array(dataset.points)
    rollout_of = np.array([f"{e['problem_id']}/{e['rollout']}" for e in dataset.events])
    rows: list[dict[str, Any]] = []
    for rule in bundle.event_thresholds:
        mine = kinds == rule.point
        exits = np.array([rule.should_exit(float(p)) for p in probs[mine]], dtype=bool)
        unsafe = ~labels[mine]
        rate = float(exits[unsafe].mean()) if unsafe.any() else float("nan")
        rows.append(
            {
                "mode": "event",
                "points": rule.point,
                "delta": rule.delta,
                "n": int(unsafe.sum()),
                "rate": rate,
                "exit_rate": float(exits.mean()) if mine.any() else float("nan"),
                "n_calibration": rule.n_neg,
                "cluster_se": clustered_se(exits[unsafe], rollout_of[mine][unsafe], rate),
            }
        )
    by_points: dict[str, list[RolloutScores]] = {}
    keys = {t.points for t in [*bundle.trajectory_thresholds, *bundle.harm_thresholds]} | {
        t.points for t in bundle.give_up_thresholds
    }
    for key in keys:
        by_points[key] = rollout_scores(bundle, dataset, key.split("+"), probs)
    for mode, rules in (("trajectory", bundle.trajectory_thresholds), ("harm", bundle.harm_thresholds)):
        for traj in rules:
            rollouts = by_points[traj.points]
            pairs: Sequence[tuple[Sequence[float], Sequence[int]]] = [r.pair for r in rollouts]
            if mode == "harm":
                pairs = harm_labels(pairs, [r.correct for r in rollouts])
            losses = [trajectory_loss(p, lab, traj.threshold) for p, lab in pairs]
            rows.append(
                {
                    "mode": mode,
                    "points": traj.points,
                    "delta": traj.delta,
                    "n": len(losses),
                    "rate": float(np.mean(losses)),
                }
            )
    for give in bundle.give_up_thresholds:
        rollouts = by_points[give.points]
        losses = [
            give_up_loss(r.probs, r.tokens, r.correct, give.threshold, give.min_tokens) for r in rollouts
        ]
        rows.append(
            {
                "mode": "give_up",
                "points": give.points,
                "delta": give.delta,
                "n": len(losses),
                "rate": float(np.mean(losses)),
            }
        )
    return rows
