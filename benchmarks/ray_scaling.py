"""The same `eval` in one process and on Ray with 1 and 2 workers: problems/s and the speedup.

    python benchmarks/ray_scaling.py [--model reference] [--problems 96] [--workers 1,2]

On this 2-core machine two workers can at best double one worker's single-threaded throughput;
rerun on a GPU node (`--gpus-per-worker 1`) or a cluster (`--address auto`) for the real figure.
Worker start-up (loading the model) is timed apart from the work; the one-process run is warmed up
on one batch first."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import write_result

from lynx_exit.engine import GenerationConfig
from lynx_exit.evaluate import run_eval
from lynx_exit.exits import parse_methods
from lynx_exit.models import ModelSource
from lynx_exit.reference import as_task_problems, make_problems
from lynx_exit.scale import RayOptions, RayPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--problems", type=int, default=96)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--address", default="local")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    problems = as_task_problems(make_problems("test", args.problems), "test")
    settings = parse_methods(["never", "token-budget"], {"budget": "200"})
    generation = GenerationConfig(max_new_tokens=400, temperature=0.6, seed=0)
    source = ModelSource(args.model)
    rollouts = len(problems) * len(settings)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        lm = source.load()  # warmed up first, as the Ray workers are by wait_ready and their first shard
        run_eval(
            lm,
            problems[: args.batch_size],
            settings,
            generation,
            Path(tmp) / "warm",
            batch_size=args.batch_size,
            progress=False,
        )
        started = time.perf_counter()
        run_eval(
            lm,
            problems,
            settings,
            generation,
            Path(tmp) / "single",
            batch_size=args.batch_size,
            progress=False,
        )
        single_s = time.perf_counter() - started
        rows.append(
            {
                "run": "one process",
                "threads": torch.get_num_threads(),
                "seconds": round(single_s, 2),
                "problems_per_s": round(rollouts / single_s, 2),
            }
        )
        for workers in [int(w) for w in args.workers.split(",")]:
            cpus = max(1, (os.cpu_count() or 1) // workers)
            options = RayOptions(
                address=args.address,
                workers=workers,
                cpus_per_worker=cpus,
                gpus_per_worker=args.gpus_per_worker,
            )
            began = time.perf_counter()
            with RayPool(source, options) as pool:
                pool.wait_ready()
                ready = time.perf_counter()
                run_eval(
                    None,
                    problems,
                    settings,
                    generation,
                    Path(tmp) / f"ray{workers}",
                    batch_size=args.batch_size,
                    progress=False,
                    runner=pool.eval_runner,
                )
                work_s = time.perf_counter() - ready
            rows.append(
                {
                    "run": f"ray, {workers} worker(s)",
                    "threads": cpus,
                    "startup_s": round(ready - began, 2),
                    "seconds": round(work_s, 2),
                    "problems_per_s": round(rollouts / work_s, 2),
                }
            )
    one = next(r for r in rows if r["run"] == "ray, 1 worker(s)")
    for row in rows:
        row["speedup_vs_1_worker"] = round(row["problems_per_s"] / one["problems_per_s"], 2)
    write_result(
        "ray_scaling",
        {
            "model": args.model,
            "rollouts": rollouts,
            "settings": [s.label for s in settings],
            "batch_size": args.batch_size,
            "note": "problems/s counts rollouts of every setting; worker start-up is excluded from 'seconds'",
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
