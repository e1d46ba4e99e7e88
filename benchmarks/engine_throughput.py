"""Engine tokens/s vs `model.generate`, and the engine with LYNX scoring vs the engine with no policy.

Side by side in one run: the same left-padded prompts, greedy, fixed length
(`min_new_tokens = max_new_tokens`), batch 1, 8 and 32, alternating order, a warm-up run
per side that is not counted. LYNX uses a probe in the model's default feature space whose
calibration never exits (scoring at every cue costs what it always costs; lengths stay equal).

Usage: python benchmarks/engine_throughput.py [--models reference,smollm2] [--batches 1,8,32]
       python benchmarks/engine_throughput.py --models r1-distill-1.5b-random --device cuda --batches
       1,8,32,64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import never_exit_probe, write_result

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits import MethodContext, make_policy
from lynx_exit.models import LoadedModel, load_model

PROMPTS = [
    "What is 7*8?",
    "Tom has 12 apples and gives away 5. Then he buys 9 more. How many apples does he have?",
    "Explain why the sky is blue in two sentences.",
    "Ana has 3 coins. Then Ana doubles the pile. How many coins does Ana have now?",
    "A train leaves at 3 pm and travels 60 km per hour for 2 hours. Wait, how far did it go?",
    "List three prime numbers.",
]
# Frequent cues on models that rarely write "wait"/"hmm": every newline is scored.
CUES = {"reference": {}, "smollm2": {"cue_regex": "\n"}}


def random_r1_distill(device: str) -> LoadedModel:
    """DeepSeek-R1-Distill-Qwen-1.5B's public architecture, randomly initialised in bf16 (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lynx_exit.models import ModelProfile

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=151646,
        eos_token_id=151643,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    tokenizer = _byte_tokenizer()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id="r1-distill-1.5b-random",
        profile=ModelProfile(layers=(9, 16, 28)),
    )


def _byte_tokenizer() -> Any:
    """A small byte-level tokenizer: its ids are a subset of the architecture's vocabulary."""
    from lynx_exit.reference.tokenizer import train_tokenizer

    return train_tokenizer(PROMPTS * 4, vocab_size=300)


def _prompts(lm: LoadedModel, batch: int) -> list[list[int]]:
    return [lm.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]


def _sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def run_generate(lm: LoadedModel, prompts: list[list[int]], tokens: int) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    out = lm.model.generate(
        ids.to(lm.device),
        attention_mask=mask.to(lm.device),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=lm.pad_token_id,
    )
    return int(out[:, width:].numel())


def run_engine(
    lm: LoadedModel, prompts: list[list[int]], config: GenerationConfig, context: MethodContext | None
) -> tuple[int, int]:
    policies = None
    if context is not None:  # the probe is loaded once per context, as a server would hold it
        policies = [make_policy("lynx", context, delta=0.05) for _ in prompts]
    loop = DecodeLoop(lm, prompts, config, policies=policies)
    cues = sum(step.cue is not None for step in loop.steps())
    return sum(r.num_generated_tokens for r in loop.results()), cues


def bench(
    lm: LoadedModel, batch: int, tokens: int, repeats: int, probe: Path, cue_options: dict[str, Any]
) -> dict[str, Any]:
    prompts = _prompts(lm, batch)
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0, **cue_options)
    context = MethodContext(lm=lm, probe=str(probe))
    sides = {
        "generate": lambda: (run_generate(lm, prompts, tokens), 0),
        "engine": lambda: run_engine(lm, prompts, config, None),
        "engine_lynx": lambda: run_engine(lm, prompts, config, context),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    cues = 0
    for repeat in range(repeats + 1):  # repeat 0 warms up and is not counted
        order = list(sides) if repeat % 2 else list(reversed(sides))
        for name in order:
            _sync(lm)
            start = time.perf_counter()
            count, scored = sides[name]()
            _sync(lm)
            if repeat:
                rates[name].append(count / (time.perf_counter() - start))
                cues += scored if name == "engine_lynx" else 0
    # Medians of interleaved runs, and ratios paired within each repeat (the sides ran back to back):
    # a shared 2-core machine has bursts of ±15 % that a sum or unpaired ratio would keep.
    tps = {name: statistics.median(values) for name, values in rates.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    return {
        "batch": batch,
        "new_tokens_per_row": tokens,
        "generate_tokens_per_s": round(tps["generate"], 2),
        "engine_tokens_per_s": round(tps["engine"], 2),
        "engine_lynx_tokens_per_s": round(tps["engine_lynx"], 2),
        "engine_vs_generate_ratio": round(paired("engine", "generate"), 3),
        "lynx_vs_no_policy_ratio": round(paired("engine_lynx", "engine"), 3),
        "cues_scored_per_run": cues / repeats,
        "engine_step_ms": round(1000 * batch / tps["engine"], 3),
        "repeats": repeats,
    }


def bandwidth_share(lm: LoadedModel, row: dict[str, Any]) -> float | None:
    """Weight bytes read per decode step ÷ step time ÷ the card's memory bandwidth."""
    if lm.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    bandwidth = 4.8e12 if "H200" in name else 3.35e12 if "H100" in name else None
    if bandwidth is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return round(weight_bytes / (row["engine_step_ms"] / 1000) / bandwidth, 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="reference,smollm2")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument(
        "--tokens", default="reference=128,smollm2=32", help="new tokens per row, per model (MODEL=N,...)"
    )
    parser.add_argument(
        "--repeats", default="reference=15,smollm2=5", help="timed runs per side, per model (MODEL=N,...)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="engine_throughput")
    args = parser.parse_args()
    tokens = {k: int(v) for k, v in (item.split("=") for item in args.tokens.split(","))}
    repeats = {k: int(v) for k, v in (item.split("=") for item in args.repeats.split(","))}
    results = []
    for name in args.models.split(","):
        lm = (
            random_r1_distill(args.device)
            if name == "r1-distill-1.5b-random"
            else load_model(name, device=args.device)
        )
        with tempfile.TemporaryDirectory() as tmp:
            probe = never_exit_probe(lm, Path(tmp) / "probe")
            for batch in (int(b) for b in args.batches.split(",")):
                row = bench(lm, batch, tokens.get(name, 32), repeats.get(name, 5), probe, CUES.get(name, {}))
                row.update(
                    model=name, layers_scored=list(lm.feature_spec().layers), cue_options=CUES.get(name, {})
                )
                row["memory_bandwidth_share"] = bandwidth_share(lm, row)
                results.append(row)
                print(row, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    write_result(
        args.out,
        {
            "device": device,
            "targets": "engine_vs_generate_ratio >= 1.0 at every batch; lynx_vs_no_policy_ratio >= 0.97",
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
