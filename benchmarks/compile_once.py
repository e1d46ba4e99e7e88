"""Compile once, on this CPU (issue 35): how many graphs the compiled decode step needs over a run through
batches 1 -> 64 and attended widths 64 -> 8,192, and how long `serve`'s warm-up of every batch size takes in a
fresh process, cold and then with the compile cache the cold run left (torch's FX graph and AOT caches).

    python benchmarks/compile_once.py [--model reference] [--max-batch 64]

Writes benchmarks/results/compile_once.json. Targets (issue 35): at most 3 compiles; on an H200 the warm-up
cold <= 60 s and cached <= 15 s (here: what this CPU takes)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from _common import write_result

WALK = [(1, 64), (2, 100), (4, 300), (3, 700), (8, 1000), (16, 2000), (13, 3000), (32, 4100), (64, 6000)]
WALK += [(64, 8192), (1, 8000), (7, 70)]


def hold_rows(backend: Any, first_id: int, batch: int, width: int) -> list[int]:
    """Free the backend, then give `batch` new requests (ids from `first_id`) rows of `width - 1 - (id % 7)`
    tokens each, ready for a decode step of that width (what the rows hold does not matter to a compile)."""
    for request_id in list(backend.rows):
        backend.release(request_id)
    backend.compact(drop_rows=True)
    ids = list(range(first_id, first_id + batch))
    backend.prefill(ids, [[5, 6, 7]] * batch)
    backend.store.reserve(batch, width)
    for request_id in ids:
        backend.store.lengths[backend.rows[request_id]] = width - 1 - request_id % 7
    return ids


def walk(model: str) -> dict[str, object]:
    """The walk's decode steps on one backend: graphs compiled and seconds per step."""
    from torch._dynamo.utils import counters

    from lynx_exit.engine import StoreBackend
    from lynx_exit.models import load_model

    lm = load_model(model)
    backend = StoreBackend(lm, compile=True, max_context=8200)
    before = counters["stats"]["unique_graphs"]
    rows, next_id = [], 0
    for batch, width in WALK:
        with torch.inference_mode():
            ids = hold_rows(backend, next_id, batch, width)
            next_id += batch
            start = time.perf_counter()
            backend.decode(ids, [9] * batch)
            first = time.perf_counter() - start
        rows.append(
            {
                "batch": batch,
                "width": width,
                "first_step_s": round(first, 3),
                "graphs_so_far": counters["stats"]["unique_graphs"] - before,
            }
        )
        print(rows[-1], flush=True)
    return {"steps": rows, "graphs": counters["stats"]["unique_graphs"] - before}


def warm_up_child(model: str, max_batch: int) -> None:
    from torch._dynamo.utils import counters

    from lynx_exit.engine import Engine
    from lynx_exit.models import load_model

    engine = Engine(load_model(model), max_batch_size=max_batch, compile=True)
    seconds = engine.warm_up()
    print(json.dumps({"warm_up_s": round(seconds, 2), "graphs": counters["stats"]["unique_graphs"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return warm_up_child(args.model, args.max_batch)
    warm: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # the walk's compiles below use a cache of their own
        for run in ("cold", "cached"):
            command = [sys.executable, __file__, "--child", "--model", args.model]
            start = time.perf_counter()
            done = subprocess.run(
                command + ["--max-batch", str(args.max_batch)], capture_output=True, text=True, check=True
            )
            warm[run] = {
                **json.loads(done.stdout.strip().splitlines()[-1]),
                "process_s": round(time.perf_counter() - start, 1),
            }
            print(run, warm[run], flush=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        walked = walk(args.model)
    write_result(
        "compile_once",
        {
            "model": args.model,
            "walk": walked,
            "warm_up": {"max_batch_size": args.max_batch, "batch_sizes": "1, 2, 4, ... up to it", **warm},
            "targets": "at most 3 compiles over the walk; warm-up of every batch size cold <= 60 s, cached "
            "<= 15 s (on an H200)",
        },
    )


if __name__ == "__main__":
    main()
