"""Tokens/s of lynx-exit's decode loop (hooks + cue detection + policy) vs plain `model.generate`.

Side by side in one run, same model, same prompts, greedy, batch 1, alternating order.
Usage: python benchmarks/decode_overhead.py [--models reference,smollm2] [--tokens 96]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import write_result

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits import NeverExit
from lynx_exit.models import load_model

PROMPTS = [
    "What is 7*8?",
    "Tom has 12 apples and gives away 5. Then he buys 9 more. How many apples does he have?",
    "Explain why the sky is blue in two sentences.",
    "Ana has 3 coins. Then Ana doubles the pile. How many coins does Ana have now?",
]


def bench(model_name: str, tokens: int, repeats: int) -> dict:
    lm = load_model(model_name)
    layers = lm.feature_spec().layers
    config = GenerationConfig(max_new_tokens=tokens, temperature=0)
    prompts = [lm.prompt_ids(p) for p in PROMPTS]
    ours_time = ours_tokens = hf_time = hf_tokens = 0.0
    mismatches = 0
    for repeat in range(repeats + 1):  # repeat 0 warms up and is not counted
        for prompt in prompts:
            order = ("ours", "hf") if repeat % 2 else ("hf", "ours")
            for which in order:
                start = time.perf_counter()
                if which == "ours":
                    result = DecodeLoop(lm, [prompt], config, policies=[NeverExit()], layers=layers).run()[0]
                    produced, ours_ids = result.num_generated_tokens, result.token_ids
                else:
                    out = lm.model.generate(
                        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=tokens, do_sample=False,
                    )
                    hf_ids = out[0, len(prompt):].tolist()
                    produced = len(hf_ids)
                elapsed = time.perf_counter() - start
                if repeat == 0:
                    continue
                if which == "ours":
                    ours_time, ours_tokens = ours_time + elapsed, ours_tokens + produced
                else:
                    hf_time, hf_tokens = hf_time + elapsed, hf_tokens + produced
            if repeat:
                mismatches += ours_ids != hf_ids
    ours_tps, hf_tps = ours_tokens / ours_time, hf_tokens / hf_time
    return {
        "model": model_name,
        "layers_hooked": list(layers),
        "max_new_tokens": tokens,
        "prompts": len(prompts),
        "repeats": repeats,
        "ours_tokens_per_s": round(ours_tps, 2),
        "generate_tokens_per_s": round(hf_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3),
        "greedy_outputs_differ": mismatches,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="reference,smollm2")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = [bench(m, args.tokens, args.repeats) for m in args.models.split(",")]
    write_result("decode_overhead", {"target": "ours >= 0.9x generate tokens/s", "results": rows})


if __name__ == "__main__":
    main()
