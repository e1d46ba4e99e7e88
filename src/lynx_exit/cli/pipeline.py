"""`lynx-exit` subcommands beyond generate: the probe pipeline, the reference model, the demo."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lynx_exit.cli.common import (
    add_model_flags,
    add_ray_flags,
    add_sampling_flags,
    add_task_flags,
    generation_config,
    load_model_from_args,
    model_source,
    parse_layers,
    ray_options,
    task_problems,
)
from lynx_exit.cli.evaluation import add_commands as eval_commands
from lynx_exit.cli.probe import add_commands as probe_commands
from lynx_exit.decision_points import EXIT_PREFIXES, parse_points


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
    problems = task_problems(args)
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
    problems = task_problems(args)
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
    add_task_flags(build, task="gsm8k-train", split="train", num_problems=200)
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

    probe_commands(sub)

    eval_commands(sub)

    warm = sub.add_parser(
        "deepconf-warmup", help="full traces with token confidences: the warm-up deepconf's threshold needs"
    )
    add_task_flags(warm, task="gsm8k-train", split="train", num_problems=32)
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
