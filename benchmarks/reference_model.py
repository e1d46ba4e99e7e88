"""Quality of the shipped reference model on held-out problems (T=0.6): accuracy, length, cues,
and forced-exit accuracy along the trace. Usage: python benchmarks/reference_model.py [--problems 500]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from _common import write_result

from lynx_exit.build_data import BuildConfig, build_dataset, load_dataset
from lynx_exit.engine import GenerationConfig
from lynx_exit.models import load_model
from lynx_exit.reference import as_task_problems, make_problems


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    lm = load_model("reference")
    problems = as_task_problems(make_problems("test", args.problems), "test")
    generation = GenerationConfig(max_new_tokens=600, temperature=0.6, top_p=0.95, seed=123)
    with tempfile.TemporaryDirectory() as tmp:
        summary = build_dataset(
            lm, problems, Path(tmp) / "d", generation,
            BuildConfig(max_events_per_rollout=64, batch_size=args.batch_size, synthetic_event=False),
            lm.feature_spec(),
        )
        data = load_dataset(Path(tmp) / "d")
    lengths = {(r["problem_id"], r["rollout"]): r["generated_tokens"] for r in data.rollouts}
    bins: dict[int, list[int]] = defaultdict(list)
    for event in data.events:
        fraction = event["token_index"] / max(1, lengths[(event["problem_id"], event["rollout"])])
        bins[min(4, int(fraction * 5))].append(event["label"])
    by_position = [
        {"trace_fraction": f"{20 * b}-{20 * (b + 1)} %", "events": len(bins[b]),
         "forced_exit_accuracy": round(sum(bins[b]) / len(bins[b]), 3) if bins[b] else None}
        for b in range(5)
    ]
    write_result(
        "reference_model",
        {
            "problems": args.problems,
            "temperature": 0.6,
            "full_cot_accuracy": round(summary["full_cot_accuracy"], 3),
            "mean_generated_tokens": round(summary["mean_generated_tokens"], 1),
            "mean_cue_events_per_rollout": round(summary["mean_cues_per_rollout"], 2),
            "forced_exit_accuracy_by_position": by_position,
            "bars": "accuracy 60-95 %, >= 150 tokens, >= 3 cues, forced-exit accuracy rising",
        },
    )


if __name__ == "__main__":
    main()
