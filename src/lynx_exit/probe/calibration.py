"""Probe training and conformal calibration of a probe folder (LYNX spec §4-§5), from build-data folders."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lynx_exit.artifacts import FolderLock, command_line
from lynx_exit.probe import (
    ProbeBundle,
    ProbeTrainConfig,
    load_probe,
    save_probe,
    train_probe,
    write_conformal,
)
from lynx_exit.probe.build_data import Dataset
from lynx_exit.probe.conformal import (
    DEFAULT_DELTAS,
    calibrate_events,
    calibrate_trajectories,
    harm_labels,
    trajectory_loss,
)
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
        "generation": dataset.meta.get("generation"),
        "command": dataset.meta.get("command"),
    }


def train_probe_folder(dataset: Dataset, out_dir: Path, config: ProbeTrainConfig, dataset_dir: str) -> dict[str, Any]:
    """Train a probe on `dataset` and write it to `out_dir` (locked meanwhile)."""
    if len(dataset.events) == 0:
        raise ValueError(f"dataset {dataset_dir!r} has no events to train on")
    with FolderLock(out_dir, "lynx-exit train/calibrate"):
        return _train(dataset, out_dir, config, dataset_dir)


def _train(dataset: Dataset, out_dir: Path, config: ProbeTrainConfig, dataset_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    probe, metrics = train_probe(dataset.features, dataset.labels, config)
    meta: dict[str, Any] = {
        "format": "lynx-exit-probe-v1",
        "training_data": dataset_dir,
        "training_task": dataset.meta.get("task"),
        "training_problem_ids": sorted(dataset.problem_ids),
        "training_dataset": dataset_summary(dataset),
        "command": command_line(),
        "train_config": asdict(config),
        "metrics": {**metrics, "train_seconds": round(time.perf_counter() - started, 2)},
    }
    save_probe(out_dir, probe, dataset.spec, meta)
    return meta["metrics"]


def rollout_scores(bundle: ProbeBundle, dataset: Dataset) -> list[tuple[list[float], list[int]]]:
    """Per rollout, the probe's P(safe) and labels of its events in order."""
    probs = bundle.probe.prob_safe(dataset.features).numpy() if len(dataset.events) else np.zeros(0)
    grouped: dict[tuple[str, int], list[tuple[int, float, int]]] = defaultdict(list)
    for event, prob in zip(dataset.events, probs, strict=True):
        grouped[(event["problem_id"], event["rollout"])].append((event["token_index"], float(prob), int(event["label"])))
    out = []
    for rollout in dataset.rollouts:
        items = sorted(grouped.get((rollout["problem_id"], rollout["rollout"]), []))
        out.append(([p for _, p, _ in items], [label for _, _, label in items]))
    return out


def calibrate_probe_folder(
    probe_dir: Path,
    dataset: Dataset,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    epsilon: float = 0.1,
) -> dict[str, Any]:
    """Write `conformal.json` (per-event and trajectory thresholds) from a disjoint calibration set,
    and the folder's `README.md` model card."""
    with FolderLock(probe_dir, "lynx-exit train/calibrate"):
        report = _calibrate(probe_dir, dataset, deltas, epsilon)
        write_model_card(probe_dir)
        return report


def _calibrate(probe_dir: Path, dataset: Dataset, deltas: Sequence[float], epsilon: float) -> dict[str, Any]:
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
    probs = bundle.probe.prob_safe(dataset.features).numpy()
    labels = dataset.labels.numpy()
    rollouts = rollout_scores(bundle, dataset)
    event = [calibrate_events(probs, labels, d) for d in deltas]
    trajectory = [calibrate_trajectories(rollouts, d, epsilon) for d in deltas]
    relabelled = harm_labels(rollouts, [bool(r["correct"]) for r in dataset.rollouts])
    harm = [calibrate_trajectories(relabelled, d, epsilon) for d in deltas]
    report = {
        "calibration_data": str(dataset.meta.get("task")),
        "calibration_dataset": dataset_summary(dataset),
        "epsilon": epsilon,
        "command": command_line(),
        "n_events": int(len(labels)),
        "n_rollouts": len(rollouts),
        "event": [t.to_dict() for t in event],
        "trajectory": [t.to_dict() for t in trajectory],
        "harm": [t.to_dict() for t in harm],
    }
    write_conformal(probe_dir, report)
    return report


def empirical_rates(bundle: ProbeBundle, dataset: Dataset) -> list[dict[str, Any]]:
    """On held-out data: premature-exit rate per unsafe event and per rollout, at each calibrated δ."""
    probs = bundle.probe.prob_safe(dataset.features).numpy()
    labels = dataset.labels.numpy().astype(bool)
    rollouts = rollout_scores(bundle, dataset)
    rows = []
    for rule in bundle.event_thresholds:
        exits = np.array([rule.should_exit(float(p)) for p in probs], dtype=bool)
        rows.append(
            {
                "mode": "event",
                "delta": rule.delta,
                "unsafe_exit_rate": float(exits[~labels].mean()) if (~labels).any() else float("nan"),
                "exit_rate": float(exits.mean()),
            }
        )
    for traj in bundle.trajectory_thresholds:
        losses = [trajectory_loss(p, lab, traj.threshold) for p, lab in rollouts]
        rows.append({"mode": "trajectory", "delta": traj.delta, "premature_rollout_rate": float(np.mean(losses))})
    relabelled = harm_labels(rollouts, [bool(r["correct"]) for r in dataset.rollouts])
    for traj in bundle.harm_thresholds:
        losses = [trajectory_loss(p, lab, traj.threshold) for p, lab in relabelled]
        rows.append({"mode": "harm", "delta": traj.delta, "harmful_rollout_rate": float(np.mean(losses))})
    return rows
