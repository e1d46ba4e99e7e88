"""The GPU check of the KV store: decode tokens/s on DeepSeek-R1-Distill-Qwen-1.5B's architecture with random
bf16 weights (no download), against transformers `generate` with a static cache (compiled), and the share of
the bandwidth roofline. One script, sized to finish in under 8 minutes on one H200:

    python benchmarks/gpu_decode.py --device cuda

Per context (1k, 8k) and batch (1, 8, 32, 64): the store holds `batch` requests of `context` tokens (keys and
values filled at random: the prefill is not what is measured) and decodes greedily (`--compile`, the decode step as CUDA graphs, and
eager); step time, tokens/s, and roofline share = (weight bytes + live KV bytes) / step time / measured copy
bandwidth (bytes read and written per second by a device-to-device copy). The baseline runs `generate` on
random prompts of the same length with `cache_implementation="static"` and a compiled forward; its decode time
is the difference of two lengths (so its prefill cancels). Rows that would pass the time budget are recorded
as skipped, never dropped. `--device cpu --tiny` runs the same code on a tiny model and prints the rows (a check of the script, not a
result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from _common import write_result
from engine_throughput import random_r1_distill

from lynx_exit.engine import StoreBackend
from lynx_exit.models import LoadedModel, ModelProfile


def tiny_qwen(device: str) -> LoadedModel:
    from engine_throughput import _byte_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    return LoadedModel(model=model, tokenizer=_byte_tokenizer(), model_id="tiny-qwen2", profile=ModelProfile(layers=(1, 2)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    src = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 2 / statistics.median(times[1:])  # read + write


def store_step(lm: LoadedModel, backend: StoreBackend, batch: int, context: int, steps: int) -> float:
    """Median seconds per greedy decode step of `batch` requests holding `context` random tokens."""
    ids = list(range(batch))
    backend.prefill(ids, [[3]] * batch)
    backend.store.reserve(batch, context + steps + 4)
    for tensors in (backend.store.keys, backend.store.values):
        for tensor in tensors:
            assert tensor is not None
            tensor[:batch, :, :context].normal_(0, 0.1)
    for slot in range(batch):
        backend.store.lengths[slot] = context
    tokens = [3] * batch
    times = []
    for _ in range(steps):
        sync(lm.device)
        start = time.perf_counter()
        tokens = backend.decode(ids, tokens).argmax(-1).tolist()  # the host sync of a real step
        times.append(time.perf_counter() - start)
    for request_id in ids:
        backend.release(request_id)
    return statistics.median(times[steps // 2 :])  # the first half warms up (and compiles new shapes)


def generate_step(lm: LoadedModel, batch: int, context: int, short: int, long: int) -> float:
    """Seconds per decode step of `generate` with a static cache and a compiled forward."""
    model = lm.model
    prompt = torch.randint(3, 300, (batch, context), device=lm.device)

    def run(tokens: int) -> float:
        sync(lm.device)
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, cache_implementation="static", pad_token_id=0)
        sync(lm.device)
        return time.perf_counter() - start

    run(short)  # compiles, for each length's cache shapes
    run(long)
    return (run(long) - run(short)) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 instead of the 1.5B architecture")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip rows that would start after this")
    args = parser.parse_args()
    began = time.perf_counter()
    lm = tiny_qwen(args.device) if args.tiny else random_r1_distill(args.device)
    device = lm.device
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    config = lm.model.config
    kv_bytes_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    bandwidth = copy_bandwidth(device, 64 if args.tiny else 2048)
    contexts = [int(c) for c in args.contexts.split(",")]
    max_context = max(contexts) + args.steps + 64
    eager = StoreBackend(lm, max_context=max_context)
    compiled_lm = tiny_qwen(args.device) if args.tiny else random_r1_distill(args.device)
    compiled = StoreBackend(compiled_lm, max_context=max_context, compile=True)
    generate_lm = tiny_qwen(args.device) if args.tiny else random_r1_distill(args.device)
    generate_lm.model.forward = torch.compile(generate_lm.model.forward, mode="reduce-overhead" if device.type == "cuda" else None)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for context in contexts:
            for batch in (int(b) for b in args.batches.split(",")):
                row: dict[str, Any] = {"batch": batch, "context": context}
                if time.perf_counter() - began > args.budget_s:
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue
                floor_bytes = weight_bytes + batch * context * kv_bytes_per_token
                for name, backend, model in (("store", eager, lm), ("store_compiled", compiled, compiled_lm)):
                    step = store_step(model, backend, batch, context, args.steps)
                    row[f"{name}_tokens_per_s"] = round(batch / step, 1)
                    row[f"{name}_roofline_share"] = round(floor_bytes / step / bandwidth, 3)
                try:
                    step = generate_step(generate_lm, batch, context, 8, 8 + args.steps // 2)
                    row["generate_static_compiled_tokens_per_s"] = round(batch / step, 1)
                    best = max(row["store_tokens_per_s"], row["store_compiled_tokens_per_s"])
                    row["store_vs_generate"] = round(best / row["generate_static_compiled_tokens_per_s"], 3)
                except Exception as exc:  # recorded, never dropped
                    row["generate_error"] = f"{type(exc).__name__}: {exc}"[:300]
                row["elapsed_s"] = round(time.perf_counter() - began, 1)
                print(row, flush=True)
                rows.append(row)
    payload = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": lm.model_id,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "goal": "store >= 50 % of the roofline at batch 1 and >= 1.0x generate (static cache, compiled)",
        "rows": rows,
    }
    if args.tiny:  # a check of the script, not a result
        print(json.dumps(payload, indent=2))
    else:
        write_result("gpu_decode", payload)


if __name__ == "__main__":
    main()
