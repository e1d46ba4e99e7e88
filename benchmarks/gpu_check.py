"""The GPU check, one command: the `gpu` tests, then a speed table of the engine on
DeepSeek-R1-Distill-Qwen-1.5B's architecture with random bf16 weights (no download).

    python benchmarks/gpu_check.py                      # on a CUDA machine: results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code on a tiny model (CI's smoke test)

Rows: batch 1, 8, 32, 64 at prompt 128 + 256 new tokens and at an 8k prompt + 64 new tokens. Sides: the
engine eager, compiled (`--compile`) with every step synchronous, compiled with overlap (the next step
launched before the host reads this one's tokens: the default on CUDA), that with LYNX scoring (a never-exit
probe: every cue is scored, the lengths stay equal, features are read at every step) and `model.generate` with
a static cache
(transformers compiles its decode step itself for a static cache on a GPU, the way its documentation gives).
Per side: tokens/s and ms per decode step (the median step once every prompt is read), the seconds of stalls
in the run (steps over 3x the median: compiles and CUDA-graph captures), and the share of the bandwidth
roofline (weights read per step, the input embedding one row per token, plus the live KV bytes, at the copy
bandwidth measured on the card). Compile once: the graphs dynamo compiled over the whole check, and the
warm-up of every batch bucket (`serve`'s, before it says ready) in a fresh process, cold and then with the
compile cache the first one left. Every side of a row stops at its own deadline and the whole check at
`--budget-s`: a row or side cut short is recorded as such, never dropped."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import never_exit_probe, write_result
from engine_throughput import _byte_tokenizer, random_r1_distill

from lynx_exit.engine import Engine, GenerationConfig, StoreBackend
from lynx_exit.exits import MethodContext, make_policy
from lynx_exit.models import LoadedModel, ModelProfile

ROOT = Path(__file__).resolve().parent.parent
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_engine.py")  # the files that hold `gpu` tests


def tiny_qwen(device: str) -> LoadedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    return LoadedModel(
        model=model, tokenizer=_byte_tokenizer(), model_id="tiny-qwen2", profile=ModelProfile(layers=(1, 2))
    )


def decodable(lm: LoadedModel) -> LoadedModel:
    """Zero the head's rows past the tokenizer's vocabulary: greedy picks ids the tokenizer spells, so the
    text has cues to score (the bytes read and the work per step are the same)."""
    head = lm.model.get_output_embeddings().weight
    with torch.no_grad():
        head[len(lm.tokenizer) :].zero_()
    return lm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 2 / statistics.median(times[1:])


def run_tests(timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` over the files that hold gpu tests; its summary line and exit code."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "status": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    return {
        "command": " ".join(command[1:]),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else "",
        "seconds": round(time.perf_counter() - start, 1),
    }


def engine_side(
    lm: LoadedModel,
    backend: StoreBackend,
    batch: int,
    prompt: int,
    new: int,
    deadline: float,
    policy_context: MethodContext | None,
    overlap: bool = False,
) -> dict[str, Any]:
    """One engine run of `batch` random prompts of `prompt` tokens, greedy, `new` tokens each (`overlap`: the
    next step launched before the host reads this one's tokens)."""
    config = GenerationConfig(
        max_new_tokens=new,
        min_new_tokens=new,
        temperature=0.0,
        cue_regex="." if policy_context is not None else None,
    )
    engine = Engine(lm, max_batch_size=batch, backend=backend, prefill_tokens_per_step=8192, overlap=overlap)
    generator = torch.Generator().manual_seed(batch * 7919 + prompt)
    layers = lm.feature_spec().layers
    request_ids = []
    for _ in range(batch):
        ids = torch.randint(3, 300, (prompt,), generator=generator).tolist()
        policy = make_policy("lynx", policy_context, delta=0.05) if policy_context is not None else None
        request_ids.append(
            engine.add_request(
                ids, config, policy=policy, feature_layers=layers if policy is not None else None
            )
        )
    decode_times: list[float] = []
    started: set[int] = set()
    cues = tokens = 0
    complete = True
    run_start = time.perf_counter()
    while engine.has_unfinished():
        if time.perf_counter() > deadline:
            complete = False
            break
        reading = len(started) < batch  # a step that still reads prompts is a prefill step
        start = time.perf_counter()
        steps = engine.step()
        elapsed = time.perf_counter() - start  # the step ends in its one host sync
        for step in steps:
            if step.phase in ("think", "answer"):
                started.add(step.request_id)
                tokens += 1
                cues += step.cue is not None
        if not reading:
            decode_times.append(elapsed)
    for request_id in request_ids:  # a run cut short frees its slots (the backend serves the next side)
        engine.abort(request_id)
    total = time.perf_counter() - run_start
    if not decode_times:
        return {"complete": False, "seconds": round(total, 1)}
    median = statistics.median(decode_times)
    out = {
        "tokens_per_s": round(batch / median, 1),
        "ms_per_step": round(1000 * median, 3),
        "stall_s": round(sum(t - median for t in decode_times if t > 3 * median), 2),
        "decode_steps": len(decode_times),
        "seconds": round(total, 1),
        "complete": complete,
    }
    if policy_context is not None:
        out["cues_scored"] = cues
    if overlap:
        out["launched_ahead"], out["ahead_held"] = engine.launched_ahead, engine.ahead_held
    return out


def warm_up_side(device: str, tiny: bool, batch: int, cache: Path, budget_s: float) -> dict[str, Any]:
    """Two fresh processes warm every batch bucket up to `batch` (`Engine.warm_up`, what `serve` runs before
    it says ready) with one compile cache: the first compiles (cold), the second loads what it stored."""
    out: dict[str, Any] = {"max_batch_size": batch}
    deadline = time.perf_counter() + budget_s
    for run in ("cold", "cached"):
        left = deadline - time.perf_counter()
        if left < 30:
            out[run] = {"skipped": "the check's time budget"}
            continue
        command = [sys.executable, __file__, "--device", device, "--warm-up-only", str(batch), "--skip-tests"]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command + (["--tiny"] if tiny else []),
                capture_output=True,
                text=True,
                timeout=left,
                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)},
            )
        except subprocess.TimeoutExpired:  # recorded, never dropped: the rows already measured are written
            out[run] = {"error": f"did not finish within {left:.0f} s"}
            continue
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            out[run] = {"error": (done.stderr or done.stdout)[-400:]}
            continue
        out[run] = {**json.loads(lines[-1]), "process_s": round(time.perf_counter() - start, 1)}
    return out


