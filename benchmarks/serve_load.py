"""Load on `lynx-exit serve` vs the same prompts through the engine offline, plus a fault pass.

Starts the server as a subprocess on 127.0.0.1 with the reference model and the shipped probe,
sends N chat requests with `AsyncOpenAI` (streaming, usage included) at each concurrency for
full chain of thought and LYNX, then runs the same prompts, seeds and exit settings through an
`Engine` in this process at batch 8 and 32 (the server is idle meanwhile). Every request has its
own seed, so served and offline rollouts must have the same token counts: the script checks it.
Offline runs at torch's default thread count and at the server's (`serve` leaves one core to the
HTTP side on CPU), so the ratios separate the cost of HTTP from the cost of the smaller pool.

Fault pass: a fifth of the streaming clients disconnect mid-stream and a burst goes past the
queue limit; everything not disconnected must complete or get a clean 503, and /health must be
fine afterwards. All traffic stays on loopback; every loop is bounded in count and time.

Usage: python benchmarks/serve_load.py [--requests 200] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import torch
from _common import write_result

from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.exits import MethodContext, make_policy
from lynx_exit.models import load_model
from lynx_exit.reference import as_task_problems, make_problems

ROOT = Path(__file__).resolve().parent
PROBE = ROOT / "results" / "probe_reference"
REQUEST_TIMEOUT_S = 300.0
MAX_NEW_TOKENS = 400
TEMPERATURE = 0.6
METHODS = {"never": {"method": "never"}, "lynx-harm@0.05": {"method": "lynx", "delta": 0.05, "mode": "harm"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, max_batch: int, max_queue: int, threads: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "lynx_exit.cli",
        "serve",
        "--model",
        "reference",
        "--probe",
        str(PROBE),
        "--torch-threads",
        str(threads),
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch),
        "--max-queue",
        str(max_queue),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--temperature",
        str(TEMPERATURE),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was up")
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not come up within 120 s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 4)


async def one_request(
    client: openai.AsyncOpenAI,
    prompt: str,
    seed: int,
    exit_settings: dict[str, Any],
    disconnect_after: int | None = None,
) -> dict[str, Any]:
    """One streamed chat request; outcome is completed, rejected (clean 503), disconnected, or lost."""
    started = time.perf_counter()
    first = None
    content, finish, usage, chunks = "", None, None, 0
    try:
        stream = await client.chat.completions.create(
            model="reference",
            messages=[{"role": "user", "content": prompt}],
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"exit": exit_settings},
        )
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                text = (delta.content or "") + ((delta.model_extra or {}).get("reasoning_content") or "")
                if text and first is None:
                    first = time.perf_counter() - started
                content += delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
                chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    await stream.close()
                    return {"outcome": "disconnected"}
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIStatusError as exc:
        clean = exc.status_code == 503 and isinstance(exc.body, dict) and "message" in exc.body
        return {"outcome": "rejected" if clean else "lost", "status": exc.status_code}
    except Exception as exc:  # a dropped connection, a timeout: no full response and no clean error
        return {"outcome": "lost", "error": f"{type(exc).__name__}: {exc}"}
    if finish is None or usage is None:
        return {"outcome": "lost", "error": "the stream ended without a finish reason or usage"}
    return {
        "outcome": "completed",
        "latency_s": time.perf_counter() - started,
        "ttft_s": first,
        "completion_tokens": usage.completion_tokens,
        "content": content,
    }


async def load_pass(
    url: str,
    prompts: list[str],
    concurrency: int,
    exit_settings: dict[str, Any],
    disconnect_every: int | None = None,
) -> tuple[list[dict[str, Any]], float]:
    client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i: int, prompt: str) -> dict[str, Any]:
        async with gate:
            cut = 3 + i % 20 if disconnect_every and i % disconnect_every == 0 else None
            return await one_request(client, prompt, i, exit_settings, cut)

    started, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(bounded(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - started
    await client.close()
    for r in results:
        r["client_cpu_share"] = (time.process_time() - cpu) / wall  # of one core, the load generator's own
    return list(results), wall


def summarise(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    done = [r for r in results if r["outcome"] == "completed"]
    latency = [r["latency_s"] for r in done]
    ttft = [r["ttft_s"] for r in done if r["ttft_s"] is not None]
    tokens = sum(r["completion_tokens"] for r in done)
    return {
        "completed": len(done),
        "failed": sum(r["outcome"] == "rejected" for r in results),
        "lost": sum(r["outcome"] == "lost" for r in results),
        "disconnected": sum(r["outcome"] == "disconnected" for r in results),
        "wall_s": round(wall, 2),
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "latency_p99_s": percentile(latency, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "ttft_p99_s": percentile(ttft, 99),
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall, 1),
        "client_cpu_share_of_one_core": round(results[0]["client_cpu_share"], 3) if results else None,
        "lost_examples": [r for r in results if r["outcome"] == "lost"][:3],
    }


def offline(lm: Any, prompts: list[str], batch: int, exit_settings: dict[str, Any]) -> dict[str, Any]:
    """The same prompts, seeds and exit settings through the engine in this process."""
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)
    context = MethodContext(lm=lm, probe=str(PROBE))
    options = {k: v for k, v in exit_settings.items() if k != "method"}
    engine = Engine(lm, max_batch_size=batch)
    started = time.perf_counter()
    ids = []
    for i, prompt in enumerate(prompts):
        policy = (
            None
            if exit_settings["method"] == "never"
            else make_policy(exit_settings["method"], context, **options)
        )
        ids.append(engine.add_request(lm.prompt_ids(prompt), config, policy, seed=i))
    for _ in engine.stream():
        pass
    wall = time.perf_counter() - started
    tokens = [len(engine.result(i).token_ids) for i in ids]
    return {
        "wall_s": round(wall, 2),
        "completion_tokens": sum(tokens),
        "completion_tokens_per_s": round(sum(tokens) / wall, 1),
        "tokens_per_request": tokens,
    }


def health(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        body = httpx.get(url + "/health", timeout=10).json()
        if body.get("in_flight") == 0 or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--offline-batches", default="8,32")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument(
        "--server-threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="the server's torch threads (serve's default: all cores but one)",
    )
    args = parser.parse_args()
    problems = as_task_problems(make_problems("test", args.requests), "test")
    prompts = [p.prompt for p in problems]
    levels = [int(c) for c in args.concurrency.split(",")]
    max_batch = max(levels)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, max_batch, args.max_queue, args.server_threads)
    served: list[dict[str, Any]] = []
    try:
        for label, settings in METHODS.items():
            for level in levels:
                results, wall = asyncio.run(load_pass(url, prompts, level, settings))
                row = {"method": label, "concurrency": level, **summarise(results, wall)}
                correct = [
                    problems[i].grade(r["content"])
                    for i, r in enumerate(results)
                    if r["outcome"] == "completed"
                ]
                row["accuracy"] = round(sum(correct) / max(1, len(correct)), 3)
                row["tokens_per_request"] = [r.get("completion_tokens") for r in results]
                served.append(row)
                print({k: v for k, v in row.items() if k != "tokens_per_request"}, flush=True)
        # Fault pass: a fifth of the clients disconnect mid-stream; then a burst far past the queue limit.
        fault_results, fault_wall = asyncio.run(
            load_pass(url, prompts, max_batch, METHODS["lynx-harm@0.05"], 5)
        )
        burst = min(len(prompts), 3 * (max_batch + args.max_queue))
        burst_results, burst_wall = asyncio.run(load_pass(url, prompts[:burst], burst, METHODS["never"]))
        after = health(url)
        fault = {
            "disconnect_pass": summarise(fault_results, fault_wall),
            "burst_pass": summarise(burst_results, burst_wall),
            "burst_size": burst,
            "capacity": max_batch + args.max_queue,
            "health_after": after,
        }
        print(fault, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    lm = load_model("reference")
    offline_rows = []
    all_threads = torch.get_num_threads()
    for threads in sorted({all_threads, args.server_threads}, reverse=True):
        torch.set_num_threads(threads)
        for label, settings in METHODS.items():
            for batch in [int(b) for b in args.offline_batches.split(",")]:
                row = {
                    "method": label,
                    "batch": batch,
                    "torch_threads": threads,
                    **offline(lm, prompts, batch, settings),
                }
                offline_rows.append(row)
                print({k: v for k, v in row.items() if k != "tokens_per_request"}, flush=True)
    torch.set_num_threads(all_threads)
    for row in served:
        row["torch_threads"] = args.server_threads
        for threads, key in (
            (all_threads, "served_vs_offline"),
            (args.server_threads, "served_vs_offline_same_threads"),
        ):
            same = [
                o
                for o in offline_rows
                if o["method"] == row["method"]
                and o["batch"] == row["concurrency"]
                and o["torch_threads"] == threads
            ]
            if same:
                row[key] = round(row["completion_tokens_per_s"] / same[0]["completion_tokens_per_s"], 3)
        twins = [
            o
            for o in offline_rows
            if o["method"] == row["method"] and o["torch_threads"] == args.server_threads
        ]
        row["same_tokens_as_offline"] = all(
            o["tokens_per_request"] == row["tokens_per_request"] for o in twins
        )
    for row in served + offline_rows:
        row.pop("tokens_per_request")
    at_max = [r for r in served if r["concurrency"] == max_batch and "served_vs_offline" in r]
    write_result(
        "serve_load",
        {
            "model": "reference",
            "probe": str(PROBE.relative_to(ROOT.parent)),
            "requests": args.requests,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
            "cpus": os.cpu_count(),
            "targets": "lost = 0 everywhere; served tokens/s at concurrency 32 >= 0.8x offline at batch 32",
            "served": served,
            "offline": offline_rows,
            "fault": fault,
            "lost_total": sum(r["lost"] for r in served)
            + fault["disconnect_pass"]["lost"]
            + fault["burst_pass"]["lost"],
            "offline_torch_threads": all_threads,
            "server_torch_threads": args.server_threads,
            "min_served_vs_offline_at_max_concurrency": min(
                (r["served_vs_offline"] for r in at_max), default=None
            ),
            "min_served_vs_offline_same_threads_at_max_concurrency": min(
                (r["served_vs_offline_same_threads"] for r in at_max), default=None
            ),
            "mean_served_vs_offline": round(
                statistics.mean(r["served_vs_offline"] for r in served if "served_vs_offline" in r), 3
            ),
        },
    )


if __name__ == "__main__":
    main()
