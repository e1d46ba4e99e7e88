"""Property-based fuzzing of the API (hypothesis): random and mutated bodies against a live loopback server
while victim streams run. No input may be answered with a 5xx, the victims get the tokens they get alone,
and /health keeps answering. Bounded in examples and time; derandomized so CI sees the same bodies."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import BOUND_S, make_tiny_lm, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits import knobs, method_names
from lynx_exit.serve import Server, ServerOptions

MODEL = "tiny-test"
DEFAULTS = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, cue_regex="e", answer_max_tokens=4)
VICTIMS = [("Tom has 3 apples", 21), ("Hi there", 22), ("Let x be", 23)]
VICTIM_TOKENS = 60
MAX_EXAMPLES = 75
TIME_LIMIT_S = 75.0

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
edge_numbers = st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**30, 1e-38, 1e-30, 1e20, 0.5, 2.9])


def bodies(hostile: bool):
    """Chat and completions bodies: with `hostile`, any field may hold any JSON; without, every field holds a
    value of its own type, often at an edge (huge top_k and seeds, tiny temperatures, odd exit settings)."""

    def value(good):
        return (
            st.one_of(good, edge_numbers, json_values)
            if hostile
            else st.one_of(good, good, good, edge_numbers)
        )

    working_exits = st.sampled_from(
        [
            {"method": "never"},
            {"method": "token-budget", "budget": 3},
            {"method": "dynasor", "interval": "4:2"},
            {"method": "dynasor", "interval": 4, "window": 2**31},
            {"method": "eat", "variance": 0.1, "every": 2},
            {"method": "answer-convergence", "agree": 2},
            {"method": "deer", "threshold": 0.5},
            {"method": "first-answer"},
            {"method": "nowait"},
            {"method": "token-budget", "budget": 10**30},
        ]
    )
    exit_objects = (
        working_exits
        if not hostile
        else st.fixed_dictionaries(
            {
                "method": st.sampled_from(method_names())
                if not hostile
                else st.one_of(st.sampled_from(method_names()), json_values)
            },
            optional={
                name: value(st.sampled_from(["0.2", "32", "32:3", "3", 0.1, 3]))
                for name in [k.name for k in knobs()] + ["window", "every", "mode"]
            },
        )
    )
    sampling = {
        "max_tokens": value(st.integers(4, 12)),
        "temperature": value(st.floats(0, 2)),
        "top_p": value(st.floats(0.01, 1)),
        "top_k": value(st.integers(0, 2**70)),
        "min_tokens": value(st.integers(0, 4)),
        "seed": value(st.integers(-(2**63), 2**64 - 1)),
        "n": value(st.integers(1, 4)),
        "stream": value(st.booleans()),
        "stop": value(st.lists(st.text(min_size=1, max_size=3), max_size=4)),
        "exit": exit_objects,
    }
    if hostile:
        sampling |= {
            "logprobs": json_values,
            "stream_options": json_values,
            "frequency_penalty": json_values,
            "user": json_values,
            "unknown_field": json_values,
            "exit": st.one_of(exit_objects, json_values),
        }
    any_json = json_values if hostile else st.nothing()
    # Template switches: the family's own, special-token names, the template's own parameters, anything
    template_kwargs = st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    "enable_thinking",
                    "reasoning_effort",
                    "eos_token",
                    "bos_token",
                    "add_generation_prompt",
                    "messages",
                    "tools",
                ]
            ),
            st.text(max_size=8),
        ),
        st.one_of(
            st.booleans(),
            st.sampled_from(["low", "high"]),
            st.text(max_size=2000),
            st.integers(),
            json_values,
        ),
        max_size=3,
    )
    roles = st.one_of(
        st.sampled_from(["user", "system", "developer", "assistant"]),
        st.sampled_from(["tool", "function", "User", ""]) if hostile else st.nothing(),
    )
    prompt_lists = st.one_of(
        st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=120),
        st.lists(st.lists(st.integers(0, 310), min_size=1, max_size=4), min_size=1, max_size=120),
    )
    chat = st.fixed_dictionaries(
        {
            "model": st.one_of(st.just(MODEL), any_json),
            "messages": st.one_of(
                st.just([{"role": "user", "content": "Hi"}]),
                st.lists(
                    st.fixed_dictionaries({"role": value(roles), "content": value(st.text(max_size=30))}),
                    min_size=0 if hostile else 1,
                    max_size=3,
                ),
                st.lists(
                    st.fixed_dictionaries({"role": roles, "content": st.just("")}), min_size=1, max_size=600
                ),
                any_json,
            ),
        },
        optional={
            **sampling,
            "max_completion_tokens": value(st.integers(1, 8)),
            "chat_template_kwargs": st.one_of(template_kwargs, json_values) if hostile else template_kwargs,
        },
    )
    completion = st.fixed_dictionaries(
        {
            "model": st.one_of(st.just(MODEL), any_json),
            "prompt": st.one_of(
                st.text(min_size=0 if hostile else 1, max_size=30),
                st.lists(st.integers(-5 if hostile else 0, 310), min_size=1, max_size=6),
                st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
                prompt_lists,
                any_json,
            ),
        },
        optional={
            **sampling,
            **({"echo": json_values, "best_of": json_values, "suffix": json_values} if hostile else {}),
        },
    )
    return st.one_of(
        st.tuples(st.just("/v1/chat/completions"), chat), st.tuples(st.just("/v1/completions"), completion)
    )


requests = st.one_of(
    bodies(hostile=False),
    bodies(hostile=True),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), json_values),
)


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(seed=4)


@pytest.fixture(scope="module")
def url(lm):
    options = ServerOptions(
        model_name=MODEL,
        defaults=DEFAULTS,
        max_batch_size=8,
        max_queue=32,
        max_n=4,
        max_tokens_limit=100,
        max_body_bytes=16 * 1024,
    )
    with serving(Server(lm, options)) as base:
        yield base


class Victims:
    """Victim streams run over and over on threads until `stop`; every run is checked against its expected
    text."""

    def __init__(self, base, lm) -> None:
        self.base, self.stopping, self.bad, self.runs = base, threading.Event(), [], 0
        self.expected = {}
        for prompt, seed in VICTIMS:
            config = GenerationConfig(
                **{**DEFAULTS.__dict__, "max_new_tokens": VICTIM_TOKENS, "min_new_tokens": VICTIM_TOKENS}
            )
            ids = list(lm.tokenizer(prompt)["input_ids"])
            self.expected[prompt] = DecodeLoop(lm, [ids], config, seeds=[seed]).run()[0].text
        self.threads = [threading.Thread(target=self._loop, args=v, daemon=True) for v in VICTIMS]

    def _loop(self, prompt, seed) -> None:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": VICTIM_TOKENS,
            "min_tokens": VICTIM_TOKENS,
            "seed": seed,
            "stream": True,
        }
        for _ in range(10_000):
            if self.stopping.is_set():
                return
            text = []
            with httpx.stream("POST", self.base + "/v1/completions", json=body, timeout=BOUND_S) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line.removeprefix("data: "))
                        text += [c.get("text", "") for c in event.get("choices", [])]
                        if "error" in event:
                            self.bad.append(event)
            if r.status_code != 200 or "".join(text) != self.expected[prompt]:
                self.bad.append((prompt, r.status_code, "".join(text)))
            self.runs += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(BOUND_S)


def test_no_body_gets_a_5xx_and_victims_are_untouched(url, lm):
    started = time.monotonic()
    slowest_health = 0.0
    answered = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests)
    def fuzz(request):
        nonlocal slowest_health
        if time.monotonic() - started > TIME_LIMIT_S:
            return
        path, body = request
        raw = json.dumps(body)  # NaN and Infinity go out as JSON5-style tokens: hostile too
        r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=BOUND_S)
        assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            for line in r.text.splitlines():
                if line.startswith("data: {"):
                    error = json.loads(line.removeprefix("data: ")).get("error")
                    assert error is None or error["type"] != "server_error", (raw[:300], error)
        else:
            assert "error" in r.json() or r.status_code == 200
        answered.append(r.status_code)
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=BOUND_S).status_code == 200
        slowest_health = max(slowest_health, time.monotonic() - t0)

    with Victims(url, lm) as victims:
        fuzz()
    assert not victims.bad, victims.bad[:3]
    assert victims.runs >= len(VICTIMS)
    assert len(answered) >= 50 and 200 in answered and 400 in answered
    assert (
        slowest_health < 5.0
    )  # a liveness bound, not a speed claim: the event loop was never blocked for long
