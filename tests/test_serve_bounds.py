"""`lynx-exit serve`: bounded work before a request is accepted, exact errors and
labels.

Each test reproduces a defect seen against 5aada8b (N1-N7); every wait is bounded and the server binds
127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import BOUND_S, cli_server, make_tiny_lm, serving
from test_serve_faults import metric, post

from lynx_exit.engine import GenerationConfig
from lynx_exit.serve import Server, ServerOptions

MODEL = "tiny-test"
DEFAULTS = GenerationConfig(max_new_tokens=40, temperature=1.0, top_p=1.0, answer_max_tokens=6)


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(seed=4)


@pytest.fixture(scope="module")
def url(lm):
    with serving(Server(lm, ServerOptions(model_name=MODEL, defaults=DEFAULTS))) as base:  # a 4 MB body limit
        yield base


@pytest.fixture(scope="module")
def cli(lm, tmp_path_factory):
    """`lynx-exit serve` in a process of its own (its heap and its garbage collector are the server's alone):
    (pid, base URL, model name)."""
    folder = tmp_path_factory.mktemp("model")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    with cli_server(folder) as (proc, base):
        yield proc.pid, base, str(folder)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@contextmanager
def watched(base: str, pid: int) -> Iterator[dict[str, float]]:
    """Poll /health every 10 ms while the block runs: the slowest answer and the server's resident memory
    growth."""
    seen = {"slowest_s": 0.0, "grew_mb": 0.0, "polls": 0}
    before, done = _rss_mb(pid), threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=BOUND_S) as client:
            client.get(base + "/health")  # the connection is made before the measuring starts
            while not done.is_set():
                start = time.perf_counter()
                assert client.get(base + "/health").status_code == 200
                seen["slowest_s"] = max(seen["slowest_s"], time.perf_counter() - start)
                seen["grew_mb"] = max(seen["grew_mb"], _rss_mb(pid) - before)
                seen["polls"] += 1
                time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    time.sleep(0.05)
    try:
        yield seen
    finally:
        done.set()
        thread.join(BOUND_S)
        seen["grew_mb"] = max(seen["grew_mb"], _rss_mb(pid) - before)


def timed_post(base: str, path: str, body: dict | bytes) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    if isinstance(body, bytes):  # encoded beforehand: the client's own JSON encoding is not what is measured
        response = httpx.post(
            base + path, content=body, headers={"content-type": "application/json"}, timeout=BOUND_S
        )
    else:
        response = post(base, path, body)
    return response, time.perf_counter() - start


# -- chat_template_kwargs -----------------------------------------------------------------------
def test_a_huge_template_render_is_refused_at_once(cli):
    """5,000 empty assistant messages with a 2,000-character eos_token rendered a 10 MB prompt in 14-23 s."""
    pid, url, model = cli
    messages = [{"role": "assistant", "content": ""}] * 5000 + [{"role": "user", "content": "hi"}]
    body = json.dumps(
        {"model": model, "messages": messages, "chat_template_kwargs": {"eos_token": "x" * 2000}}
    ).encode()
    with watched(url, pid) as seen:
        r, took = timed_post(url, "/v1/chat/completions", body)
    assert r.status_code == 400 and took < 1.0, (r.status_code, took)
    assert seen["polls"] >= 3 and seen["slowest_s"] < 0.2 and seen["grew_mb"] < 100, seen


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"eos_token": "x" * 2000}, "chat_template_kwargs.eos_token", "special tokens"),
        ({"bos_token": "y" * 100_000}, "chat_template_kwargs.bos_token", "special tokens"),
        ({"enable_thinking": False}, "chat_template_kwargs.enable_thinking", "takes no switches"),
        (
            {"add_generation_prompt": False},
            "chat_template_kwargs.add_generation_prompt",
            "the server sets it",
        ),
    ],
)
def test_template_kwargs_take_only_the_families_switches(url, kwargs, param, says):
    r = post(
        url,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert says in r.json()["error"]["message"]


def test_a_declared_switch_takes_its_values_only():
    from lynx_exit.models.families import Family
    from lynx_exit.models.profile import _switches

    qwen3 = Family(
        "q",
        "q",
        "q",
        lambda f: True,
        "<think>",
        "</think>",
        "</think>",
        switches=(("enable_thinking", (True, False)),),
    )
    assert _switches(qwen3, {}) == (("enable_thinking", (True, False)),)
    assert _switches(qwen3, {"reasoning_effort": "high"}) == (
        ("enable_thinking", (True, False)),
        ("reasoning_effort", ("high",)),
    )
    from lynx_exit.serve.planning import _allowed

    assert (
        _allowed(False, (True, False))
        and not _allowed(0, (True, False))
        and not _allowed("low", (True, False))
    )


def test_messages_past_the_context_are_refused_before_the_template(url, lm):
    messages = [{"role": "user", "content": "x"}] * (lm.context_length + 1)
    r, took = timed_post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and took < 1.0


# -- completions with a huge prompt list ---------------------------------------------------------
def test_a_huge_prompt_list_is_refused_before_any_prompt_is_tokenized(cli):
    """838,460 one-character prompts (4 MB) were each tokenized before the row count was checked: 34.5 s."""
    pid, url, model = cli
    body = json.dumps({"model": model, "prompt": ["a"] * 838_460}).encode()  # 4 MB
    with watched(url, pid) as seen:
        r, took = timed_post(url, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and took < 1.0, (
        r.text[:300],
        took,
    )
    assert seen["polls"] >= 3 and seen["slowest_s"] < 0.2 and seen["grew_mb"] < 100, seen


def test_more_prompts_than_rows_are_refused_before_tokenizing(url, lm, monkeypatch):
    calls = []
    original = lm.tokenizer.__call__
    monkeypatch.setattr(
        type(lm.tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(*a, **k)
    )
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 200})  # capacity: 16 + 64 rows
    assert r.status_code == 400 and "rows" in r.json()["error"]["message"] and not calls


# -- a client that times out before a non-streaming answer --------------------------------------
def test_a_client_gone_before_its_answer_is_no_server_error(url):
    errors_before = metric(url, "lynx_exit_requests_total", endpoint="completions", status="500")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 400, "min_tokens": 400},
            timeout=0.3,
        )
    deadline = time.monotonic() + BOUND_S
    while metric(url, "lynx_exit_requests_total", endpoint="completions", status="499") < 1:
        assert time.monotonic() < deadline, "the abandoned request was never counted"
        time.sleep(0.05)
    assert metric(url, "lynx_exit_requests_total", endpoint="completions", status="500") == errors_before


# -- a stop string is a stop ----------------------------------------------------------------------
def test_a_matched_stop_string_is_counted_as_stop(url):
    reasons = ("stop", "abort", "eos")
    before = {reason: metric(url, "lynx_exit_choices_total", finish_reason=reason) for reason in reasons}
    stopped = 0  # OpenAI's "stop": a stop string, or the end of sequence
    for seed in range(6):
        r = post(
            url,
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "Tom has",
                "max_tokens": 40,
                "seed": seed,
                "stop": ["e", "a", "o", " "],
            },
        )
        assert r.status_code == 200
        stopped += r.json()["choices"][0]["finish_reason"] == "stop"
    deadline = time.monotonic() + BOUND_S

    def grown(reason: str) -> float:
        return metric(url, "lynx_exit_choices_total", finish_reason=reason) - before[reason]

    while grown("stop") + grown("eos") + grown("abort") < stopped:  # counted as each choice ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert grown("stop") >= 1 and grown("abort") == 0 and grown("stop") + grown("eos") == stopped


# -- errors name the field at fault ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "Foo": 1}, "Foo"),
        ({"prompt": "hi", "str": 1}, "str"),
        ({"prompt": "hi", "a[0]": 1}, "a[0]"),
        ({"prompt": "hi", "exit": {"method": "speculative-thinking+lynx"}}, "exit.method"),
        ({"messages": [{"role": "user", "content": "hi", "foo": 1}]}, "messages.0.foo"),
    ],
)
def test_errors_name_the_field(url, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = post(url, path, {"model": MODEL, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# -- the developer role ---------------------------------------------------------------------------
def test_a_developer_message_is_a_system_message(url):
    def prompt_tokens(role: str) -> int:
        r = post(
            url,
            "/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens("developer") == prompt_tokens("system") != prompt_tokens("assistant")


# -- admission by the KV budget ---------------------------------------------------------------------
def test_requests_that_fit_the_kv_budget_wait_and_all_succeed(lm):
    from concurrent.futures import ThreadPoolExecutor

    from lynx_exit.engine import DecodeLoop, EngineConfig

    per_token = 3 * 2 * 3 * 12 * 8  # the tiny model's KV bytes per token (float64)
    prompt, max_tokens = "Tom has 3 apples", 60
    ids = list(lm.tokenizer(prompt)["input_ids"])
    largest = len(ids) + max_tokens + len(lm.exit_cue_ids()) + DEFAULTS.answer_max_tokens
    engine = EngineConfig(kv_cache_gb=int(2.5 * largest) * per_token / 2**30)
    server = Server(lm, ServerOptions(model_name=MODEL, defaults=DEFAULTS, engine=engine))
    with serving(server) as base, ThreadPoolExecutor(8) as pool:
        bodies = [
            {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "seed": seed} for seed in range(8)
        ]
        responses = list(pool.map(lambda body: post(base, "/v1/completions", body), bodies))
        too_big = post(base, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 3 * largest})
        preemptions = metric(base, "lynx_exit_preemptions_total")
    assert [r.status_code for r in responses] == [200] * 8, [
        r.text for r in responses if r.status_code != 200
    ]
    for seed, response in enumerate(responses):
        config = dataclasses.replace(DEFAULTS, max_new_tokens=max_tokens)
        assert (
            response.json()["choices"][0]["text"] == DecodeLoop(lm, [ids], config, seeds=[seed]).run()[0].text
        )
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "kv_cache_exceeded"
    assert preemptions > 0  # the youngest gave way while the others grew, and was recomputed
    assert f"holds {int(2.5 * largest)}" in too_big.json()["error"]["message"]
