"""`lynx-exit` command line: thin wrappers that map flags 1:1 onto library config and print results.

One module per group of commands (`generate`, `pipeline`, `probe`, `evaluation`, `serve`); the flags they
share live in `common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lynx_exit.artifacts import FolderBusyError
from lynx_exit.cli import generate, pipeline, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lynx-exit", description="Confidence-controlled early exit for reasoning LLMs (LYNX)."
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_commands(sub)
    pipeline.add_commands(sub)
    serve.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FolderBusyError) as exc:
        print(f"lynx-exit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
