"""Speculative Thinking on the reference pair: the small model alone, the large one alone, the small one
helped by the large one (and with LYNX on top), on the same test problems and seeds; then throughput at batch
16 against the official code's schedule (one request at a time), emulated on this engine at batch 1.

The reference traces put each step on a line of its own, so the trigger is a line break (the official "\\n\\n"
marks a paragraph of a real reasoner's trace); keywords are the official lists. Sampling as the paper: T 0.6,
top-p 0.95, top-k 50. Accuracy differences are paired by problem, with a bootstrap interval.

Usage: python benchmarks/speculative_reference.py [--problems 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from _common import write_result

from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.engine.assist import AssistConfig
from lynx_exit.exits import MethodContext, make_policy
from lynx_exit.models import load_model
from lynx_exit.reference.problems import make_problems

PROBE = Path(__file__).parent / "results" / "probe_reference"
FIRST = re.compile(r"So the answer is (-?\d+)")
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
ASSIST = AssistConfig(trigger="\n")
TO_BREAK = AssistConfig(trigger="\n", to_break=True)


def run(
    thinker: Any,
    assistant: Any,
    problems: list,
    assist: AssistConfig | None,
    lynx_delta: float | None,
    batch: int,
    seed: int,
) -> dict[str, Any]:
    """One method on every problem: accuracy per problem, tokens, throughput and what each model did."""
    engine = Engine(thinker, max_batch_size=batch, assistant=assistant if assist is not None else None)
    config = GenerationConfig(max_new_tokens=500, temperature=0.6, top_p=0.95, top_k=50)
    context = MethodContext(lm=thinker, probe=str(PROBE)) if lynx_delta is not None else None
    ids = []
    for i, problem in enumerate(problems):
        policy = make_policy("lynx", context, delta=lynx_delta) if context is not None else None
        ids.append(
            engine.add_request(
                thinker.prompt_ids(problem.question() + SUFFIX),
                config,
                policy=policy,
                seed=seed + i,
                assist=assist,
            )
        )
    start = time.perf_counter()
    list(engine.stream())
    wall = time.perf_counter() - start
    results = [engine.result(i) for i in ids]
    correct = [
        r.answer is not None and r.answer.strip() == str(p.answer)
        for r, p in zip(results, problems, strict=True)
    ]
    revisions = {"right->wrong": 0, "wrong->right": 0}
    for result, problem in zip(results, problems, strict=True):
        first = FIRST.search(result.text)
        if first and result.answer is not None and first.group(1) != result.answer.strip():
            revisions["right->wrong" if int(first.group(1)) == problem.answer else "wrong->right"] += 1
    out: dict[str, Any] = {
        "accuracy": round(sum(correct) / len(correct), 4),
        "revised_answers": revisions,
        "correct": correct,
        "mean_tokens": round(sum(r.num_generated_tokens for r in results) / len(results), 1),
        "mean_thinking_tokens": round(sum(r.reasoning_tokens for r in results) / len(results), 1),
        "problems_per_s": round(len(results) / wall, 3),
        "wall_s": round(wall, 1),
    }
    if assist is not None:
        reports = [r.assist for r in results if r.assist is not None]
        total = sum(r["thinker_tokens"] + r["assistant_tokens"] for r in reports)
        for key in (
            "assistant_tokens",
            "thinker_tokens",
            "assistant_read_tokens",
            "takeovers",
            "verify_extensions",
            "recaps",
            "lookahead_tokens_discarded",
        ):
            out[f"mean_{key}"] = round(sum(r[key] for r in reports) / len(reports), 2)
        out["assistant_share"] = round(sum(r["assistant_tokens"] for r in reports) / max(1, total), 4)
    return out


def paired(a: list[bool], b: list[bool], seed: int = 0, draws: int = 2000) -> dict[str, float]:
    """Mean of b - a over problems and a 95 % bootstrap interval."""
    diffs = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(draws))
    return {
        "difference": round(sum(diffs) / len(diffs), 4),
        "ci95": [round(means[int(0.025 * draws)], 4), round(means[int(0.975 * draws) - 1], 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--throughput-problems", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--delta", type=float, default=0.1, help="LYNX δ for speculative-thinking+lynx")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    small, large = load_model("reference"), load_model("reference-large")
    problems = make_problems("test", args.problems)
    rows = {
        "small alone": run(small, None, problems, None, None, 16, args.seed),
        "large alone": run(large, None, problems, None, None, 16, args.seed),
        "speculative-thinking": run(small, large, problems, ASSIST, None, 16, args.seed),
        "speculative-thinking (official: look-ahead dropped)": run(
            small, large, problems, AssistConfig(trigger="\n", keep_lookahead=False), None, 16, args.seed
        ),
        "speculative-thinking (takeover to the end of the line)": run(
            small, large, problems, TO_BREAK, None, 16, args.seed
        ),
        f"speculative-thinking+lynx@{args.delta}": run(
            small, large, problems, ASSIST, args.delta, 16, args.seed
        ),
        f"speculative-thinking (to the end of the line)+lynx@{args.delta}": run(
            small, large, problems, TO_BREAK, args.delta, 16, args.seed
        ),
    }
    base = rows["small alone"]["correct"]
    for name, row in rows.items():
        if name != "small alone":
            row["vs_small_alone"] = paired(base, row["correct"])
        print(name, {k: v for k, v in row.items() if k != "correct"}, flush=True)
    few = problems[: args.throughput_problems]
    throughput = {
        "batch_16": run(small, large, few, ASSIST, None, 16, args.seed),
        "batch_1_official_schedule": run(
            small, large, few, AssistConfig(trigger="\n", keep_lookahead=False), None, 1, args.seed
        ),
    }
    for row in (*rows.values(), *throughput.values()):
        row.pop("correct")
    speedup = (
        throughput["batch_16"]["problems_per_s"] / throughput["batch_1_official_schedule"]["problems_per_s"]
    )
    print("throughput", throughput, "speed-up", round(speedup, 2))
    write_result(
        "speculative_reference",
        {
            "problems": args.problems,
            "seed": args.seed,
            "sampling": "T 0.6, top-p 0.95, top-k 50, 500 tokens",
            "assist": {
                "trigger": "\\n",
                "lookahead": ASSIST.lookahead,
                "takeover": ASSIST.takeover,
                "verify_extension": ASSIST.verify_extension,
            },
            "methods": rows,
            "throughput": {
                **throughput,
                "speedup_batch16_vs_official_batch1": round(speedup, 2),
                "problems": args.throughput_problems,
            },
            "target": "accuracy above small alone (paired CI above 0) with the assistant writing <= 25 % of "
            "thinking tokens",
        },
    )


if __name__ == "__main__":
    main()