def warm_up_only(lm: LoadedModel, batch: int) -> None:
    """`--warm-up-only N`: warm an engine of N rows; print its seconds and the graphs dynamo compiled."""
    from torch._dynamo.utils import counters

    engine = Engine(lm, max_batch_size=batch, compile=True)
    seconds = engine.warm_up()
    graph = engine.backend.graph  # type: ignore[attr-defined]
    sizes = sorted({size for size, _ in graph.shapes})
    print(
        json.dumps(
            {"warm_up_s": round(seconds, 2), "graphs": counters["stats"]["unique_graphs"], "sizes": sizes}
        )
    )


def generate_side(lm: LoadedModel, batch: int, prompt: int, new: int) -> dict[str, Any]:
    """`generate` with a static cache: decode seconds per step from two lengths (the prefill cancels)."""
    ids = torch.randint(3, 300, (batch, prompt), device=lm.device)
    short, long = (
        8,
        8 + max(new // 2, 16),
    )  # a few more tokens than the shortest rows: a difference above noise

    def run(tokens: int) -> float:
        sync(lm.device)
        start = time.perf_counter()
        lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        sync(lm.device)
        return time.perf_counter() - start

    start = time.perf_counter()
    run(short)  # compiles for this batch and cache length
    run(long)
    warm = time.perf_counter() - start
    step = (min(run(long), run(long)) - min(run(short), run(short))) / (long - short)  # the quicker of two
    return {
        "tokens_per_s": round(batch / step, 1),
        "ms_per_step": round(1000 * step, 3),
        "warmup_s": round(warm, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny Qwen2 instead of the 1.5B architecture (a smoke test)"
    )
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--shapes", default="128+256,8192+64", help="PROMPT+NEW per row group")
    parser.add_argument(
        "--sides", default="eager,compiled,compiled_overlap,compiled_lynx,generate_static,warm_up"
    )
    parser.add_argument("--warm-up-only", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=330.0, help="the whole check, tests included")
    parser.add_argument("--side-s", type=float, default=75.0, help="the most one side of a row may run")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--out", default=None, help="result name (default: gpu_check, or print only with --tiny)"
    )
    parser.add_argument("--json", default=None, help="also write the result to this path")
    args = parser.parse_args()
    began = time.perf_counter()
    deadline_all = began + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "gpu_check: --device cuda but CUDA is not available here (use --device cpu --tiny for the smoke "
            "test)"
        )
    tests = (
        {"status": "skipped (--skip-tests)"} if args.skip_tests else run_tests(min(150.0, args.budget_s / 2))
    )
    make = (
        (lambda: decodable(tiny_qwen(args.device)))
        if args.tiny
        else (lambda: decodable(random_r1_distill(args.device)))
    )
    lm = make()
    if args.warm_up_only:
        return warm_up_only(lm, args.warm_up_only)
    config = lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    embedding = lm.model.get_input_embeddings().weight
    read_per_step = weights - embedding.numel() * embedding.element_size()  # + one embedding row per token
    bandwidth = copy_bandwidth(device, 64 if args.tiny else 2048)
    shapes = [tuple(int(x) for x in s.split("+")) for s in args.shapes.split(",")]
    sides = args.sides.split(",")
    max_context = max(p + n for p, n in shapes) + 64
    backends = {"eager": StoreBackend(lm, max_context=max_context)}
    if any(side.startswith("compiled") for side in sides):
        backends["compiled"] = StoreBackend(lm, max_context=max_context, compile=True)
    generate_lm: LoadedModel | None = None  # its own copy: transformers' SDPA, compiled by `generate` itself
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        context = MethodContext(lm=lm, probe=str(never_exit_probe(lm, Path(tmp) / "probe")))
        # Batch by batch, each shape in turn: when the budget runs out, what is left is the largest batches
        plan = [
            (batch, prompt, new)
            for batch in (int(b) for b in args.batches.split(","))
            for prompt, new in shapes
        ]
        for batch, prompt, new in plan:
            row: dict[str, Any] = {"batch": batch, "prompt": prompt, "new_tokens": new}
            live = batch * (prompt + new / 2) * kv_per_token  # KV bytes read per step, mid-run
            floor_s = (
                read_per_step + batch * embedding.shape[1] * embedding.element_size() + live
            ) / bandwidth
            row["roofline_ms_per_step"] = round(1000 * floor_s, 3)
            for side in (s for s in sides if s != "warm_up"):
                left = deadline_all - time.perf_counter()
                if left <= 0 or (
                    side == "generate_static" and left < args.side_s
                ):  # `generate` cannot be cut short
                    row[side] = {"skipped": "the check's time budget"}
                    continue
                deadline = min(deadline_all, time.perf_counter() + args.side_s)
                try:
                    with torch.inference_mode():
                        if side == "generate_static":
                            generate_lm = generate_lm or make()
                            result = generate_side(generate_lm, batch, prompt, new)
                        else:
                            backend = backends["eager" if side == "eager" else "compiled"]
                            result = engine_side(
                                lm,
                                backend,
                                batch,
                                prompt,
                                new,
                                deadline,
                                context if side == "compiled_lynx" else None,
                                overlap=side in ("compiled_overlap", "compiled_lynx"),
                            )
                except Exception as exc:  # recorded, never dropped
                    result = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                if "ms_per_step" in result:
                    result["roofline_share"] = float(
                        f"{floor_s / (result['ms_per_step'] / 1000):.3g}"
                    )  # 3 significant digits: a tiny share is not 0
                row[side] = result
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row["elapsed_s"] = round(time.perf_counter() - began, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    warm_up: dict[str, Any] = {"skipped": "not asked (--sides)"}
    if "warm_up" in sides:
        with tempfile.TemporaryDirectory() as cache:
            most = max(int(b) for b in args.batches.split(","))
            # the rest of the check's budget, and at least two minutes (a cold warm-up is the one goal here)
            budget = max(120.0, deadline_all - time.perf_counter())
            warm_up = warm_up_side(args.device, args.tiny, most, Path(cache), budget)
        print(json.dumps({"warm_up": warm_up}), flush=True)
    from torch._dynamo.utils import counters

    payload = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": lm.model_id,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "tests": tests,
        "rows": rows,
        "warm_up": warm_up,
        "graphs_compiled": counters["stats"]["unique_graphs"],  # by dynamo, over every side of every row
        "seconds": round(time.perf_counter() - began, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.out or not args.tiny:
        write_result(args.out or "gpu_check", payload)
    else:  # a check of the script, not a result
        print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
