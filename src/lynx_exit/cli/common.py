"""Flags and their mapping onto library config, shared by every `lynx-exit` subcommand module."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lynx_exit.cues import DEFAULT_CUE_WORDS
from lynx_exit.models.families import EXIT_CUE_PHRASES, FAMILY_NAMES

DEFAULT_MODEL = "reference"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="alias (reference, reference-large, smollm2), GGUF file, folder or hub id",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--layers", default=None, help="comma-separated hidden-state layers (default: the profile's)"
    )
    profile = parser.add_argument_group(
        "model profile overrides (default: from the family table, see `lynx-exit profiles`)"
    )
    profile.add_argument("--family", default=None, choices=FAMILY_NAMES, help="use this family's profile")
    profile.add_argument("--think-start", default=None, help="marker that opens thinking ('none': no marker)")
    profile.add_argument(
        "--think-end", default=None, help="marker that closes thinking ('none': all text is thinking)"
    )
    profile.add_argument(
        "--exit-close", default=None, help="text an exit writes to close thinking, before the answer phrase"
    )
    profile.add_argument(
        "--chat-template-kwargs",
        default=None,
        help="JSON switches for the chat template, e.g. '{\"enable_thinking\": true}'",
    )
    profile.add_argument("--system-prompt", default=None, help="system prompt added to chat prompts")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="memory for the KV cache in GiB (default: grown as requests need, up to the context limit)",
    )
    group.add_argument(
        "--prefill-tokens-per-step",
        type=int,
        default=2048,
        help="prompt tokens read per engine step; a longer prompt is read over several steps "
        "while running requests keep decoding",
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help="run each decode step as one compiled graph (CUDA graphs on a GPU, Inductor on a CPU): 'auto' "
        "(the default) compiles on a GPU and not on a CPU; a bare --compile is 'on'. It compiles once per "
        "model (cached on disk by torch); `serve` warms every batch size before it reports ready",
    )


def add_assist_flags(parser: argparse.ArgumentParser) -> None:
    from lynx_exit.engine.assist import NEGATIVE_WORDS, POSITIVE_WORDS, VERIFY_WORDS

    group = parser.add_argument_group(
        "Speculative Thinking (a larger model of the same family writes the reflective steps)"
    )
    group.add_argument(
        "--assistant-model",
        default=None,
        help="the assistant: alias, GGUF file, folder or hub id (same tokenizer)",
    )
    group.add_argument(
        "--assist-trigger", default="\n\n", help="text that ends a paragraph (default: a blank line)"
    )
    group.add_argument(
        "--assist-lookahead",
        type=int,
        default=20,
        help="tokens the model writes after a break to look for keywords",
    )
    group.add_argument(
        "--assist-takeover", type=int, default=20, help="tokens the assistant writes per takeover"
    )
    group.add_argument(
        "--assist-verify-extension", type=int, default=125, help="more tokens when its text has a verify word"
    )
    group.add_argument(
        "--official-lookahead",
        action="store_true",
        help="drop a look-ahead without keywords and rewrite it, as the official code does (default: keep "
        "it)",
    )
    group.add_argument(
        "--assist-to-break",
        action="store_true",
        help="the assistant writes on to the end of its paragraph (ours; default: a fixed length, as the "
        "paper)",
    )
    for kind, words in (("verify", VERIFY_WORDS), ("negative", NEGATIVE_WORDS), ("positive", POSITIVE_WORDS)):
        group.add_argument(
            f"--assist-{kind}-words", default=",".join(words), help=f"comma-separated {kind} keywords"
        )
    group.add_argument(
        "--assist-recap-after",
        type=int,
        default=15,
        help="negative takeovers before the recap sentence (grows by 5 up to 30 each time)",
    )
    group.add_argument(
        "--assist-recap-tokens",
        type=int,
        default=125,
        help="tokens the assistant writes after the recap sentence (grows by 25 up to 200)",
    )


def assist_from_args(args: argparse.Namespace, lm: Any) -> tuple[Any, Any]:
    """(the assistant model, the AssistConfig) of the assist flags; (None, None) without --assistant-model."""
    if not getattr(args, "assistant_model", None):
        return None, None
    from lynx_exit.engine.assist import AssistConfig
    from lynx_exit.models import load_model

    def words(text: str) -> tuple[str, ...]:
        return tuple(w.strip() for w in text.split(",") if w.strip())

    config = AssistConfig(
        lookahead=args.assist_lookahead,
        takeover=args.assist_takeover,
        verify_extension=args.assist_verify_extension,
        keep_lookahead=not args.official_lookahead,
        trigger=args.assist_trigger.encode().decode("unicode_escape"),
        to_break=args.assist_to_break,
        verify_words=words(args.assist_verify_words),
        negative_words=words(args.assist_negative_words),
        positive_words=words(args.assist_positive_words),
        recap_after=args.assist_recap_after,
        recap_after_max=max(30, args.assist_recap_after),
        recap_tokens=args.assist_recap_tokens,
        recap_tokens_max=max(200, args.assist_recap_tokens),
    )
    assistant = load_model(args.assistant_model, dtype=args.dtype, device=args.device)
    return assistant, config


def compile_cache() -> Path:
    """Where torch keeps compiled graphs across runs (a second start loads them instead of compiling):
    `$TORCHINDUCTOR_CACHE_DIR` if set, else `lynx-exit/torch-compile` in the user's cache folder (torch's own
    default is under /tmp, which a reboot empties). Sets the variable for this process."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base) / "lynx-exit" / "torch-compile")
    return Path(folder)


