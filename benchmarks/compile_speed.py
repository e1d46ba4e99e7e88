"""`--compile` against eager decoding, through the engine: same prompts, greedy, fixed length, tokens
compared.

Each side loads its own copy of the model (compiling rewrites the decoder blocks). The compiled side
runs once untimed (compilation, and a recompile when shapes first vary), then both sides alternate.

Usage: python benchmarks/compile_speed.py [--models reference,smollm2] [--batches 1,8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import write_result

from lynx_exit.engine import DecodeLoop, EngineConfig, GenerationConfig
from lynx_exit.models import load_model

PROMPTS = [
    "Ana has 3 coins. Then Ana doubles the pile. How many coins does Ana have now?",
    "Tom has 12 apples and gives away 5. Then he buys 9 more. How many apples does he have?",
    "What is 7*8?",
    "List three prime numbers.",
]
TOKENS = {"reference": 96, "smollm2": 24}


def run(lm: Any, batch: int, tokens: int, compile: bool) -> tuple[float, list[list[int]]]:
    prompts = [lm.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)
    start = time.perf_counter()
    loop = DecodeLoop(lm, prompts, config, engine=EngineConfig(compile=compile))
    results = loop.run()
    seconds = time.perf_counter() - start
    return sum(r.num_generated_tokens for r in results) / seconds, [r.token_ids for r in results]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="reference,smollm2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        eager_lm, compiled_lm = load_model(name), load_model(name)
        tokens = TOKENS.get(name, 32)
        for batch in map(int, args.batches.split(",")):
            start = time.perf_counter()
            run(compiled_lm, batch, tokens, True)  # compiles
            run(compiled_lm, batch, tokens, True)  # shapes that vary compile once more (dynamic)
            warmup = time.perf_counter() - start
            run(eager_lm, batch, tokens, False)
            rates: dict[str, list[float]] = {"eager": [], "compiled": []}
            same = True
            for repeat in range(args.repeats):
                order = [("eager", False), ("compiled", True)]
                for side, flag in order if repeat % 2 else order[::-1]:
                    rate, ids = run(compiled_lm if flag else eager_lm, batch, tokens, flag)
                    rates[side].append(rate)
                    if side == "eager":
                        eager_ids = ids
                    else:
                        compiled_ids = ids
                same = same and eager_ids == compiled_ids
            speedup = statistics.median(c / e for c, e in zip(rates["compiled"], rates["eager"], strict=True))
            row = {
                "model": name,
                "batch": batch,
                "new_tokens_per_row": tokens,
                "eager_tokens_per_s": round(statistics.median(rates["eager"]), 2),
                "compiled_tokens_per_s": round(statistics.median(rates["compiled"]), 2),
                "compiled_vs_eager": round(speedup, 3),
                "identical_tokens": same,
                "compile_warmup_s": round(warmup, 1),
            }
            print(row, flush=True)
            rows.append(row)
    write_result(
        "compile_speed",
        {
            "what": "engine decode, greedy fixed length: --compile vs eager",
            "rows": rows,
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
