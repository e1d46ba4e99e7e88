"""Training the probe: Adam on binary cross-entropy with L2, early stopping on a stratified validation split,
and the metrics it reports (AUROC, Brier) (how-it-works §4)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lynx_exit.decision_points import DEFAULT_POINTS, parse_points
from lynx_exit.probe.model import Probe

logger = logging.getLogger(__name__)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties get average ranks); nan if one class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


@dataclass(frozen=True)
class ProbeTrainConfig:
    max_epochs: int = 200
    patience: int = 15
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4  # the official L2 penalty
    batch_size: int = 256
    val_fraction: float = 0.2
    seed: int = 0
    allow_one_class: bool = False  # a model that is never (or always) right still gets a (useless) probe

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def train_probe(
    features: torch.Tensor, labels: torch.Tensor, config: ProbeTrainConfig, points: list[str] | None = None
) -> tuple[Probe, dict[str, Any]]:
    """Fit the probe with Adam, class-balanced weights and early stopping on a stratified split. `points`:
    each event's decision point kind (None: all cues)."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match")
    y = labels.float()
    y_np = y.numpy().astype(int)
    if len(y_np) == 0:
        raise ValueError("probe training needs at least one event")
    if len(set(y_np.tolist())) < 2:
        if not config.allow_one_class:
            raise ValueError(
                f"probe training needs both safe and unsafe events; every event has label {y_np[0]} "
                "(the model never/always answers right when forced); pass allow_one_class to train anyway"
            )
        logger.warning("all %d events have label %d: the probe cannot rank anything", len(y_np), y_np[0])
    train_idx, val_idx = stratified_split(y_np, config.val_fraction, config.seed)
    torch.manual_seed(config.seed)
    kinds = parse_points(sorted(set(points))) if points else DEFAULT_POINTS
    probe = Probe(features.shape[1], kinds=kinds)
    x = probe.inputs(features, points if points else None)
    probe.mean.copy_(x[train_idx].mean(0))
    probe.std.copy_(x[train_idx].std(0).clamp_min(1e-6))
    n_pos = float(y[train_idx].sum())
    n = len(train_idx)
    pos_weight, neg_weight = n / (2 * max(n_pos, 1)), n / (2 * max(n - n_pos, 1))
    weights = torch.where(y == 1, pos_weight, neg_weight)
    optimizer = torch.optim.Adam(
        probe.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    best_loss, best_state, stale, epochs = math.inf, None, 0, 0
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    for epoch in range(config.max_epochs):
        probe.train()
        order = train_t[torch.randperm(len(train_t), generator=generator)]
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = (loss_fn(probe(x[batch]), y[batch]) * weights[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe.eval()
        with torch.no_grad():
            val_loss = (
                float((loss_fn(probe(x[val_t]), y[val_t]) * weights[val_t]).mean()) if len(val_t) else 0.0
            )
        epochs = epoch + 1
        if val_loss < best_loss - 1e-6:
            best_loss, stale = val_loss, 0
            best_state = {k: v.clone() for k, v in probe.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        probe.load_state_dict(best_state)
    probe.eval()
    with torch.no_grad():
        probs = torch.sigmoid(probe(x)).numpy()
    metrics = {
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "positive_rate": float(y.mean()),
        "train_auroc": auroc(probs[train_idx], y_np[train_idx]),
        "val_auroc": auroc(probs[val_idx], y_np[val_idx]),
        "train_brier": brier(probs[train_idx], y_np[train_idx]),
        "val_brier": brier(probs[val_idx], y_np[val_idx]),
        "epochs": epochs,
        "best_val_loss": best_loss,
    }
    # JSON has no NaN: an undefined metric (one class only) is stored as null.
    return probe, {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
