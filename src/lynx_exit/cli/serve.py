"""`lynx-exit serve`: flags onto `ServerOptions`, then uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from lynx_exit.exits import knobs
    from lynx_exit.serve import Server, ServerOptions, run

    method = args.exit or ("lynx" if args.probe else "never")  # argparse has checked --exit
    defaults = {k.name: getattr(args, k.flag.lstrip("-").replace("-", "_")) for k in knobs()}
    defaults["mode"] = args.mode
    options = ServerOptions(
        model_name=args.served_model_name or args.model,
        defaults=generation_config(args),
        exit_method=method,
        exit_defaults=tuple(sorted((k, v) for k, v in defaults.items() if v is not None)),
        max_batch_size=args.max_batch_size,
        engine=engine_config(args),
        max_queue=args.max_queue,
        max_n=args.max_n,
        max_tokens_limit=args.max_tokens_limit,
        api_key=args.api_key or os.environ.get("LYNX_EXIT_API_KEY") or None,
        probe=locate_probe_arg(args),
        deepconf=args.deepconf,
        max_body_bytes=round(args.max_body_mb * 2**20),
        probe_label=None
        if args.probe is None or Path(args.probe).exists()
        else args.probe,  # a Hub id; a folder by its name
        shutdown_timeout_s=args.shutdown_timeout,
        stream_interval_ms=args.stream_interval_ms,
        max_chunk_rate=args.max_chunk_rate,
        ui=not args.no_ui,
    )
    if args.device == "cpu":
        # Leave a core to the HTTP side: with every core in torch's pool, the event loop (and clients on the
        # same machine) stall its threads at each step (compare benchmarks/serve_load.py --server-threads).
        torch.set_num_threads(args.torch_threads or max(1, (os.cpu_count() or 1) - 1))
    lm = load_model_from_args(args)
    assistant, assist = assist_from_args(args, lm)
    server = Server(lm, options, assistant=assistant, assist=assist)
    print(
        f"lynx-exit serve: {options.model_name!r} on http://{args.host}:{args.port}/v1 (exit method "
        f"{method})",
        flush=True,
    )
    run(server, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from lynx_exit.exits import knobs, method_names

    p = sub.add_parser("serve", help="OpenAI-compatible server with per-request early exit")
    add_model_flags(p)
    add_engine_flags(p)
    add_assist_flags(p)
    add_sampling_flags(p)  # the defaults of requests that leave a field out (--max-new-tokens: max_tokens)
    p.add_argument(
        "--deepconf",
        default=None,
        help="warm-up folder for the deepconf method (from lynx-exit deepconf-warmup)",
    )
    p.add_argument(
        "--probe",
        default=None,
        help="probe for the LYNX methods: a folder, or a Hub repo id OWNER/NAME[@REVISION]",
    )
    p.add_argument(
        "--exit",
        default=None,
        choices=method_names(),
        help="default exit method of requests without exit.method (default: lynx with --probe, else never)",
    )
    for knob in knobs():
        p.add_argument(knob.flag, default=knob.default, help=f"default {knob.help}")
    p.add_argument(
        "--mode", default="event", choices=["event", "trajectory", "harm"], help="default LYNX mode"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="the `model` requests must name (default: --model)"
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 503"
    )
    p.add_argument("--max-n", type=int, default=8, help="largest `n` a request may ask for")
    p.add_argument(
        "--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: the context length)"
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LYNX_EXIT_API_KEY)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get after SIGTERM; then each ends with a 503 error event",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=4.0, help="largest request body in MiB; larger ones get 413"
    )
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        default=20.0,
        help="send a stream's tokens at most this often (0: every token); the first token goes at once",
    )
    p.add_argument(
        "--max-chunk-rate",
        type=float,
        default=500.0,
        help="stream chunks per second over all streams; under load each stream's chunks get larger",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads on CPU (default: all cores but one, which is left to the HTTP side)",
    )
    p.add_argument("--no-ui", action="store_true", help="no playground page at / (the API only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
