"""Probe scoring + cue checking time as a fraction of decode-step time, in the online LYNX loop.

Usage: python benchmarks/probe_overhead.py --probe runs/demo/probe [--problems 8]
"""

from __future__ import annotations

import argparse
import time

import lynx_exit.decode as decode_module
from _common import write_result
from lynx_exit.lynx import LynxPolicy

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.models import load_model
from lynx_exit.probe import load_probe
from lynx_exit.reference import as_task_problems, make_problems


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
    parser.add_argument("--probe", required=True)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--problems", type=int, default=8)
    args = parser.parse_args()
    lm = load_model(args.model)
    bundle = load_probe(args.probe, expected=lm.feature_spec())
    problems = as_task_problems(make_problems("test", args.problems), "test")
    config = GenerationConfig(max_new_tokens=400, temperature=0.6, seed=0)
    probe_time, cue_time = [0.0], [0.0]
    original_step = decode_module.CueDetector.step

    def timed_step(self, delta, lookahead=""):
        start = time.perf_counter()
        try:
            return original_step(self, delta, lookahead)
        finally:
            cue_time[0] += time.perf_counter() - start

    decode_module.CueDetector.step = timed_step  # type: ignore[method-assign]
    steps = cues = 0
    start = time.perf_counter()
    # Time the probe's scoring calls themselves (made only at cue events) and every cue-detector step.
    bundle.probe.prob_safe = Timed(bundle.probe.prob_safe, probe_time)  # type: ignore[method-assign]
    for problem in problems:
        policy = LynxPolicy(bundle, args.delta)
        loop = DecodeLoop(lm, [lm.prompt_ids(problem.prompt)], config, policies=[policy])
        for step in loop.steps():
            steps += 1
            cues += step.cue is not None
    total = time.perf_counter() - start
    decode_module.CueDetector.step = original_step  # type: ignore[method-assign]
    write_result(
        "probe_overhead",
        {
            "model": args.model,
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
