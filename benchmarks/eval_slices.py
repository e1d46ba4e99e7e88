"""Pool `lynx-exit eval` runs on disjoint slices: each setting's pooled accuracy and its spread across slices.

    python benchmarks/eval_slices.py runs/a runs/b runs/c --out benchmarks/results/eval_reference

Writes OUT/summary.json (the pooled summary, as `lynx-exit eval` writes it, plus per-slice accuracy and
tokens saved, their mean and standard deviation), OUT/summary.md and OUT/pareto.png (pooled, 95 % intervals).
Help/harm stay paired within each slice (the same problem and seed under `never`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import read_appended_jsonl, write_atomic, write_json_atomic
from lynx_exit.evaluate import RECORD_KEYS, TIMING_KEYS, pareto_plot, summarize


def _slice(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    meta = json.loads((folder / "summary.json").read_text())
    records = read_appended_jsonl(folder / "records.jsonl", RECORD_KEYS, repair=False)
    timing = read_appended_jsonl(folder / "timing.jsonl", TIMING_KEYS, repair=False)
    return meta, records, timing


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def pool(folders: list[Path]) -> dict[str, Any]:
    slices, records, seconds = [], [], defaultdict(lambda: [0.0, 0])
    per_slice: list[dict[str, dict[str, Any]]] = []
    order: list[str] = []
    for folder in folders:
        meta, slice_records, timing = _slice(folder)
        ids = {r["problem_id"] for r in slice_records}
        if ids & {r["problem_id"] for r in records}:
            raise SystemExit(f"{folder} shares problems with an earlier slice: slices must be disjoint")
        records += slice_records
        for item in timing:
            seconds[item["setting"]][0] += item["seconds"]
            seconds[item["setting"]][1] += item["rollouts"]
        own = summarize(slice_records, [s["setting"] for s in meta["settings"]])
        per_slice.append({row["setting"]: row for row in own["settings"]})
        order += [s["setting"] for s in meta["settings"] if s["setting"] not in order]
        slices.append(
            {
                "folder": str(folder),
                "offset": meta.get("offset"),
                "seed": meta.get("seed"),
                "problems": len(ids),
                "model": meta.get("model"),
                "task": meta.get("task"),
            }
        )
    timing_per_rollout = {k: v[0] / v[1] for k, v in seconds.items() if v[1]}
    pooled = summarize(records, order, timing_per_rollout)
    for row in pooled["settings"]:
        rows = [s[row["setting"]] for s in per_slice if row["setting"] in s]
        row["slices"] = {
            "accuracy": _mean_sd([r["accuracy"] for r in rows]),
            "tokens_saved_pct": _mean_sd([r["tokens_saved_pct"] for r in rows])
            if all(r["tokens_saved_pct"] is not None for r in rows)
            else None,
            "per_slice_accuracy": [r["accuracy"] for r in rows],
            "per_slice_tokens_saved_pct": [r["tokens_saved_pct"] for r in rows],
        }
        # Help/harm paired within each slice (the pooled summarize pairs them too: problem ids are disjoint).
    mark_dominated(pooled["settings"])
    first = slices[0]
    return {"model": first["model"], "task": first["task"], "slices": slices, **pooled}


def mark_dominated(rows: list[dict[str, Any]]) -> None:
    """Each row's `dominated_by`: the settings at least as accurate and saving at least as many tokens, one
    strictly."""
    for row in rows:
        acc, saved = row["accuracy"], row["tokens_saved_pct"] or 0.0
        row["dominated_by"] = [
            other["setting"]
            for other in rows
            if other is not row
            and other["accuracy"] >= acc
            and (other["tokens_saved_pct"] or 0.0) >= saved
            and (other["accuracy"] > acc or (other["tokens_saved_pct"] or 0.0) > saved)
        ]


def _label(row: dict[str, Any]) -> str:
    """The setting, with the assistant's share of the tokens for Speculative Thinking."""
    share = row.get("assistant_share")
    return row["setting"] if share is None else f"{row['setting']} (assistant wrote {100 * share:.0f} %)"


def _give_ups(row: dict[str, Any]) -> str:
    return f"{row['give_ups']} ({row['give_ups_right_in_full']})" if row.get("give_ups") else "—"


def markdown(summary: dict[str, Any]) -> str:
    n = len(summary["slices"])
    lines = [
        f"| method | accuracy, {n} slices pooled (95% CI) | accuracy per slice | tokens saved, mean ± sd | "
        "mean tokens (+trial) | exit rate | help/harm | give-ups (right in full) | Pareto front | wall "
        "s/problem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["settings"]:
        low, high = row["accuracy_ci95"]
        per = " / ".join(f"{100 * a:.1f}" for a in row["slices"]["per_slice_accuracy"])
        saved = row["slices"]["tokens_saved_pct"]
        saved_text = "—" if saved is None else f"{saved['mean']:.1f} ± {saved['sd']:.1f} %"
        trial = f" (+{row['mean_trial_tokens']:.1f})" if row["mean_trial_tokens"] else ""
        wall = "—" if row["wall_time_per_problem_s"] is None else f"{row['wall_time_per_problem_s']:.3f}"
        lines.append(
            f"| {_label(row)} | {100 * row['accuracy']:.1f} % ({100 * low:.1f}–{100 * high:.1f}) | {per} | "
            f"{saved_text} | "
            f"{row['mean_generated_tokens']:.1f}{trial} | {100 * row['exit_rate']:.0f} % | "
            f"{row['help']}/{row['harm']} | "
            f"{_give_ups(row)} | {'✓' if not row.get('dominated_by') else ''} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="eval output folders, one per slice")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = pool(args.folders)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "summary.json", summary)
    write_atomic(args.out / "summary.md", markdown(summary))
    slices = ", ".join(f"offset {s['offset']} seed {s['seed']}" for s in summary["slices"])
    pareto_plot(
        summary,
        args.out / "pareto.png",
        f"{summary['model']} on {summary['task']}: {len(summary['slices'])} slices ({slices})",
    )
    print(markdown(summary))


if __name__ == "__main__":
    main()
