"""Probe scoring + cue checking time as a share of decode time, in the online LYNX engine.

Usage: python benchmarks/probe_overhead.py --probe runs/demo/probe [--problems 8]
       python benchmarks/probe_overhead.py --model smollm2 --task gsm8k --cue-regex '\\n' --max-new-tokens 96
With no --probe, a randomly initialised probe in the model's default feature space is scored
(it costs what a trained one costs) and calibrated never to exit, so every cue is scored.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import never_exit_probe, write_result

import lynx_exit.cues as cues_module
from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits import MethodContext, make_policy
from lynx_exit.models import load_model
from lynx_exit.reference import as_task_problems, make_problems
from lynx_exit.tasks import load_task


class Timed:
    """Wraps a callable and adds its wall time to a shared counter."""

    def __init__(self, fn, counter: list[float]) -> None:
        self.fn, self.counter = fn, counter

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.counter[0] += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference")
    parser.add_argument("--probe", default=None, help="probe folder (default: a random never-exit probe)")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--task", default="arith", choices=["arith", "gsm8k"])
    parser.add_argument("--cue-regex", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--out", default=None, help="result name (default: probe_overhead[_MODEL])")
    args = parser.parse_args()
    lm = load_model(args.model)
    problems = (
        as_task_problems(make_problems("test", args.problems), "test")
        if args.task == "arith"
        else load_task("gsm8k", limit=args.problems)
    )
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=0.6, seed=0, cue_regex=args.cue_regex
    )
    probe_time, cue_time = [0.0], [0.0]
    original_step = cues_module.CueDetector.step

    def timed_step(self, delta, lookahead=""):
        start = time.perf_counter()
        try:
            return original_step(self, delta, lookahead)
        finally:
            cue_time[0] += time.perf_counter() - start

    cues_module.CueDetector.step = timed_step  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        probe = args.probe or str(never_exit_probe(lm, Path(tmp) / "probe"))
        context = MethodContext(lm=lm, probe=probe)
        steps = cues = 0
        start = time.perf_counter()
        for problem in problems:
            policy = make_policy("lynx", context, delta=args.delta)
            policy.scorer = Timed(policy.scorer, probe_time)  # the engine's batched scoring calls
            loop = DecodeLoop(lm, [lm.prompt_ids(problem.prompt)], config, policies=[policy])
            for step in loop.steps():
                steps += 1
                cues += step.cue is not None
        total = time.perf_counter() - start
    cues_module.CueDetector.step = original_step  # type: ignore[method-assign]
    write_result(
        args.out or ("probe_overhead" if args.model == "reference" else f"probe_overhead_{args.model}"),
        {
            "model": args.model,
            "probe": args.probe or "random weights, never-exit calibration",
            "cue_regex": args.cue_regex,
            "steps": steps,
            "cue_events": cues,
            "mean_step_ms": round(1000 * total / steps, 3),
            "probe_ms_per_cue": round(1000 * probe_time[0] / max(cues, 1), 4),
            "cue_check_us_per_step": round(1e6 * cue_time[0] / steps, 2),
            "policy_plus_cue_check_fraction": round((probe_time[0] + cue_time[0]) / total, 5),
            "target": "< 1 % of decode-step time",
        },
    )


if __name__ == "__main__":
    main()
