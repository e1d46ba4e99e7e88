"""`lynx-exit eval`: tasks × exit methods × settings on paired seeds, with a Pareto report."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lynx_exit.cli.common import (
    add_assist_flags,
    add_model_flags,
    add_ray_flags,
    add_sampling_flags,
    add_task_flags,
    assist_from_args,
    generation_config,
    load_model_from_args,
    locate_probe_arg,
    model_source,
    ray_options,
    task_problems,
)
from lynx_exit.decision_points import parse_points
from lynx_exit.exits.lynx import give_up_delta_value as _give_up_delta


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_eval(args: argparse.Namespace) -> int:
    """Several tasks (`--task math500,aime24,gsm8k`) run one after another on one loaded model, each into
    OUT/TASK."""
    from lynx_exit.exits import knobs, parse_methods

    grids = {knob.name: getattr(args, _dest(knob.grid_flag)) for knob in knobs()}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    axes: dict[str, Sequence[Any]] = {}
    if args.decision_points:
        axes["decision_points"] = [
            parse_points(part) for part in args.decision_points.split(";") if part.strip()
        ]
    if args.give_up_deltas:
        axes["give_up_delta"] = [
            None if part.strip() == "none" else _give_up_delta(part)
            for part in args.give_up_deltas.split(",")
            if part.strip()
        ]
    settings = parse_methods(methods, grids, extra={"mode": args.mode}, axes=axes)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if len(tasks) > 1 and args.data:
        raise ValueError(
            f"--data names one task's data; run the tasks {tasks} one at a time to give each its file"
        )
    jobs = [
        (
            task,
            task_problems(argparse.Namespace(**{**vars(args), "task": task})),
            Path(args.out) / task if len(tasks) > 1 else Path(args.out),
        )
        for task in tasks
    ]
    probe_folder = locate_probe_arg(args)
    scale = ray_options(args)
    if scale is None:
        lm = load_model_from_args(args)
        for task, problems, out in jobs:
            _eval_one(args, task, problems, out, settings, probe_folder, lm=lm)
        return 0
    from lynx_exit.scale import RayPool

    # Workers find the probe themselves: a Hub id, or a folder they can see (a shared filesystem on a
    # cluster).
    with RayPool(model_source(args), scale, probe=args.probe, deepconf=args.deepconf) as pool:
        pool.check_settings(settings)
        for task, problems, out in jobs:
            _eval_one(args, task, problems, out, settings, probe_folder, runner=pool.eval_runner)
    return 0


def _eval_one(
    args: argparse.Namespace,
    task: str,
    problems: list[Any],
    out: Path,
    settings: Any,
    probe_folder: str | None,
    lm: Any = None,
    runner: Any = None,
) -> None:
    from lynx_exit.evaluate import markdown_table, run_eval, write_report

    assistant, assist = assist_from_args(args, lm) if lm is not None else (None, None)
    summary = run_eval(
        lm,
        problems,
        settings,
        generation_config(args),
        out,
        rollouts=args.rollouts,
        batch_size=args.batch_size,
        probe=probe_folder,
        deepconf=args.deepconf,
        runner=runner,
        assistant=assistant,
        assist=assist,
    )
    probe_task = None
    if probe_folder:
        probe_task = json.loads((Path(probe_folder) / "probe.json").read_text()).get("training_task")
    meta = {
        "model": args.model,
        "assistant_model": args.assistant_model,
        "task": task,
        "probe": args.probe,
        "probe_folder": probe_folder,
        "probe_training_task": probe_task,
        "deepconf": args.deepconf,
        "seed": args.seed,
        "offset": args.offset,
        "mode": args.mode,
    }
    write_report(summary, out, meta, title=f"{args.model} on {task}")
    print(markdown_table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'pareto.png'}")


def add_commands(sub: Any) -> None:
    ev = sub.add_parser("eval", help="tasks × exit methods × settings, paired seeds, Pareto report")
    add_task_flags(ev, task="gsm8k", split="test", num_problems=100)
    from lynx_exit.exits import knobs, method_names

    ev.add_argument(
        "--methods",
        default="never,token-budget,lynx",
        help=f"comma-separated, from: {', '.join(method_names())}",
    )
    for knob in knobs():
        ev.add_argument(
            knob.grid_flag, default=knob.default_grid, help=f"comma-separated values: {knob.help}"
        )
    ev.add_argument(
        "--probe",
        default=None,
        help="probe for the LYNX methods: a folder, or a Hub repo id OWNER/NAME[@REVISION]",
    )
    ev.add_argument(
        "--deepconf", default=None, help="warm-up folder for deepconf (from lynx-exit deepconf-warmup)"
    )
    ev.add_argument(
        "--mode", default="event", choices=["event", "trajectory", "harm"], help="mode of method 'lynx'"
    )
    ev.add_argument(
        "--decision-points",
        default=None,
        help="LYNX decision point sets to sweep, ';'-separated, each comma-separated (e.g. 'cue;cue,answer')",
    )
    ev.add_argument(
        "--give-up-deltas",
        default=None,
        help="LYNX give-up δ values to sweep, comma-separated; 'none' for no give-up (e.g. 'none,0.05')",
    )
    add_model_flags(ev)
    add_assist_flags(ev)
    add_ray_flags(ev)
    add_sampling_flags(ev)
    ev.set_defaults(func=cmd_eval)
