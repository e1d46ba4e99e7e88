"""The eval's records (one JSON line per rollout, appended, resumable) and their statistics: accuracy with
Wilson intervals, tokens saved, paired comparisons, give-ups."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import read_appended_jsonl

RECORD_KEYS = (
    "method",
    "setting",
    "knob",
    "problem_id",
    "rollout",
    "correct",
    "generated_tokens",
    "trial_tokens",
    "exit_index",
    "latency_s",
)
TIMING_KEYS = ("setting", "rollouts", "seconds")


def load_timing(path: Path) -> dict[str, float]:
    """Seconds per rollout for each setting, over all (possibly resumed) runs."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for item in read_appended_jsonl(path, TIMING_KEYS):
        totals[item["setting"]][0] += item["seconds"]
        totals[item["setting"]][1] += item["rollouts"]
    return {k: v[0] / v[1] for k, v in totals.items() if v[1]}


def load_records(path: Path) -> list[dict[str, Any]]:
    return read_appended_jsonl(path, RECORD_KEYS)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(
    records: Sequence[dict[str, Any]],
    order: Sequence[str] | None = None,
    seconds_per_rollout: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Aggregate records per setting; savings and help/harm are paired against `never`."""
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_setting[record["setting"]].append(record)
    baseline = {(r["problem_id"], r["rollout"]): r for r in by_setting.get("never", [])}
    base_tokens = sum(r["generated_tokens"] for r in baseline.values()) / len(baseline) if baseline else None
    rows = []
    for label in order or sorted(by_setting):
        group = by_setting.get(label, [])
        if not group:
            continue
        n = len(group)
        correct = sum(bool(r["correct"]) for r in group)
        tokens = sum(r["generated_tokens"] for r in group) / n
        trial = sum(r["trial_tokens"] for r in group) / n
        paired = [
            (r, baseline[(r["problem_id"], r["rollout"])])
            for r in group
            if (r["problem_id"], r["rollout"]) in baseline
        ]
        low, high = wilson_interval(correct, n)
        rows.append(
            {
                "setting": label,
                "method": group[0]["method"],
                "knob": group[0]["knob"],
                "n": n,
                "accuracy": correct / n,
                "accuracy_ci95": [low, high],
                "mean_generated_tokens": tokens,
                "mean_trial_tokens": trial,
                "mean_total_tokens": tokens + trial,
                "tokens_saved_pct": 100 * (1 - (tokens + trial) / base_tokens) if base_tokens else None,
                "exit_rate": sum(r["exit_index"] is not None for r in group) / n,
                "help": sum(bool(r["correct"]) and not bool(b["correct"]) for r, b in paired),
                "harm": sum(not bool(r["correct"]) and bool(b["correct"]) for r, b in paired),
                **_give_ups(group, paired),
                "mean_latency_s": sum(r["latency_s"] for r in group) / n,
                "wall_time_per_problem_s": (seconds_per_rollout or {}).get(label),
            }
        )
        if any("assistant_tokens" in r for r in group):  # Speculative Thinking: what the assistant wrote
            written = sum(r["generated_tokens"] for r in group)
            rows[-1]["assistant_share"] = (
                sum(r.get("assistant_tokens", 0) for r in group) / written if written else 0.0
            )
            rows[-1]["mean_takeovers"] = sum(r.get("takeovers", 0) for r in group) / n
    return {"settings": rows, "n_records": len(records)}


def _give_ups(
    group: Sequence[dict[str, Any]], paired: Sequence[tuple[dict[str, Any], dict[str, Any]]]
) -> dict[str, Any]:
    """Give-up exits of a setting: how many, how many of those traces ended right in full (`never`: the cost),
    the tokens they saved against the full traces, and the exits by decision point kind."""
    given = [(r, b) for r, b in paired if r.get("gave_up")]
    points: dict[str, int] = defaultdict(int)
    for record in group:
        if record["exit_index"] is not None:
            points[record.get("exit_point") or "other"] += (
                1  # "other": an exit at no decision point (a budget, a baseline)
            )
    runaways = [
        (r, b) for r, b in given if b.get("finish_reason") == "length"
    ]  # the full chain ran to its budget
    return {
        "give_ups": sum(bool(r.get("gave_up")) for r in group),
        "give_ups_right_in_full": sum(bool(b["correct"]) for _, b in given),
        "give_ups_lost": sum(
            bool(b["correct"]) and not bool(r["correct"]) for r, b in given
        ),  # right in full, wrong here
        "give_up_tokens_saved": sum(b["generated_tokens"] - r["generated_tokens"] for r, b in given),
        "give_ups_on_runaways": len(runaways),
        "give_up_tokens_saved_on_runaways": sum(
            b["generated_tokens"] - r["generated_tokens"] for r, b in runaways
        ),
        "exits_by_point": dict(points),
    }
