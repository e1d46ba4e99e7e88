"""Hostile clients against `lynx-exit serve`: one bad request must fail only itself.

Starts the server as a subprocess on 127.0.0.1 (reference model, shipped probe). A quiet run first
records what 8 seeded victim streams generate alone. Then, `--repeats` times, the victims stream
again (round after round) while at least `--hostile` hostile requests arrive: the issue-21 families
(D1 huge top_k, D2 malformed exit options, D4 wrongly typed fields, D5 tiny temperatures), issue 32's (N1
template switches and 5,000-message chats, N3 800,000-prompt completions, N6 fields named like type tags, N7
the developer role), 10 MB bodies (D3: 10 MB with and without a Content-Length, 3.9 MB under the limit) and
randomly mutated or random bodies (seeded). Measured: every hostile status, 5xx count, victims failed and
whether each victim round's tokens equal the quiet run's, /health latency sampled every 20 ms while the 10 MB
bodies arrive, and the server's RSS before and after. All traffic stays on loopback; every loop is bounded in
count and time.

Usage: python benchmarks/serve_faults.py [--hostile 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from _common import write_result
from serve_load import free_port, percentile, start_server

from lynx_exit.reference import as_task_problems, make_problems

ROOT = Path(__file__).resolve().parent
VICTIMS = 8
VICTIM_TOKENS = 300
TIMEOUT_S = 120.0
BIG_BODY_BYTES = 10 * 2**20
BIG_BODIES = 12


def victim_body(prompt: str, seed: int) -> dict[str, Any]:
    return {
        "model": "reference",
        "messages": [{"role": "user", "content": prompt}],
        "seed": seed,
        "stream": True,
        "max_tokens": VICTIM_TOKENS,
        "stream_options": {"include_usage": True},
        "exit": {"method": "never"},
    }


async def stream_victim(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    reasoning, content, tokens, error = [], [], None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"status {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line.removeprefix("data: "))
                error = event.get("error") or error
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    reasoning.append(delta.get("reasoning_content") or "")
                    content.append(delta.get("content") or "")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if error is not None or tokens is None:
        return {"ok": False, "error": str(error or "no usage")}
    return {"ok": True, "text": "".join(reasoning) + "\x00" + "".join(content), "tokens": tokens}


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, 10**30, -(10**30), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, 2.9, 1e-38, 1e-300, 1e20, 1e308, -0.0, math.nan, math.inf])
    if kind in (4, 5):
        return "".join(rng.choice('ab9:. \u2603\ud7ff"\\{') for _ in range(rng.randrange(0, 12)))
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        rng.choice(["a", "method", "window", "x", ""]): random_json(rng, depth + 1)
        for _ in range(rng.randrange(0, 4))
    }


FIELDS = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_tokens",
    "seed",
    "n",
    "stream",
    "stop",
    "exit",
    "logprobs",
    "stream_options",
    "messages",
    "model",
    "chat_template_kwargs",
    "user",
    "unknown",
]


def hostile_request(rng: random.Random, prompt: str) -> tuple[str, bytes, str]:
    """(family, body bytes, path) of one hostile request."""
    base: dict[str, Any] = {
        "model": "reference",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": rng.randrange(1, 9),
    }
    family = rng.choice(["D1", "D2", "D4", "D5", "N1", "N6", "N7", "fuzz", "fuzz", "fuzz", "root"])
    if (
        family == "N1"
    ):  # template switches: special tokens, the template's own parameters, unknown ones; many messages
        base["chat_template_kwargs"] = rng.choice(
            [
                {"eos_token": "x" * 2000},
                {"bos_token": "y" * 100_000},
                {"add_generation_prompt": False},
                {"enable_thinking": "yes"},
                {"foo": 1},
            ]
        )
        if rng.random() < 0.05:
            base["messages"] = [{"role": "assistant", "content": ""}] * 5000 + base["messages"]
    elif family == "N6":  # unknown fields with names that look like type tags
        base[rng.choice(["Foo", "str", "a[0]", "list[int]"])] = 1
    elif family == "N7":
        base["messages"] = [{"role": "developer", "content": "Be brief."}, *base["messages"]]
    elif family == "D1":
        base["top_k"] = rng.choice([2**63, 10**30, 2**64 + 5])
    elif family == "D2":
        base["exit"] = rng.choice(
            [
                {"method": "dynasor", "interval": 32, "window": [3]},
                {"method": "dynasor", "interval": 32, "window": 1e20},
                {"method": "dynasor", "interval": "32:99999999999999999999"},
                {"method": "eat", "variance": 0.1, "every": [1]},
                {"method": "answer-convergence", "agree": 10**30},
                {"method": "dynasor", "interval": 32, "window": 2.9},
                {"method": "lynx", "delta": 0.05, "mode": ["harm"]},
                {"method": "token-budget", "budget": 10**40},
            ]
        )
    elif family == "D4":
        field, value = rng.choice(
            [
                ("max_tokens", "8"),
                ("max_tokens", True),
                ("temperature", "0.5"),
                ("seed", "1"),
                ("stream", "yes"),
                ("n", 1.0),
            ]
        )
        base[field] = value
    elif family == "D5":
        base["temperature"] = rng.choice([1e-38, 1e-30, 5e-6, 1e-45])
    elif family == "fuzz":
        for field in rng.sample(FIELDS, rng.randrange(1, 4)):
            base[field] = random_json(rng)
    else:
        raw = rng.choice(
            [
                json.dumps(random_json(rng)).encode(),
                b"{",
                b"",
                b"\xff\xfe",
                b"[" * 5000,
                b'{"model": ' + b"9" * 5000 + b"}",
            ]
        )
        return family, raw, rng.choice(["/v1/chat/completions", "/v1/completions"])
    if base.get("stream") is True:
        base["stream"] = False  # the hostile side reads whole answers; victims are the streams
    return family, json.dumps(base).encode(), "/v1/chat/completions"


async def send_hostile(
    client: httpx.AsyncClient,
    url: str,
    rng: random.Random,
    prompts: list[str],
    count: int,
    concurrency: int = 16,
) -> list[dict[str, Any]]:
    requests = [hostile_request(rng, rng.choice(prompts)) for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)

    async def one(family: str, raw: bytes, path: str) -> dict[str, Any]:
        async with gate:
            try:
                r = await client.post(
                    url + path, content=raw, headers={"content-type": "application/json"}, timeout=TIMEOUT_S
                )
            except httpx.HTTPError as exc:
                return {"family": family, "status": None, "error": f"{type(exc).__name__}"}
            return {"family": family, "status": r.status_code}

    huge = json.dumps(
        {"model": "reference", "prompt": ["a"] * 800_000}
    ).encode()  # N3: 3.9 MB, under the body limit
    requests += [("N3", huge, "/v1/completions")] * max(1, count // 200)
    return await asyncio.gather(*(one(*request) for request in requests))


def large_body(size: int) -> bytes:
    return json.dumps(
        {"model": "reference", "messages": [{"role": "user", "content": "x " * (size // 2)}]}
    ).encode()


async def big_bodies(client: httpx.AsyncClient, url: str) -> tuple[list[int | None], list[float]]:
    """Post large bodies (three at a time) while /health is sampled every 20 ms; statuses and health
    latencies.

    They cycle through three kinds: 10 MB with a Content-Length (refused before it is read), 10 MB sent
    chunked without one (read until the 4 MiB limit, then refused) and 3.9 MB under the limit (parsed and
    refused by the length pre-check off the event loop)."""
    big, under = large_body(BIG_BODY_BYTES), large_body(int(3.9 * 2**20))

    async def chunked():
        for start in range(0, len(big), 2**16):
            yield big[start : start + 2**16]

    latencies: list[float] = []
    done = asyncio.Event()

    async def probe_health() -> None:
        for _ in range(10_000):
            if done.is_set():
                return
            started = time.perf_counter()
            await client.get(url + "/health", timeout=TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)

    gate = asyncio.Semaphore(3)

    async def post(i: int) -> int | None:
        content: Any = (big, chunked(), under)[i % 3]
        async with gate:
            try:
                r = await client.post(
                    url + "/v1/chat/completions",
                    content=content,
                    headers={"content-type": "application/json"},
                    timeout=TIMEOUT_S,
                )
                return r.status_code
            except httpx.HTTPError:
                return None  # the server may close the connection once it has answered 413

    prober = asyncio.ensure_future(probe_health())
    statuses = await asyncio.gather(*(post(i) for i in range(BIG_BODIES)))
    done.set()
    await prober
    return list(statuses), latencies


async def repeat(
    url: str, prompts: list[str], quiet: list[dict[str, Any]], hostile: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    async with httpx.AsyncClient(limits=limits) as client:
        stop = asyncio.Event()
        rounds: list[list[dict[str, Any]]] = []

        async def victims_loop() -> None:
            for _ in range(1000):
                round_ = await asyncio.gather(
                    *(stream_victim(client, url, victim_body(prompts[i], 1000 + i)) for i in range(VICTIMS))
                )
                rounds.append(list(round_))
                if stop.is_set():
                    return

        victims = asyncio.ensure_future(victims_loop())
        await asyncio.sleep(0.5)  # the victims are in the batch before the first hostile request
        started = time.perf_counter()
        results = await send_hostile(client, url, rng, prompts, hostile)
        big_statuses, health = await big_bodies(client, url)
        hostile_wall = time.perf_counter() - started
        stop.set()
        await victims
    outcomes = [v for round_ in rounds for v in round_]
    identical = [
        v["ok"] and v["text"] == q["text"] and v["tokens"] == q["tokens"]
        for round_ in rounds
        for v, q in zip(round_, quiet, strict=True)
    ]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    families: dict[str, dict[str, int]] = {}
    for r in results:
        row = families.setdefault(r["family"], {})
        row[str(r["status"])] = row.get(str(r["status"]), 0) + 1
    return {
        "hostile_requests": len(results) + len(big_statuses),
        "hostile_by_status": dict(sorted(statuses.items())),
        "hostile_by_family": dict(sorted(families.items())),
        "big_bodies_by_status": {str(s): big_statuses.count(s) for s in sorted(set(big_statuses), key=str)},
        "responses_5xx": sum(1 for r in results if r["status"] is not None and r["status"] >= 500)
        + sum(1 for s in big_statuses if s is not None and s >= 500),
        "connection_errors": sum(1 for r in results if r["status"] is None),
        "hostile_wall_s": round(hostile_wall, 2),
        "victim_rounds": len(rounds),
        "victim_streams": len(outcomes),
        "victims_failed": sum(1 for v in outcomes if not v["ok"]),
        "victims_identical_to_quiet": sum(identical),
        "health_samples_during_large_bodies": len(health),
        "health_p50_s": percentile(health, 50),
        "health_p99_s": percentile(health, 99),
        "health_max_s": round(max(health), 4) if health else None,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def quiet_run(url: str, prompts: list[str]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        return list(
            await asyncio.gather(
                *(stream_victim(client, url, victim_body(prompts[i], 1000 + i)) for i in range(VICTIMS))
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--hostile", type=int, default=1000, help="hostile requests per repeat (besides the 10 MB bodies)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompts = [p.prompt for p in as_task_problems(make_problems("test", 64), "test")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, max_batch=16, max_queue=64, threads=1)
    try:
        quiet = asyncio.run(quiet_run(url, prompts))
        if not all(v["ok"] for v in quiet):
            raise RuntimeError(f"the quiet run failed: {quiet}")
        rss_before = rss_mb(proc.pid)
        repeats = [
            asyncio.run(repeat(url, prompts, quiet, args.hostile, seed)) for seed in range(args.repeats)
        ]
        health_after = httpx.get(url + "/health", timeout=10).json()
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    summary = {
        "hostile_requests": sum(r["hostile_requests"] for r in repeats),
        "responses_5xx": sum(r["responses_5xx"] for r in repeats),
        "victims_failed": sum(r["victims_failed"] for r in repeats),
        "victim_streams": sum(r["victim_streams"] for r in repeats),
        "victims_identical_to_quiet": sum(r["victims_identical_to_quiet"] for r in repeats),
        "health_p99_s_worst": max(r["health_p99_s"] or 0 for r in repeats),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "health_after": health_after,
    }
    targets = {
        "victims_failed == 0": summary["victims_failed"] == 0,
        "victims identical to the quiet run": summary["victims_identical_to_quiet"]
        == summary["victim_streams"],
        "5xx == 0": summary["responses_5xx"] == 0,
        "/health p99 < 0.5 s during large bodies": summary["health_p99_s_worst"] < 0.5,
        "RSS within 50 MB of before": abs(summary["rss_growth_mb"]) <= 50,
        ">= 1000 hostile requests per repeat": all(r["hostile_requests"] >= 1000 for r in repeats),
    }
    write_result(
        "serve_faults",
        {
            "setup": {
                "model": "reference",
                "probe": "benchmarks/results/probe_reference",
                "max_batch_size": 16,
                "max_queue": 64,
                "server_torch_threads": 1,
                "victims": VICTIMS,
                "victim_max_tokens": VICTIM_TOKENS,
                "hostile_per_repeat": args.hostile,
                "big_bodies_per_repeat": BIG_BODIES,
                "big_body_bytes": [BIG_BODY_BYTES, "chunked " + str(BIG_BODY_BYTES), int(3.9 * 2**20)],
                "repeats": args.repeats,
            },
            "summary": summary,
            "targets": targets,
            "repeats": repeats,
            "health_p50_s_median": statistics.median(r["health_p50_s"] or 0 for r in repeats),
        },
    )


if __name__ == "__main__":
    main()