def engine_config(args: argparse.Namespace) -> Any:
    """The `EngineConfig` of the engine flags (it names a bad value)."""
    from lynx_exit.engine import EngineConfig

    if args.compile != "off":
        compile_cache()

    batch = getattr(args, "max_batch_size", None)
    return EngineConfig(
        kv_cache_gb=args.kv_cache_gb,
        prefill_tokens_per_step=args.prefill_tokens_per_step,
        compile={"on": True, "off": False}.get(args.compile, "auto"),
        **({"max_batch_size": batch} if batch is not None else {}),
    )


def model_source(args: argparse.Namespace) -> Any:
    """The `ModelSource` of the model and profile flags."""
    from lynx_exit.models import ModelSource
    from lynx_exit.models.profile import ProfileOverrides, parse_template_kwargs

    overrides = ProfileOverrides(
        family=args.family,
        think_start=args.think_start,
        think_end=args.think_end,
        exit_close=args.exit_close,
        template_kwargs=parse_template_kwargs(args.chat_template_kwargs),
        system_prompt=args.system_prompt,
    )
    return ModelSource(args.model, dtype=args.dtype, device=args.device, overrides=overrides)


def load_model_from_args(args: argparse.Namespace) -> Any:
    """`load_model` with the model and profile flags."""
    return model_source(args).load()


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray (pip install 'lynx-exit[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray workers: 'local' (a Ray instance started here), 'auto' (the running cluster), "
        "a cluster address; bare --ray: the running cluster if any, else a local instance",
    )
    group.add_argument(
        "--workers", type=int, default=2, help="Ray workers, each loads the model once (default 2)"
    )
    group.add_argument(
        "--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0"
    )
    group.add_argument(
        "--cpus-per-worker",
        type=int,
        default=None,
        help="CPUs (and torch threads) per worker; default: this machine's cores / workers",
    )


def ray_options(args: argparse.Namespace) -> Any:
    """The `RayOptions` of the Ray flags, or None without --ray."""
    if args.ray is None:
        return None
    from lynx_exit.scale import RayOptions

    return RayOptions(
        address=args.ray or None,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
    )


def locate_probe_arg(args: argparse.Namespace) -> str | None:
    """The folder of `--probe` (a Hub repo id is fetched, or read from the Hub cache), found before the model
    loads."""
    if args.probe is None:
        return None
    from lynx_exit.probe.sharing import locate_probe

    return str(locate_probe(args.probe))


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--exit-cue",
        default="boxed",
        help=f"exit cue: {', '.join(sorted(EXIT_CUE_PHRASES))} (in the family's format) or literal text",
    )
    parser.add_argument("--answer-max-tokens", type=int, default=64)
    parser.add_argument("--cue-words", default=",".join(DEFAULT_CUE_WORDS), help="comma-separated cue words")
    parser.add_argument("--cue-regex", default=None, help="a regex cue instead of words, e.g. '\\n\\n'")


def generation_config(args: argparse.Namespace) -> Any:
    from lynx_exit.engine import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        exit_cue=args.exit_cue,
        answer_max_tokens=args.answer_max_tokens,
        cue_words=tuple(w for w in args.cue_words.split(",") if w.strip()) or DEFAULT_CUE_WORDS,
        cue_regex=args.cue_regex,
    )


def parse_layers(args: argparse.Namespace) -> tuple[int, ...] | None:
    if not args.layers:
        return None
    try:
        return tuple(int(x) for x in args.layers.split(","))
    except ValueError as exc:
        raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from exc


def task_problems(args: argparse.Namespace) -> list[Any]:
    """The problems a command reads: --task, --split, --data, --offset, --num-problems."""
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


def add_task_flags(parser: argparse.ArgumentParser, task: str, split: str, num_problems: int) -> None:
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
