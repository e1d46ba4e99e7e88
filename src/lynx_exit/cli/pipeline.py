"""`lynx-exit` subcommands beyond generate: the probe pipeline, the reference model, the demo."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lynx_exit.cli.common import (
    add_assist_flags,
    add_model_flags,
    add_ray_flags,
    add_sampling_flags,
    assist_from_args,
    generation_config,
    load_model_from_args,
    locate_probe_arg,
    model_source,
    parse_layers,
    ray_options,
)
from lynx_exit.cli.probe import cmd_calibrate, cmd_risk, cmd_train
from lynx_exit.decision_points import EXIT_PREFIXES, parse_points
from lynx_exit.exits.lynx import give_up_delta_value as _give_up_delta


def cmd_train_reference(args: argparse.Namespace) -> int:
    import torch

    from lynx_exit.models import REFERENCE_MODELS
    from lynx_exit.reference.training import PRESET_SIZES, ReferenceTrainConfig, train_reference_model

    torch.set_num_threads(args.threads) if args.threads else None
    config = ReferenceTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        learning_rate=args.lr,
        init_from=args.init_from,
        tokenizer_from=str(REFERENCE_MODELS.get(args.tokenizer_from, args.tokenizer_from))
        if args.tokenizer_from
        else None,
        preset=args.preset,
        **PRESET_SIZES.get(args.preset, {}),
    )
    out = Path(args.out)
    report = train_reference_model(config, out)
    print(json.dumps(report, indent=2))
    return 0


def _problems(args: argparse.Namespace) -> list[Any]:
    from lynx_exit.reference import as_task_problems, make_problems
    from lynx_exit.tasks import load_task

    if args.task == "arith":  # the reference model's synthetic problems, split by --split
        if args.data:
            raise ValueError(
                f"--task arith generates its problems and takes no --data (got {args.data!r}); "
                "pass a task name that reads JSONL, e.g. --task gsm8k --data FILE"
            )
        problems = as_task_problems(make_problems(args.split, args.offset + args.num_problems), args.split)
        return problems[args.offset :]
    return load_task(args.task, args.data, limit=args.num_problems, offset=args.offset)


def cmd_build_data(args: argparse.Namespace) -> int:
    from lynx_exit.probe.build_data import BuildConfig, build_dataset

    generation = generation_config(args)
    config = BuildConfig(
        rollouts_per_problem=args.rollouts,
        max_events_per_rollout=args.max_events,
        skip_first_events=args.skip_first,
        synthetic_event=not args.no_synthetic_event,
        batch_size=args.batch_size,
        label_batch_size=args.label_batch_size,
        exit_prefix=args.exit_prefix,
        **({"decision_points": parse_points(args.decision_points)} if args.decision_points else {}),
    )
    problems = _problems(args)
    scale = ray_options(args)
    if scale is None:
        lm = load_model_from_args(args)
        if not args.decision_points:  # the model family's
            config = replace(config, decision_points=lm.profile.decision_points)
        spec = lm.feature_spec(parse_layers(args))
        summary = build_dataset(
            lm, problems, Path(args.out), generation, config, spec, extra_meta={"model": args.model}
        )
    else:
        from lynx_exit.scale import RayPool

        with RayPool(model_source(args), scale) as pool:
            spec = pool.feature_spec(parse_layers(args))
            summary = build_dataset(
                None,
                problems,
                Path(args.out),
                generation,
                config,
                spec,
                extra_meta={"model": args.model},
                runner=pool.build_runner,
            )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_deepconf_warmup(args: argparse.Namespace) -> int:
    from lynx_exit.exits.deepconf import WARMUP_FILE, run_warmup

    if args.rollouts != 1:
        raise ValueError(f"deepconf-warmup takes one trace per problem (got --rollouts {args.rollouts})")
    problems = _problems(args)
    lm = load_model_from_args(args)
    summary = run_warmup(
        lm,
        problems,
        generation_config(args),
        Path(args.out),
        top_k=args.confidence_top_k,
        window=args.window,
        batch_size=args.batch_size,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / WARMUP_FILE}")
    return 0


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
            _problems(argparse.Namespace(**{**vars(args), "task": task})),
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


def cmd_tasks(args: argparse.Namespace) -> int:
    from lynx_exit.tasks import download, task_rows, task_table

    for name in args.download or []:
        print(f"{name}: {download(name)} problems read into the datasets cache")
    if args.json:
        print(json.dumps(task_rows(), indent=2, ensure_ascii=False))
    elif not args.download:
        print(task_table(), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lynx_exit.reference.demo import DemoConfig, run_demo

    config = DemoConfig(
        train_problems=args.train_problems,
        calib_problems=args.calib_problems,
        test_problems=args.test_problems,
        seed=args.seed,
        model=args.model,
    )
    result = run_demo(config, Path(args.out))
    print(result["table"])
    print(
        f"probe: val AUROC {result['probe_metrics']['val_auroc']:.3f}; demo took "
        f"{result['demo_seconds']:.0f} s"
    )
    print(f"wrote {Path(args.out) / 'eval' / 'summary.json'} and {Path(args.out) / 'eval' / 'pareto.png'}")
    return 0


def _add_task_flags(parser: argparse.ArgumentParser, task: str, split: str, num_problems: int) -> None:
    parser.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    parser.add_argument(
        "--task",
        default=task,
        help="task name (lynx-exit tasks lists them), or 'arith' for the reference model's problems",
    )
    parser.add_argument(
        "--split", default=split, choices=["train", "calib", "test"], help="split for --task arith"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="the task's data from a JSONL or Parquet file, or a folder laid out like its Hub repository",
    )
    parser.add_argument("--num-problems", type=int, default=num_problems)
    parser.add_argument(
        "--offset", type=int, default=0, help="first problem index (use disjoint ranges for calibration)"
    )
    parser.add_argument("--rollouts", type=int, default=1, help="rollouts per problem")
    parser.add_argument("--batch-size", type=int, default=16, help="rollouts decoded together")


def add_commands(sub: Any) -> None:
    tasks = sub.add_parser("tasks", help="every task: its source, grader and whether it reads offline")
    tasks.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    tasks.add_argument(
        "--download", nargs="+", metavar="TASK", help="read these Hub tasks once into the datasets cache"
    )
    tasks.set_defaults(func=cmd_tasks)

    ref = sub.add_parser(
        "train-reference", help="train a reference reasoning model (from scratch, or on from --init-from)"
    )
    ref.add_argument(
        "--out",
        default="runs/reference",
        help="output folder (default: runs/reference; never the installed package)",
    )
    ref.add_argument("--steps", type=int, default=1600)
    ref.add_argument("--batch-size", type=int, default=16)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ref.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    ref.add_argument("--init-from", default=None, help="continue training this checkpoint folder")
    ref.add_argument(
        "--tokenizer-from",
        default=None,
        help="train from scratch with this model's tokenizer (alias or folder), e.g. the large model with "
        "the small one's",
    )
    ref.add_argument(
        "--preset",
        default="reference",
        choices=["reference", "reference-large", "v1"],
        help="traces and size: reference / reference-large = the shipped pair (traces that revise, hesitate "
        "and loop as real reasoners do; one shared tokenizer); v1 = the first reference model's traces, "
        "whose first answer is always final",
    )
    ref.set_defaults(func=cmd_train_reference)

    build = sub.add_parser("build-data", help="sample rollouts and label cue events by forced exits")
    _add_task_flags(build, task="gsm8k-train", split="train", num_problems=200)
    build.add_argument("--max-events", type=int, default=16, help="max labelled events per rollout")
    build.add_argument(
        "--skip-first", type=int, default=0, help="skip the first k cue events of each rollout"
    )
    build.add_argument(
        "--no-synthetic-event", action="store_true", help="no 70%% event for cue-less rollouts"
    )
    build.add_argument("--label-batch-size", type=int, default=64, help="forced exits decoded together")
    build.add_argument(
        "--decision-points",
        default=None,
        help="decision point kinds to label, comma-separated: cue, answer, paragraph (default: the model "
        "family's, cue)",
    )
    build.add_argument(
        "--exit-prefix",
        default="point",
        choices=sorted(EXIT_PREFIXES),
        help="what a labelling exit keeps: point = the paper's (a cue is dropped); lookahead = the token "
        "after the point too, as the vLLM plug-in exits (label with it for a probe served there)",
    )
    add_model_flags(build)
    add_ray_flags(build)
    add_sampling_flags(build)
    build.set_defaults(func=cmd_build_data)

    train = sub.add_parser("train", help="train the probe on a build-data folder")
    train.add_argument("--data", required=True, help="dataset folder from build-data")
    train.add_argument("--out", required=True, help="probe folder to write")
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--patience", type=int, default=15)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--expect-spec", default=None, help="JSON FeatureSpec the dataset must match")
    train.add_argument(
        "--allow-one-class", action="store_true", help="train even if every event has the same label"
    )
    train.set_defaults(func=cmd_train)

    cal = sub.add_parser("calibrate", help="conformal thresholds from a disjoint calibration dataset")
    cal.add_argument("--probe", required=True, help="probe folder from train")
    cal.add_argument(
        "--data", required=True, help="calibration dataset folder (problems disjoint from training)"
    )
    cal.add_argument("--deltas", default="0.01,0.02,0.03,0.05,0.1,0.2,0.3")
    cal.add_argument(
        "--epsilon", type=float, default=0.1, help="Learn-then-Test failure probability (trajectory mode)"
    )
    cal.add_argument(
        "--give-up-after", type=int, default=200, help="generated tokens before a give-up may happen"
    )
    cal.set_defaults(func=cmd_calibrate)

    risk = sub.add_parser("risk", help="the realized risk of every calibrated rule on held-out labelled data")
    risk.add_argument("--probe", required=True, help="calibrated probe folder")
    risk.add_argument(
        "--data", required=True, help="a build-data folder of held-out problems (e.g. the test split)"
    )
    risk.add_argument("--out", default=None, help="write the rows as JSON here")
    risk.set_defaults(func=cmd_risk)

    ev = sub.add_parser("eval", help="tasks × exit methods × settings, paired seeds, Pareto report")
    _add_task_flags(ev, task="gsm8k", split="test", num_problems=100)
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

    warm = sub.add_parser(
        "deepconf-warmup", help="full traces with token confidences: the warm-up deepconf's threshold needs"
    )
    _add_task_flags(warm, task="gsm8k-train", split="train", num_problems=32)
    warm.add_argument(
        "--confidence-top-k", type=int, default=5, help="most likely tokens averaged in each token confidence"
    )
    warm.add_argument(
        "--window",
        type=int,
        default=32,
        help="default group window (tokens); deepconf's window option overrides",
    )
    add_model_flags(warm)
    add_sampling_flags(warm)
    warm.set_defaults(func=cmd_deepconf_warmup)

    demo = sub.add_parser("demo", help="the whole LYNX loop on the shipped reference model, offline")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--train-problems", type=int, default=500)
    demo.add_argument("--calib-problems", type=int, default=300)
    demo.add_argument("--test-problems", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default="reference")
    demo.set_defaults(func=cmd_demo)
