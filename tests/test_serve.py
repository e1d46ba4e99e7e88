"""`lynx-exit serve` through the real `openai` client, on a tiny model, on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import signal
import time

import httpx
import openai
import pytest
import torch
from conftest import BOUND_S, cli_server, make_tiny_lm, serving

from lynx_exit.engine import DecodeLoop, Engine, GenerationConfig, StoreBackend
from lynx_exit.exits import LynxPolicy, TokenBudget
from lynx_exit.probe import Probe, load_probe, save_probe, write_conformal
from lynx_exit.serve import Server, ServerOptions

MODEL = "tiny-test"
DEFAULTS = GenerationConfig(max_new_tokens=40, temperature=1.0, top_p=1.0, cue_regex="e", answer_max_tokens=6)


def write_probe(folder, lm):
    """A probe calibrated at two δ: 0.2 exits at every cue, 0.1 at none."""
    spec = lm.feature_spec()
    torch.manual_seed(0)
    save_probe(folder, Probe(spec.feature_dim).double(), spec, {"training_task": "toy"})
    always = {"delta": 0.2, "q_pos": 1.0, "q_neg": 0.0, "n_pos": 10, "n_neg": 10}
    never = {"delta": 0.1, "q_pos": 0.0, "q_neg": 1.0, "n_pos": 10, "n_neg": 10}
    write_conformal(folder, {"event": [always, never], "trajectory": [], "harm": []})


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(seed=3)


@pytest.fixture(scope="module")
def probe_dir(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    write_probe(folder, lm)
    return folder


@pytest.fixture(scope="module")
def base_url(lm, probe_dir):
    options = ServerOptions(
        model_name=MODEL,
        defaults=DEFAULTS,
        exit_defaults=(("delta", "0.2"), ("mode", "event")),
        max_batch_size=4,
        max_queue=8,
        max_n=4,
        max_tokens_limit=200,
        probe=str(probe_dir),
    )
    with serving(Server(lm, options)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=BOUND_S, max_retries=0)


def offline(lm, prompt_ids, seed, policy=None, **changes):
    config = GenerationConfig(**{**DEFAULTS.__dict__, **changes})
    return DecodeLoop(lm, [prompt_ids], config, policies=[policy], seeds=[seed]).run()[0]


def chat_ids(lm, text):
    return lm.prompt_ids(text)


def extra(choice, name):
    return (choice.model_extra or {})[name]


def test_chat_puts_thinking_in_reasoning_content_and_the_forced_answer_in_content(client, lm):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 3+4?"}],
        max_tokens=30,
        seed=5,
        extra_body={"min_tokens": 30, "exit": {"method": "token-budget", "budget": 6}},
    )
    want = offline(lm, chat_ids(lm, "What is 3+4?"), 5, TokenBudget(6), max_new_tokens=30, min_new_tokens=30)
    choice = response.choices[0]
    reasoning = extra(choice.message, "reasoning_content")
    assert choice.message.content.startswith("Final Answer: \\boxed{")
    assert want.text == reasoning + "</think> " + choice.message.content
    assert extra(choice, "exit") == {
        "exited": True,
        "token_index": 5,
        "cue": None,
        "point": None,
        "gave_up": False,
        "score": None,
        "method": "token-budget",
        "settings": {"budget": 6},
        "reasoning_tokens": 6,
    }
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens == len(want.token_ids)
    assert response.usage.prompt_tokens == len(chat_ids(lm, "What is 3+4?"))
    assert response.usage.completion_tokens_details.reasoning_tokens == want.reasoning_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_equals_the_full_response(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=25,
        seed=9,
        extra_body={"min_tokens": 25, "exit": {"method": "token-budget", "budget": 8}},
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == extra(full.choices[0].message, "reasoning_content")
    assert content == full.choices[0].message.content
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].finish_reason == "stop" and extra(finals[0], "exit")["exited"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completion_returns_the_raw_text_streamed_or_not(client, base_url, lm):
    response = client.completions.create(model=MODEL, prompt="Tom has 3 apples", max_tokens=20, seed=3)
    want = offline(lm, list(lm.tokenizer("Tom has 3 apples")["input_ids"]), 3, max_new_tokens=20)
    assert response.choices[0].text == want.text
    assert response.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert response.usage.completion_tokens == len(want.token_ids)
    with httpx.stream(
        "POST",
        base_url + "/v1/completions",
        timeout=BOUND_S,
        json={"model": MODEL, "prompt": "Tom has 3 apples", "max_tokens": 20, "seed": 3, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text


def test_per_request_delta_moves_the_exit(client, lm, probe_dir):
    bundle = load_probe(probe_dir)
    prompt = "A much longer prompt about twelve apples"
    exits = {}
    for delta in (0.2, 0.1):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=40,
            seed=21,
            extra_body={"min_tokens": 40, "exit": {"method": "lynx", "delta": delta}},
        )
        exits[delta] = extra(response.choices[0], "exit")
        want = offline(
            lm,
            chat_ids(lm, prompt),
            21,
            LynxPolicy(bundle=bundle, delta=delta),
            max_new_tokens=40,
            min_new_tokens=40,
        )
        assert exits[delta]["token_index"] == want.exit_index
        assert exits[delta]["settings"] == {"delta": delta, "mode": "event"}
    assert exits[0.2]["exited"] and exits[0.2]["cue"] == "e" and 0 < exits[0.2]["score"] < 1
    assert not exits[0.1]["exited"] and exits[0.1]["token_index"] is None


def test_n_choices_are_the_engine_rows_with_consecutive_seeds(client, lm):
    response = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=12, n=3, seed=40)
    ids = list(lm.tokenizer("Hi there")["input_ids"])
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == [offline(lm, ids, 40 + i, max_new_tokens=12).text for i in range(3)]
    assert len(set(texts)) > 1
    assert response.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_choice_before_it(client, lm, stream):
    ids = list(lm.tokenizer("Tom has")["input_ids"])
    full = offline(lm, ids, 8, max_new_tokens=40, min_new_tokens=40).text
    stop = full[10:12]
    assert stop and len(full) > 12
    kwargs = dict(
        model=MODEL,
        prompt="Tom has",
        max_tokens=40,
        seed=8,
        stop=[stop, "\u2603never"],
        extra_body={"min_tokens": 40},
    )
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        response = client.completions.create(**kwargs)
        text, reason = response.choices[0].text, response.choices[0].finish_reason
    assert text == full[: full.find(stop)] and reason == "stop"


def _long_prompt(lm):
    return " ".join(["apples"] * 600)


BAD_REQUESTS = [
    # (endpoint, body changes, status, param, text the message must contain)
    ("chat", {"model": "gpt-9"}, 404, "model", "gpt-9"),
    ("chat", {"exit": {"method": "lynx", "delta": 1.5}}, 400, "exit.delta", "1.5"),
    ("chat", {"exit": {"method": "lynx", "delta": 0.3}}, 400, "exit.delta", "[0.2, 0.1]"),
    (
        "chat",
        {"exit": {"method": "lynx", "delta": 0.2, "decision_points": "cue,answer"}},
        400,
        "exit.decision_points",
        "never saw answer",
    ),
    (
        "chat",
        {"exit": {"method": "lynx", "delta": 0.2, "decision_points": ["cue", "hunch"]}},
        400,
        "exit.decision_points",
        "'hunch'",
    ),
    (
        "chat",
        {"exit": {"method": "lynx", "delta": 0.2, "give_up_delta": 2}},
        400,
        "exit.give_up_delta",
        "(0, 1)",
    ),
    (
        "chat",
        {"exit": {"method": "lynx", "delta": 0.2, "give_up_delta": 0.05}},
        400,
        "exit.give_up_delta",
        "give-up",
    ),
    ("chat", {"exit": {"method": "lynx", "mode": "sometimes"}}, 400, "exit.mode", "sometimes"),
    ("chat", {"exit": {"method": "telepathy"}}, 400, "exit.method", "telepathy"),
    ("chat", {"exit": {"method": "token-budget", "delta": 0.1, "budget": 3}}, 400, "exit.delta", "delta"),
    ("chat", {"n": 5}, 400, "n", "5"),
    ("chat", {"max_tokens": 300}, 400, "max_tokens", "300"),
    ("chat", {"temperature": -1}, 400, "temperature", "-1"),
    ("chat", {"bogus": 1}, 400, "bogus", "bogus"),
    ("chat", {"messages": []}, 400, "messages", "[]"),
    ("chat", {"frequency_penalty": 0.5}, 400, "frequency_penalty", "0.5"),
    ("chat", {"stop": [""]}, 400, "stop", "''"),
    ("completions", {"prompt": [10**6]}, 400, "prompt", "1000000"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "a\ud800"}]},
        400,
        None,
        "hex escape",
    ),  # refused by the JSON parser
    ("completions", {"prompt": "b\udfff"}, 400, None, "surrogate"),
]


@pytest.mark.parametrize(("endpoint", "changes", "status", "param", "needle"), BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_naming_field_and_value(
    base_url, endpoint, changes, status, param, needle
):
    body = {"model": MODEL, "max_tokens": 5}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if endpoint == "chat" else {"prompt": "Hi"})
    body.update(changes)
    r = httpx.post(
        f"{base_url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
        timeout=BOUND_S,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )  # ASCII escapes: lone surrogates travel
    error = r.json()["error"]
    assert r.status_code == status, error
    assert error["param"] == param and needle in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_invalid_json_and_a_prompt_longer_than_the_context(base_url, client, lm):
    r = httpx.post(
        base_url + "/v1/chat/completions",
        content=b'{"model": "tiny-test", "messages": [',
        timeout=BOUND_S,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": _long_prompt(lm)}], max_tokens=5
        )
    assert caught.value.code == "context_length_exceeded" and "512" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])


def _metric(base_url, name, labels=""):
    for line in httpx.get(base_url + "/metrics", timeout=BOUND_S).text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_idle(base_url):
    deadline = time.monotonic() + BOUND_S
    while True:
        health = httpx.get(base_url + "/health", timeout=BOUND_S).json()
        if health["in_flight"] == 0 and health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.01)


def test_client_disconnect_mid_stream_aborts_and_frees_the_row(base_url, client):
    _wait_idle(base_url)
    aborted = _metric(base_url, "lynx_exit_choices_total", 'finish_reason="abort"')
    generated = _metric(base_url, "lynx_exit_generated_tokens_total")
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 190, "min_tokens": 190, "stream": True, "seed": 1}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=BOUND_S) as r:
        seen = 0
        for line in r.iter_lines():
            seen += bool(line)
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    health = _wait_idle(base_url)
    assert health["status"] == "ok"
    assert _metric(base_url, "lynx_exit_choices_total", 'finish_reason="abort"') == aborted + 1
    assert _metric(base_url, "lynx_exit_generated_tokens_total") - generated < 190
    response = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=4
    )  # the freed row serves the next one
    assert response.choices[0].finish_reason in ("length", "stop")


class SlowBackend(StoreBackend):
    """Sleeps at each decode so that requests stay in flight while a test looks at them."""

    def decode(self, request_ids, token_ids):
        time.sleep(0.01)
        return super().decode(request_ids, token_ids)


@pytest.fixture(scope="module")
def small_server(lm):
    options = ServerOptions(
        model_name=MODEL, defaults=DEFAULTS, max_batch_size=1, max_queue=1, api_key="sekret"
    )
    server = Server(lm, options, engine_factory=lambda: Engine(lm, max_batch_size=1, backend=SlowBackend(lm)))
    with serving(server) as url:
        yield url


def test_api_key_is_required(small_server):
    denied = openai.OpenAI(base_url=small_server + "/v1", api_key="wrong", max_retries=0, timeout=BOUND_S)
    with pytest.raises(openai.AuthenticationError):
        denied.models.list()
    r = httpx.post(small_server + "/v1/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=BOUND_S)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    allowed = openai.OpenAI(base_url=small_server + "/v1", api_key="sekret", max_retries=0, timeout=BOUND_S)
    assert [m.id for m in allowed.models.list().data] == [MODEL]
    assert (
        httpx.get(small_server + "/health", timeout=BOUND_S).json()["status"] == "ok"
    )  # health needs no key


def test_a_full_queue_answers_503_at_once(small_server):
    headers = {"Authorization": "Bearer sekret"}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 150, "min_tokens": 150, "stream": True}
    with contextlib.ExitStack() as stack:
        for _ in range(2):  # one running, one waiting: the server is full
            r = stack.enter_context(
                httpx.stream(
                    "POST", small_server + "/v1/completions", json=body, headers=headers, timeout=BOUND_S
                )
            )
            assert r.status_code == 200
        started = time.monotonic()
        full = httpx.post(
            small_server + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=BOUND_S
        )
        assert full.status_code == 503 and full.json()["error"]["code"] == "server_overloaded"
        assert time.monotonic() - started < BOUND_S
    _wait_idle(small_server)


def test_sigterm_lets_in_flight_requests_finish_then_exits(tmp_path):
    lm = make_tiny_lm(seed=5, dtype=torch.float32)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    with cli_server(tmp_path / "model", "--temperature", "1.0") as (proc, url):
        body = {
            "model": str(tmp_path / "model"),
            "prompt": "Hi",
            "max_tokens": 400,
            "min_tokens": 400,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=BOUND_S) as r:
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # in flight: it must still finish
                lines.append(line)
        assert proc.wait(BOUND_S) in (
            0,
            -signal.SIGTERM,
        )  # uvicorn re-raises the signal after a graceful stop
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


def _stream_chunks(base_url, body):
    with httpx.stream("POST", base_url + "/v1/chat/completions", timeout=BOUND_S, json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("delta", [0.1, 0.2])
def test_a_stream_can_carry_each_decision_point_and_is_unchanged_without_the_flag(
    base_url, lm, probe_dir, delta
):
    """With stream_options.lynx_decision_points each cue arrives with its score and threshold where it passes,
    and the last chunk says what the exit saved; without the flag the same request streams the same text and
    no extra field."""
    prompt = "A much longer prompt about twelve apples"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 40,
        "seed": 21,
        "stream": True,
        "min_tokens": 40,
        "exit": {"method": "lynx", "delta": delta},
    }
    _wait_idle(base_url)
    at_cues = _metric(base_url, "lynx_exit_exit_points_total", 'give_up="false",point="cue"')
    plain = _stream_chunks(base_url, body)
    marked = _stream_chunks(base_url, {**body, "stream_options": {"lynx_decision_points": True}})
    _wait_idle(base_url)
    assert _metric(base_url, "lynx_exit_exit_points_total", 'give_up="false",point="cue"') == at_cues + 2 * (
        delta == 0.2
    )
    assert not any("lynx_points" in c["choices"][0] for c in plain if c["choices"])

    def text(chunks, key):
        return "".join(c["choices"][0].get("delta", {}).get(key) or "" for c in chunks if c["choices"])

    for key in ("reasoning_content", "content"):
        assert text(plain, key) == text(marked, key)
    finals = [c["choices"][0] for c in marked if c["choices"] and c["choices"][0].get("finish_reason")]
    plain_final = [c["choices"][0] for c in plain if c["choices"] and c["choices"][0].get("finish_reason")][0]
    saved = finals[0]["exit"].pop("tokens_saved_vs_max_tokens")
    assert finals[0] == plain_final and "tokens_saved_vs_max_tokens" not in plain_final["exit"]
    points = [p for c in marked if c["choices"] for p in c["choices"][0].get("lynx_points", [])]
    want = offline(
        lm,
        chat_ids(lm, prompt),
        21,
        LynxPolicy(bundle=load_probe(probe_dir), delta=delta),
        max_new_tokens=40,
        min_new_tokens=40,
    )
    reasoning = text(marked, "reasoning_content")
    assert points and all(p["point"] == "cue" and 0 < p["score"] < 1 for p in points)
    assert all(0 < p["chars"] <= len(reasoning) for p in points)
    if delta == 0.2:  # exits at the first cue (threshold 0): the one point, marked as the exit
        assert [(p["index"], p["exit"], p["threshold"]) for p in points] == [(want.exit_index, True, 0.0)]
        assert saved == 40 - len(want.token_ids) > 0
    else:  # never exits (the threshold is P(safe) > 1): every cue passes
        assert [p["index"] for p in points] == want.cue_indices and not any(p["exit"] for p in points)
        assert all(p["threshold"] == 1.0 and p["give_up_below"] is None for p in points) and saved == 0
