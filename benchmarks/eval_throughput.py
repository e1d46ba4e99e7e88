"""Eval throughput (problems/s) at batch 1 vs continuous batches of 8 and 16, side by side, on the
reference model, for full CoT and LYNX. Usage: python benchmarks/eval_throughput.py --probe runs/demo/probe
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import write_result

from lynx_exit.engine import GenerationConfig
from lynx_exit.evaluate import run_eval
from lynx_exit.exits import MethodSetting
from lynx_exit.models import load_model
from lynx_exit.reference import as_task_problems, make_problems


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", required=True)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--batches", default="1,8,16")
    args = parser.parse_args()
    lm = load_model("reference")
    problems = as_task_problems(make_problems("test", args.problems), "test")
    generation = GenerationConfig(max_new_tokens=400, temperature=0.6, seed=5)
    settings = {
        "never": MethodSetting("never", None),
        "lynx": MethodSetting("lynx", args.delta, (("delta", args.delta), ("mode", "event"))),
    }
    rows = []
    for setting in settings.values():
        for batch in [int(b) for b in args.batches.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = run_eval(
                    lm,
                    problems,
                    [setting],
                    generation,
                    Path(tmp),
                    batch_size=batch,
                    progress=False,
                    probe=args.probe,
                )
                elapsed = time.perf_counter() - start
            row = summary["settings"][0]
            rows.append(
                {
                    "method": setting.label,
                    "batch_size": batch,
                    "problems_per_s": round(len(problems) / elapsed, 3),
                    "accuracy": round(row["accuracy"], 3),
                    "mean_generated_tokens": round(row["mean_generated_tokens"], 1),
                }
            )
            print(rows[-1])
    write_result("eval_throughput", {"problems": args.problems, "results": rows})


if __name__ == "__main__":
    main()
