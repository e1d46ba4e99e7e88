"""`lynx-exit generate` and `lynx-exit profiles`: one prompt with online early exit, and the family table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lynx_exit.cli.common import (
    add_assist_flags,
    add_engine_flags,
    add_model_flags,
    add_sampling_flags,
    assist_from_args,
    engine_config,
    generation_config,
    load_model_from_args,
    locate_probe_arg,
    parse_layers,
)


def _policy_from_args(args: argparse.Namespace, lm: Any, probe_folder: str | None) -> Any:
    from lynx_exit.exits import MethodContext, get_method, make_policy

    args.exit = args.exit or ("lynx" if args.probe else "never")
    method = get_method(args.exit)
    if args.probe is not None and not method.needs_probe:
        raise ValueError(
            f"--probe {args.probe!r} is read only by the LYNX methods, and --exit {args.exit} does not use it"
        )
    options: dict[str, Any] = {}
    if method.knob is not None:
        value = getattr(args, method.knob.flag.lstrip("-").replace("-", "_"))
        if method.knob.name == "delta" and args.confidence is not None:
            value = str(1 - args.confidence)
        if value is None:
            raise ValueError(f"--exit {args.exit} needs {method.knob.flag} ({method.knob.help})")
        options.update(method.knob.parse_value(str(value), method.knob.flag))
    if "mode" in method.option_names:
        options["mode"] = args.mode
    for option, flag in (("decision_points", "--decision-points"), ("give_up_delta", "--give-up-delta")):
        value = getattr(args, option)
        if value is None:
            continue
        if option not in method.option_names:
            raise ValueError(
                f"{flag} is read only by the LYNX methods, and --exit {args.exit} does not use it"
            )
        options[option] = value
    return make_policy(args.exit, MethodContext(lm=lm, probe=probe_folder, deepconf=args.deepconf), **options)


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lynx_exit.engine import DecodeLoop
    from lynx_exit.tasks import REASONING_SUFFIX, load_task

    config = generation_config(args)
    problem = None
    if args.task:
        problems = load_task(args.task, args.data, limit=1, offset=args.index)
        if not problems:
            raise ValueError(f"task {args.task!r} has no problem at --index {args.index}")
        problem = problems[0]
        prompt_text = problem.prompt
    elif args.prompt:
        # The reasoning instruction every task uses (how-it-works §3); it also asks for the \boxed{}
        # answer an exit needs.
        prompt_text = args.prompt if args.no_suffix else args.prompt + REASONING_SUFFIX
    else:
        raise ValueError("give a prompt or --task NAME [--index I]")
    probe_folder = locate_probe_arg(args)
    lm = load_model_from_args(args)
    if args.explain:
        print(f"profile {lm.profile.family!r} for {args.model!r}: {lm.profile.reason}", file=sys.stderr)
        print(
            f"  exit cue {lm.profile.exit_cue_text(config.exit_cue)!r}, layers "
            f"{list(lm.feature_spec().layers)}",
            file=sys.stderr,
        )
    policy = _policy_from_args(args, lm, probe_folder)
    layers = (
        parse_layers(args) if policy.feature_spec is not None else None
    )  # a probe's own layers; --layers must agree
    assistant, assist = assist_from_args(args, lm)
    loop = DecodeLoop(
        lm,
        [lm.prompt_ids(prompt_text)],
        config,
        policies=[policy],
        layers=layers,
        engine=engine_config(args),
        assist=assist,
        assistant=assistant,
    )
    console = Console(highlight=False, soft_wrap=True)
    stream = not args.json
    started = time.perf_counter()
    for step in loop.steps():
        if not stream:
            continue
        if step.exit:
            what = "give up" if step.gave_up else "exit"
            console.print(
                f" [{what} at {step.point or 'step'} {step.cue or step.text!r}] ",
                style="bold red",
                end="",
                markup=False,
            )
            if step.point == "cue":  # the exit dropped the cue token
                continue
        style = (
            "bold yellow" if step.cue else ("cyan" if step.phase in ("exit_cue", "forced_answer") else None)
        )
        console.print(step.text, style=style, end="", markup=False)
    wall = time.perf_counter() - started
    result = loop.results()[0]
    record = {
        "model": args.model,
        "exit": args.exit,
        "answer": result.answer,
        "finish_reason": result.finish_reason,
        "generated_tokens": result.num_generated_tokens,
        "exit_index": result.exit_index,
        "exit_point": result.exit_point,
        "gave_up": result.gave_up,
        "cue_indices": result.cue_indices,
        "wall_time_s": round(wall, 3),
        "text": result.text,
        "profile": {**lm.profile.identity(), "reason": lm.profile.reason},
    }
    if result.assist is not None:
        record.update(assistant_model=args.assistant_model, assist=result.assist)
    if problem is not None:
        record.update(
            task=problem.task,
            problem_id=problem.problem_id,
            gold=problem.gold,
            correct=problem.grade(result.text),
        )
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        print()
        tokens, cues = result.num_generated_tokens, len(result.cue_indices)
        summary = f"[{tokens} tokens, {wall:.2f} s, {cues} cues, finish: {result.finish_reason}"
        if result.exit_index is not None:
            summary += f", exited at token {result.exit_index}"
        if result.assist is not None:
            summary += (
                f", assistant wrote {result.assist['assistant_tokens']} "
                f"({100 * result.assist['assistant_share']:.0f} %) "
                f"in {result.assist['takeovers']} takeovers"
            )
        if problem is not None:
            verdict = "right" if record["correct"] else "wrong"
            summary += f", answer {result.answer!r} vs gold {problem.gold!r}: {verdict}"
        print(summary + "]")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from lynx_exit.models.profile import LAYER_RULE, profiles_table

    if args.json:
        print(json.dumps(profiles_table(), indent=2, ensure_ascii=False))
    else:
        print(profiles_table(markdown=True), end="")
        print(f"\nLayers: {LAYER_RULE}.")
    return 0


def add_commands(sub: Any) -> None:

    gen = sub.add_parser("generate", help="stream one generation with online early exit")
    gen.add_argument("prompt", nargs="?", help="the user prompt")
    gen.add_argument("--task", default=None, help="take the prompt from a task instead (gsm8k, svamp, ...)")
    gen.add_argument("--data", default=None, help="JSONL file for --task")
    gen.add_argument("--index", type=int, default=0, help="problem index within --task")
    from lynx_exit.exits import knobs, method_names

    gen.add_argument(
        "--exit",
        default=None,
        choices=method_names(),
        help="exit method (default: lynx with --probe, else never)",
    )
    for knob in knobs():
        gen.add_argument(knob.flag, default=knob.default, help=knob.help)
    gen.add_argument(
        "--probe",
        default=None,
        help="probe for the LYNX methods: a folder, or a Hub repo id OWNER/NAME[@REVISION]",
    )
    gen.add_argument(
        "--deepconf", default=None, help="warm-up folder for --exit deepconf (from lynx-exit deepconf-warmup)"
    )
    gen.add_argument("--confidence", type=float, default=None, help="1 - δ (overrides --delta)")
    gen.add_argument(
        "--mode", default="event", choices=["event", "trajectory", "harm"], help="conformal calibration mode"
    )
    gen.add_argument(
        "--decision-points",
        default=None,
        help="where LYNX may decide, comma-separated: cue, answer, paragraph (default: the model family's, "
        "cue)",
    )
    gen.add_argument(
        "--give-up-delta",
        default=None,
        help="give up on a trace the probe judges lost (risk of giving up on one that would end right ≤ "
        "this)",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON record instead of streaming")
    gen.add_argument(
        "--no-suffix", action="store_true", help="send the prompt as is, without the step-by-step instruction"
    )
    gen.add_argument("--explain", action="store_true", help="say which model profile was chosen and why")
    add_model_flags(gen)
    add_engine_flags(gen)
    add_assist_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)

    profiles = sub.add_parser(
        "profiles", help="the table of reasoning model families and how each is recognised"
    )
    profiles.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    profiles.set_defaults(func=cmd_profiles)
