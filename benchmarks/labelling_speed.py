"""Forced-exit labelling: batched from the rollout KV cache vs one `generate` per event (re-running the
prefix).

Same events, same model, one run. Usage: python benchmarks/labelling_speed.py [--problems 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import write_result

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.models import load_model
from lynx_exit.reference import as_task_problems, make_problems
from lynx_exit.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--cue-regex", default=None, help="e.g. '\\n' for models that never say wait")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--task", default="arith", choices=["arith", "gsm8k"])
    args = parser.parse_args()
    lm = load_model(args.model)
    if args.task == "arith":
        problems = as_task_problems(make_problems("calib", args.problems), "calib")
    else:
        problems = load_task("gsm8k", limit=args.problems)
    prompts = [lm.prompt_ids(p.prompt) for p in problems]
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=0.6,
        seed=0,
        answer_max_tokens=args.answer_tokens,
        cue_regex=args.cue_regex,
    )
    loop = DecodeLoop(lm, prompts, config, hold=True)  # keep the caches for the forced exits
    results = loop.run()
    events = [(row, index) for row, r in enumerate(results) for index in r.cue_indices]
    cue_ids = lm.exit_cue_ids()

    start = time.perf_counter()
    batched = loop.engine.forced_answers(events, cue_ids, args.answer_tokens)
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    single = []
    eos = min(lm.eos_token_ids)
    for row, index in events:
        prefix = prompts[row] + results[row].token_ids[:index] + cue_ids
        out = lm.model.generate(
            torch.tensor([prefix]),
            attention_mask=torch.ones(1, len(prefix), dtype=torch.long),
            max_new_tokens=args.answer_tokens,
            do_sample=False,
            pad_token_id=eos,
        )
        single.append(out[0, len(prefix) :].tolist())
    single_s = time.perf_counter() - start
    agree = sum(b.token_ids == s[: len(b.token_ids)] for b, s in zip(batched, single, strict=True))
    name = "labelling_speed" if args.model == "reference" else f"labelling_speed_{args.model}"
    write_result(
        name,
        {
            "model": args.model,
            "cue_regex": args.cue_regex,
            "events": len(events),
            "rollouts": len(prompts),
            "answer_max_tokens": args.answer_tokens,
            "batched_s": round(batched_s, 3),
            "one_by_one_generate_s": round(single_s, 3),
            "speedup": round(single_s / batched_s, 2),
            "answers_agree": f"{agree}/{len(events)}",
            "target": ">= 5x at >= 32 events",
        },
    )


if __name__ == "__main__":
    main()
