"""Decode step time against context length: the KV store written in place vs the first backend.

Side by side in one run, per model, batch and context: each backend (the first one, the store, and the
store with `--compile`, whose decode step is one compiled graph) holds `batch` requests of
`context` tokens (their keys and values filled at random: a prefill of 32 x 4,096 tokens would take
longer than the whole measurement and reads nothing a decode step reads), then decodes `steps`
tokens; the median step after a warm-up is compared with the memory-bandwidth floor

    floor = (weight bytes + live KV bytes) / measured copy bandwidth

(the time to read everything a step must read once, at the rate this machine copies memory). This VM's
copy rate drifts (11 to 34 GB/s between measurements), so it is measured right before each model's rows,
which use that rate, and once more at the end (recorded, not used). `--refloor` recomputes the floors
of an existing result file this way. Goal on a CPU: the store within 1.3x the floor at every context, its
ratio flat from 128 to 4,096.

Usage: python benchmarks/context_scaling.py [--models reference,smollm2] [--batches 1,8,32]
       [--contexts 128,512,1024,2048,4096] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import write_result
from legacy_backend import LegacyBackend
from transformers import DynamicCache

from lynx_exit.engine import StoreBackend
from lynx_exit.models import LoadedModel, load_model


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second this machine reads while copying a buffer far larger than its caches."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.numel() * 4 / statistics.median(times[1:])


def _kv_shape(lm: LoadedModel) -> tuple[int, int, int, torch.dtype]:
    config = lm.model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim, next(lm.model.parameters()).dtype


def filled_legacy(lm: LoadedModel, batch: int, context: int) -> LegacyBackend:
    layers, kv_heads, head_dim, dtype = _kv_shape(lm)
    backend = LegacyBackend(lm)
    cache = DynamicCache()
    for layer in range(layers):
        cache.update(
            0.1 * torch.randn(batch, kv_heads, context, head_dim, dtype=dtype),
            0.1 * torch.randn(batch, kv_heads, context, head_dim, dtype=dtype),
            layer,
        )
    backend._insert(list(range(batch)), cache, torch.ones(batch, context, dtype=torch.long), [0] * batch)
    return backend


def filled_store(
    lm: LoadedModel, batch: int, context: int, steps: int, compile: bool = False
) -> StoreBackend:
    backend = StoreBackend(lm, max_context=context + steps + 8, compile=compile)
    backend.prefill(list(range(batch)), [[3]] * batch)  # allocates every layer at the model's shapes
    backend.store.reserve(batch, context + steps + 4)
    for tensors in (backend.store.keys, backend.store.values):
        for tensor in tensors:
            assert tensor is not None
            tensor[:, :, :context].normal_(0, 0.1)
    for slot in range(batch):
        backend.store.lengths[slot] = context
    return backend


def time_steps(backend: Any, batch: int, steps: int, vocab: int, warmup: int = 2) -> float:
    """Median seconds of one decode step over `steps` steps after `warmup` not counted."""
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + warmup):
        tokens = torch.randint(3, vocab, (batch,), generator=generator).tolist()
        start = time.perf_counter()
        backend.decode(list(range(batch)), tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


RESULT = Path(__file__).parent / "results" / "context_scaling.json"
NAMES = ("legacy", "store", "store_compiled")


def floors(
    rows: list[dict[str, Any]], bandwidth: dict[str, float]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each row's floor at its model's copy rate, the ratios to it, and the summary per model and batch."""
    for row in rows:
        floor_ms = 1000 * row["bytes_read"] / bandwidth[row["model"]]
        row["floor_ms"] = round(floor_ms, 3)
        for name in NAMES:
            row[f"{name}_vs_floor"] = round(row[f"{name}_step_ms"] / floor_ms, 3)
    summary = {}
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        group = [r for r in rows if r["model"] == model and r["batch"] == batch]
        entry: dict[str, float] = {}
        for name in NAMES:
            ratios = [r[f"{name}_vs_floor"] for r in group]
            entry[f"{name}_vs_floor_max"] = max(ratios)
            entry[f"{name}_vs_floor_spread"] = round(max(ratios) / min(ratios) - 1, 3)
        summary[f"{model}/batch{batch}"] = entry
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="reference,smollm2")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="128,512,1024,2048,4096")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--refloor", action="store_true", help="recompute the floors of the existing result file"
    )
    args = parser.parse_args()
    if args.refloor:
        data = json.loads(RESULT.read_text())
        models = list(dict.fromkeys(r["model"] for r in data["rows"]))
        by_model = dict(zip(models, (1e9 * b for b in data["copy_bandwidth_measured_gb_s"]), strict=False))
        data["rows"], data["summary"] = floors(data["rows"], by_model)
        data["copy_bandwidth_gb_s"] = {m: round(b / 1e9, 2) for m, b in by_model.items()}
        RESULT.write_text(json.dumps(data, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    bandwidths: list[float] = []
    rows: list[dict[str, Any]] = []
    for model_name in args.models.split(","):
        bandwidths.append(copy_bandwidth())  # this model's floors use it (see `floors`)
        lm = load_model(model_name, device="cpu")
        weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
        layers, kv_heads, head_dim, dtype = _kv_shape(lm)
        token_bytes = layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                row: dict[str, Any] = {
                    "model": model_name,
                    "batch": batch,
                    "context": context,
                    "bytes_read": weight_bytes + batch * context * token_bytes,
                }
                for name in NAMES:  # one at a time: all three at 32 x 4,096 would not fit beside each other
                    with torch.inference_mode():
                        if name == "legacy":
                            backend: Any = filled_legacy(lm, batch, context)
                        # the compiled side: 3 steps warm up (a new shape compiles,
                        # the first call checks guards)
                        else:
                            backend = filled_store(
                                lm, batch, context, args.steps, compile=name == "store_compiled"
                            )
                        step = time_steps(
                            backend,
                            batch,
                            args.steps,
                            lm.vocab_size,
                            warmup=3 if name == "store_compiled" else 2,
                        )
                    del backend
                    gc.collect()
                    row[f"{name}_step_ms"] = round(1000 * step, 3)
                row["store_speedup"] = round(row["legacy_step_ms"] / row["store_step_ms"], 3)
                row["compiled_speedup"] = round(row["store_step_ms"] / row["store_compiled_step_ms"], 3)
                print(row, flush=True)
                rows.append(row)
    bandwidths.append(copy_bandwidth())
    rows, summary = floors(rows, dict(zip(args.models.split(","), bandwidths, strict=False)))
    write_result(
        "context_scaling",
        {
            "what": "decode step vs the memory-bandwidth floor: KV store (eager and --compile) vs first "
            "backend, "
            "random-filled KV of each context",
            "copy_bandwidth_gb_s": {
                m: round(b / 1e9, 2) for m, b in zip(args.models.split(","), bandwidths, strict=False)
            },
            "copy_bandwidth_measured_gb_s": [round(b / 1e9, 2) for b in bandwidths],
            "steps": args.steps,
            "rows": rows,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
