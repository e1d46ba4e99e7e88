"""`lynx-exit serve` against hostile clients: one bad request fails only itself.

Every wait is bounded; servers bind 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import BOUND_S, cli_server, make_tiny_lm, serving

from lynx_exit.engine import DecodeLoop, Engine, GenerationConfig, StoreBackend
from lynx_exit.serve import Server, ServerOptions

MODEL = "tiny-test"
DEFAULTS = GenerationConfig(max_new_tokens=40, temperature=1.0, top_p=1.0, cue_regex="e", answer_max_tokens=6)
VICTIMS = [("Tom has 3 apples", 11), ("Hi there", 12), ("What is 3+4?", 13), ("Let x be", 14)]
VICTIM_TOKENS = 150
POISON = [7, 8, 9, 10, 11]  # token ids whose prefill the test backend fails, as out-of-memory would


class PoisonedPrefill(StoreBackend):
    def prefill(self, request_ids, prompts):
        if any(list(p) == POISON for p in prompts):
            raise torch.OutOfMemoryError("CUDA out of memory (poisoned prompt)")
        return super().prefill(request_ids, prompts)


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(seed=3)


@pytest.fixture(scope="module")
def probe_dir(lm, tmp_path_factory):
    from test_serve import write_probe

    folder = tmp_path_factory.mktemp("probe")
    write_probe(folder, lm)
    return folder


def options(probe_dir, **changes):
    base = dict(
        model_name=MODEL,
        defaults=DEFAULTS,
        exit_defaults=(("delta", "0.2"), ("mode", "event")),
        max_batch_size=8,
        max_queue=32,
        max_n=4,
        max_tokens_limit=200,
        probe=str(probe_dir),
        max_body_bytes=64 * 1024,
    )
    return ServerOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def server(lm, probe_dir):
    return Server(
        lm,
        options(probe_dir),
        engine_factory=lambda: Engine(lm, max_batch_size=8, backend=PoisonedPrefill(lm)),
    )


@pytest.fixture(scope="module")
def url(server):
    with serving(server) as base:
        yield base


def offline_text(lm, prompt, seed, **changes):
    config = GenerationConfig(**{**DEFAULTS.__dict__, **changes})
    ids = list(lm.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else prompt
    return DecodeLoop(lm, [ids], config, seeds=[seed]).run()[0].text


def stream_text(base, body, started=None):
    """(status, concatenated text, the last JSON event) of a streamed completion."""
    text, last = [], None
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=BOUND_S) as r:
        if r.status_code != 200:
            return r.status_code, "", json.loads(r.read())
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            last = json.loads(line.removeprefix("data: "))
            if "choices" in last and last["choices"]:
                text.append(last["choices"][0].get("text", ""))
            if started is not None:
                started.set()
    return 200, "".join(text), last


@contextlib.contextmanager
def victims_running(base):
    """Stream the victims while the body runs; yields a list that holds their results once the block ends."""
    started = [threading.Event() for _ in VICTIMS]
    pool = ThreadPoolExecutor(len(VICTIMS))
    futures = [
        pool.submit(
            stream_text,
            base,
            {
                "model": MODEL,
                "prompt": p,
                "max_tokens": VICTIM_TOKENS,
                "min_tokens": VICTIM_TOKENS,
                "seed": s,
            },
            started[i],
        )
        for i, (p, s) in enumerate(VICTIMS)
    ]
    for event in started:
        assert event.wait(BOUND_S), "a victim never started"
    results: list = []
    try:
        yield results
    finally:
        results += [f.result(BOUND_S) for f in futures]
        pool.shutdown()


def assert_victims_untouched(lm, results):
    for (prompt, seed), (status, text, last) in zip(VICTIMS, results, strict=True):
        assert status == 200 and last["choices"][0]["finish_reason"] == "length", last
        assert text == offline_text(
            lm, prompt, seed, max_new_tokens=VICTIM_TOKENS, min_new_tokens=VICTIM_TOKENS
        )


def post(base, path, body, **kwargs):
    return httpx.post(base + path, json=body, timeout=BOUND_S, **kwargs)


def metric(base, name, **labels):
    text = httpx.get(base + "/metrics", timeout=BOUND_S).text
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# -- sampling values that once broke the shared step ------------------------------------
def test_hostile_sampling_values_run_alone_and_victims_keep_their_tokens(url, lm):
    with victims_running(url) as results:
        for top_k in (2**63, 10**30):
            r = post(
                url,
                "/v1/completions",
                {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "seed": 3, "top_k": top_k},
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == offline_text(lm, "Hi", 3, max_new_tokens=8, top_k=0)
        r = post(
            url, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": 1e-30}
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == offline_text(lm, "Hi", 0, max_new_tokens=8, temperature=0.0)
    assert_victims_untouched(lm, results)


def test_a_request_that_fails_in_the_engine_fails_alone(url, lm):
    """The containment behind validation: a prompt whose prefill fails (here by a test backend, as
    out-of-memory would) is answered 500 engine_error while the requests sharing its steps finish as if it had
    never come."""
    with victims_running(url) as results:
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": POISON, "max_tokens": 8})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "out of memory" in r.json()["error"]["message"]
        status, _, last = stream_text(url, {"model": MODEL, "prompt": POISON, "max_tokens": 8})
        assert (
            status == 200 and last["error"]["code"] == "engine_error"
        )  # in a stream: an error event, then [DONE]
    assert_victims_untouched(lm, results)
    assert httpx.get(url + "/health", timeout=BOUND_S).json()["status"] == "ok"


# -- every exit option parsed, typed and bounded -----------------------------------------------
@pytest.mark.parametrize(
    ("exit_body", "param"),
    [
        ({"method": "dynasor", "interval": 32, "window": [3]}, "exit.window"),
        ({"method": "dynasor", "interval": 32, "window": 1e20}, "exit.window"),
        ({"method": "dynasor", "interval": 32, "window": 2.9}, "exit.window"),
        ({"method": "dynasor", "interval": "32:99999999999999999999"}, "exit.interval"),
        ({"method": "eat", "variance": 0.1, "every": [1]}, "exit.every"),
        ({"method": "answer-convergence", "agree": 10**30}, "exit.agree"),
        ({"method": "lynx", "delta": 0.2, "mode": {"x": 1}}, "exit.mode"),
    ],
)
def test_bad_exit_options_are_a_400_naming_the_option(url, exit_body, param):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "exit": exit_body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_the_parsed_option_is_what_the_response_reports(url):
    for window in (3, "3"):
        body = {
            "model": MODEL,
            "prompt": "Hi",
            "max_tokens": 4,
            "exit": {"method": "dynasor", "interval": 32, "window": window},
        }
        r = post(url, "/v1/completions", body)
        assert r.status_code == 200 and r.json()["choices"][0]["exit"]["settings"] == {
            "interval": 32,
            "window": 3,
        }


# -- the work one request can cause before validation is bounded --------------------------------
def test_a_body_over_the_limit_is_413_before_it_is_read(url):
    big = {"model": MODEL, "prompt": "x" * (200 * 1024)}
    r = post(url, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-test", "prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(
        url + "/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=BOUND_S,
    )
    assert r.status_code == 413


def test_text_that_cannot_fit_is_refused_before_the_template_reads_it(url, lm, server, monkeypatch):
    calls = []
    monkeypatch.setattr(lm, "chat_text", lambda *a, **k: calls.append(a) or "x")
    text = "word " * (512 * server.max_chars_per_position // 5 + 1)
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "messages" and not calls
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": text})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_templating_runs_off_the_event_loop(url, lm, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    original = lm.chat_text

    def slow_chat_text(*args, **kwargs):
        entered.set()
        release.wait(BOUND_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(lm, "chat_text", slow_chat_text)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            post,
            url,
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        assert entered.wait(BOUND_S)
        health = httpx.get(url + "/health", timeout=BOUND_S)  # answered while the template is still busy
        assert health.status_code == 200 and not release.is_set()
        release.set()
        assert pending.result(BOUND_S).status_code == 200


# -- strict types ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "8"),
        ("max_tokens", True),
        ("temperature", "0.5"),
        ("seed", "1"),
        ("stream", "yes"),
        ("n", 1.0),
    ],
)
def test_no_type_coercion(url, field, value):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


# -- gauges after an engine rebuild ----------------------------------------------------------
class _DecodeFailsOnce(StoreBackend):
    failed = False

    def decode(self, request_ids, token_ids):
        if not _DecodeFailsOnce.failed and len(request_ids) >= 2:
            _DecodeFailsOnce.failed = True
            raise RuntimeError("device lost")
        return super().decode(request_ids, token_ids)


def test_gauges_describe_the_fresh_engine_after_a_rebuild(lm, probe_dir):
    server = Server(
        lm,
        options(probe_dir),
        engine_factory=lambda: Engine(lm, max_batch_size=8, backend=_DecodeFailsOnce(lm)),
    )
    with serving(server) as base, ThreadPoolExecutor(2) as pool:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 50, "min_tokens": 50}
        answers = [
            f.result(BOUND_S) for f in [pool.submit(post, base, "/v1/completions", body) for _ in range(2)]
        ]
        assert {a.status_code for a in answers} <= {200, 500} and 500 in {a.status_code for a in answers}
        assert metric(base, "lynx_exit_running") == 0 and metric(base, "lynx_exit_batch_occupancy") == 0
        assert post(base, "/v1/completions", {**body, "max_tokens": 3, "min_tokens": 0}).status_code == 200


# -- a client that leaves during its upload ----------------------------------------------------
def test_a_disconnect_during_the_upload_is_quiet(url, caplog):
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "lynx_exit")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        before = metric(url, "lynx_exit_requests_total", endpoint="completions", status="499")
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=BOUND_S) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 5000\r\n\r\n" + b'{"model": "tiny-test", "prompt": "' + b"z" * 100
                )
        deadline = time.monotonic() + BOUND_S
        while metric(url, "lynx_exit_requests_total", endpoint="completions", status="499") < before + 3:
            assert time.monotonic() < deadline, "the disconnects were never answered"
            time.sleep(0.05)
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# -- an unhandled error in a route ----------------------------------------------------------------
def test_an_unhandled_error_is_an_openai_500_counted_in_the_metrics(url, server, monkeypatch, caplog):
    def broken(_request):
        raise RuntimeError("bug in planning")

    monkeypatch.setattr(server, "plan", broken)
    before = metric(url, "lynx_exit_requests_total", endpoint="chat", status="500")
    with caplog.at_level(logging.ERROR, logger="lynx_exit"):
        r = post(
            url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        )
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "message": "internal error (RuntimeError); the request was not completed",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert metric(url, "lynx_exit_requests_total", endpoint="chat", status="500") == before + 1
    assert "bug in planning" in caplog.text and not [rec for rec in caplog.records if rec.exc_info]


# -- the param names the field the client sent -----------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param", "start"),
    [
        (
            "/v1/completions",
            {"model": MODEL, "prompt": ["Hi"] * 41},
            "prompt",
            "the request needs 41 rows (41 prompts",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
            "messages.0.content: Input should be a valid string or Input should be a valid array",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "Hi", "stop": 5},
            "stop",
            "stop: Input should be a valid string",
        ),
        ("/v1/completions", [1], None, "the body: Input should be an object"),
    ],
)
def test_errors_name_the_field_as_sent(url, path, body, param, start):
    r = post(url, path, body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(start), r.text


# -- nothing open without the key; no paths -------------------------------------------------------
def test_documentation_is_off_with_a_key_and_no_path_is_shown(lm, probe_dir):
    server = Server(lm, options(probe_dir, api_key="sekret"))
    with serving(server) as base:
        for route in ("/docs", "/redoc", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer sekret"}):
                assert httpx.get(base + route, headers=headers, timeout=BOUND_S).status_code == 404, route
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sekret"}, timeout=BOUND_S)
    assert models.status_code == 200
    assert models.json()["data"][0]["exit"]["probe"]["name"] == probe_dir.name
    assert (
        str(probe_dir.parent) not in models.text and "path" not in models.json()["data"][0]["exit"]["probe"]
    )


def test_documentation_stays_without_a_key(url):
    assert httpx.get(url + "/openapi.json", timeout=BOUND_S).status_code == 200


# -- the shutdown timeout ends streams with an error event and [DONE] ------------------------------
def test_expired_streams_end_with_an_error_event_and_done(lm, probe_dir):
    server = Server(lm, options(probe_dir))
    with serving(server) as base:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "min_tokens": 200, "stream": True}
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=BOUND_S) as r:
            for line in r.iter_lines():
                if line and not lines:
                    server.worker.expire("the server shut down before this request finished")
                if line:
                    lines.append(line)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "shut down before" in error["message"]


def test_sigterm_past_the_shutdown_timeout_ends_the_stream_with_an_error(tmp_path):
    lm = make_tiny_lm(seed=5, dtype=torch.float32, context=4096)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    with cli_server(
        tmp_path / "model", "--temperature", "1.0", "--shutdown-timeout", "0.5", "--torch-threads", "1"
    ) as (proc, url):
        body = {
            "model": str(tmp_path / "model"),
            "prompt": "Hi",
            "max_tokens": 4000,
            "min_tokens": 4000,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=BOUND_S) as r:
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)
                if line:
                    lines.append(line)
        assert proc.wait(BOUND_S) in (0, -signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert len(lines) < 4000  # cut by the timeout, not finished


# -- warm-up: not ready until every batch size is compiled ------------------------------------------
class _SlowWarmUp(Engine):
    release = threading.Event()

    def warm_up(self) -> float:
        assert _SlowWarmUp.release.wait(BOUND_S)
        return 1.5


def test_health_says_warming_up_until_the_engine_is_warm(lm, probe_dir, caplog):
    server = Server(lm, options(probe_dir), engine_factory=lambda: _SlowWarmUp(lm, max_batch_size=4))
    with caplog.at_level(logging.INFO, logger="lynx_exit.serve.worker"), serving(server) as base:
        health = httpx.get(base + "/health", timeout=BOUND_S)
        assert health.status_code == 503 and health.json()["status"] == "warming_up"
        _SlowWarmUp.release.set()
        assert server.worker.ready.wait(BOUND_S)
        assert httpx.get(base + "/health", timeout=BOUND_S).json()["status"] == "ok"
    assert "warmed up every batch size up to 4 in 1.5 s" in caplog.text
