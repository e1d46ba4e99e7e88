"""A build-data folder read back: its events, rollouts and features, checked complete (what `train`,
`calibrate` and `risk` read)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lynx_exit.artifacts import read_appended_jsonl
from lynx_exit.decision_points import DEFAULT_POINTS, parse_points
from lynx_exit.models import FeatureSpec

# Keys every record must carry; a line without one is an error naming file and line.
EVENT_KEYS = ("problem_id", "rollout", "token_index", "label", "shard", "shard_row")
ROLLOUT_KEYS = ("problem_id", "rollout", "correct", "generated_tokens", "num_cues", "num_events")


def read_meta(meta_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or "feature_spec" not in meta:
        raise ValueError(f"{meta_file} is not a lynx-exit dataset description (no 'feature_spec')")
    return meta


@dataclass
class Dataset:
    spec: FeatureSpec
    meta: dict[str, Any]
    features: torch.Tensor  # [events, feature_dim]
    events: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]
    folder: Path | None = None  # where it was read from

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([e["label"] for e in self.events], dtype=torch.long)

    @property
    def points(self) -> list[str]:
        """Each event's decision point kind (a dataset built before kinds existed holds cues only)."""
        return [e.get("point", "cue") for e in self.events]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of decision point the dataset has events of."""
        return parse_points(sorted(set(self.points))) if self.events else DEFAULT_POINTS

    @property
    def problem_ids(self) -> set[str]:
        return {e["problem_id"] for e in self.rollouts}


def load_dataset(folder: str | Path) -> Dataset:
    """Read a build-data folder; an incomplete or malformed one raises naming the file and the fault."""
    folder = Path(folder)
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a lynx-exit dataset (no meta.json)")
    meta = read_meta(meta_file)
    try:
        spec = FeatureSpec.from_dict(meta["feature_spec"])
    except ValueError as exc:
        raise ValueError(f"{meta_file}: {exc}") from None
    events = read_appended_jsonl(folder / "events.jsonl", EVENT_KEYS, repair=False)
    rollouts = read_appended_jsonl(folder / "rollouts.jsonl", ROLLOUT_KEYS, repair=False)
    _check_complete(folder, events, rollouts)
    shards: dict[str, torch.Tensor] = {}
    rows = []
    for event in events:
        name = event["shard"]
        if name not in shards:
            path = folder / "features" / name
            if not path.is_file():
                raise FileNotFoundError(f"dataset {str(folder)!r} is missing feature shard {name}")
            shards[name] = load_file(str(path))["features"]
        row = event["shard_row"]
        if not isinstance(row, int) or not 0 <= row < len(shards[name]):
            raise ValueError(
                f"{folder / 'events.jsonl'}: event "
                f"{event['problem_id']!r}/{event['rollout']}@{event['token_index']} "
                f"points at row {row!r} of {name}, which has {len(shards[name])} rows"
            )
        rows.append(shards[name][row])
    features = torch.stack(rows) if rows else torch.zeros(0, spec.feature_dim)
    if features.shape[1] != spec.feature_dim:
        raise ValueError(
            f"dataset {str(folder)!r}: features have dim {features.shape[1]}, spec says {spec.feature_dim}"
        )
    return Dataset(spec=spec, meta=meta, features=features, events=events, rollouts=rollouts, folder=folder)


def missing_events(
    events: list[dict[str, Any]], rollouts: list[dict[str, Any]]
) -> list[tuple[tuple[str, int], int, int]]:
    """(problem id, rollout), events recorded, events present: each rollout whose events are not all there."""
    event_counts = Counter((e["problem_id"], e["rollout"]) for e in events)
    keyed = (((r["problem_id"], r["rollout"]), r["num_events"]) for r in rollouts)
    return [
        (key, expected, event_counts.get(key, 0))
        for key, expected in keyed
        if event_counts.get(key, 0) != expected
    ]


def _check_complete(folder: Path, events: list[dict[str, Any]], rollouts: list[dict[str, Any]]) -> None:
    """Every rollout's events are present: a dataset that lost some would silently bias training and
    calibration."""
    missing = missing_events(events, rollouts)
    if missing:
        (problem_id, rollout), expected, found = missing[0]
        raise ValueError(
            f"dataset {str(folder)!r} is incomplete: rollout {problem_id!r}/{rollout} records {expected} "
            "events but "
            f"events.jsonl has {found}; rerun build-data with the same flags to repair it"
        )


def summarize_dataset(folder: Path) -> dict[str, Any]:
    events = read_appended_jsonl(folder / "events.jsonl", EVENT_KEYS)
    rollouts = read_appended_jsonl(folder / "rollouts.jsonl", ROLLOUT_KEYS)
    n = max(1, len(rollouts))
    return {
        "rollouts": len(rollouts),
        "events": len(events),
        "positive_rate": sum(e["label"] for e in events) / max(1, len(events)),
        "full_cot_accuracy": sum(r["correct"] for r in rollouts) / n,
        "mean_generated_tokens": sum(r["generated_tokens"] for r in rollouts) / n,
        "mean_cues_per_rollout": sum(r["num_cues"] for r in rollouts) / n,
    }
