"""Flags and their mapping onto library config, shared by every `lynx-exit` subcommand module."""

from __future__ import annotations

import argparse
from typing import Any

from lynx_exit.cues import DEFAULT_CUE_WORDS
from lynx_exit.models import EXIT_CUE_VARIANTS

DEFAULT_MODEL = "reference"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias (reference, smollm2), GGUF file, folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default=None, help="comma-separated hidden-state layers (default: ¼,½,¾ depth + last)")


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exit-cue", default="boxed", choices=sorted(EXIT_CUE_VARIANTS))
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
