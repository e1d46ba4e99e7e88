"""The same greedy workload on plain vLLM, vLLM with the lynx-exit plug-in (scoring every row at every step,
never exiting) and lynx-exit's own engine (plain and with LYNX scoring), interleaved in one run.

Run it in vLLM's environment (`.ci/vllm_env`, see the README):
    .ci/vllm_env/bin/python benchmarks/vs_vllm.py [--batches 1,8,32] [--new-tokens 128] [--reps 5]
Writes benchmarks/results/vs_vllm.json. Every request writes exactly --new-tokens tokens (min = max), so every
side does the same work; the probe is a random one calibrated never to exit (it costs what a trained one
costs). On a GPU host with vLLM installed, `--device cuda` runs the comparison users will make (vLLM's default
settings)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import never_exit_probe, write_result

PAUSE_S = 1.0  # between sides: vLLM's idle engine processes poll for a while after a run, on the same cores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    from lynx_exit.engine import DecodeLoop, GenerationConfig
    from lynx_exit.exits import MethodContext, make_policy
    from lynx_exit.models import REFERENCE_MODELS, load_model
    from lynx_exit.reference import as_task_problems, make_problems
    from lynx_exit.vllm import engine_args

    batches = [int(b) for b in args.batches.split(",")]
    lm = load_model(args.model, device=args.device)
    model_path = str(REFERENCE_MODELS.get(args.model, args.model))
    probe = never_exit_probe(lm, Path(tempfile.mkdtemp()) / "probe")
    prompts = [lm.prompt_ids(p.prompt) for p in as_task_problems(make_problems("test", max(batches)), "test")]
    n = args.new_tokens
    common: dict[str, Any] = {
        "dtype": "float32" if args.device == "cpu" else "bfloat16",
        "max_model_len": 1024,
        "seed": 0,
        "enforce_eager": args.enforce_eager,
    }
    started = time.perf_counter()
    plain = LLM(model=model_path, **common)
    plugged = LLM(**engine_args(model_path, probe=str(probe), **common))
    load_s = round(time.perf_counter() - started, 1)
    context = MethodContext(lm=lm, probe=str(probe))

    def run_vllm(llm: Any, batch: int, lynx: bool) -> int:
        extra = {"lynx_delta": 0.05} if lynx else None
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, extra_args=extra)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:batch]], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def run_engine(batch: int, lynx: bool) -> int:
        policies = [make_policy("lynx", context, delta=0.05) for _ in range(batch)] if lynx else None
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, temperature=0.0)
        return sum(
            r.num_generated_tokens for r in DecodeLoop(lm, prompts[:batch], config, policies=policies).run()
        )

    sides = {
        "vllm": lambda b: run_vllm(plain, b, False),
        "vllm+lynx-plugin": lambda b: run_vllm(plugged, b, True),
        "lynx-exit": lambda b: run_engine(b, False),
        "lynx-exit+lynx": lambda b: run_engine(b, True),
    }
    for batch in batches:  # warm-up: every side and shape once
        for side in sides.values():
            side(batch)
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.reps):
        for batch in batches:
            for name, side in sides.items():
                time.sleep(PAUSE_S)
                start = time.perf_counter()
                tokens = side(batch)
                elapsed = time.perf_counter() - start
                assert tokens == batch * n, (name, batch, tokens)
                samples.setdefault((name, batch), []).append(tokens / elapsed)
    rows = []
    for batch in batches:
        base = statistics.median(samples[("vllm", batch)])
        for name in sides:
            values = samples[(name, batch)]
            rows.append(
                {
                    "side": name,
                    "batch": batch,
                    "tokens_per_s": round(statistics.median(values), 1),
                    "min": round(min(values), 1),
                    "max": round(max(values), 1),
                    "vs_vllm": round(statistics.median(values) / base, 3),
                }
            )
    write_result(
        "vs_vllm",
        {
            "workload": {
                "model": args.model,
                "prompts": "reference test split",
                "new_tokens_per_row": n,
                "greedy": True,
                "reps": args.reps,
                "statistic": "median tokens/s over reps, interleaved side by side",
                "pause_between_sides_s": PAUSE_S,
            },
            "vllm": {
                "version": vllm.__version__,
                "device": args.device,
                "enforce_eager": args.enforce_eager,
                "model_runner": "V1 (the plug-in's; plain vLLM on a CPU without triton-cpu runs V1 too)",
                "engines_loaded_s": load_s,
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
