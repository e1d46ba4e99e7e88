"""Tiny seeded in-memory models: odd sizes, no downloads."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import resolve_profile
from lynx_exit.reference.tokenizer import train_tokenizer

CORPUS = [
    "Tom has 3 apples and buys 4 more. 3 + 4 = 7. Wait, let me check: 3 + 4 = 7. Hmm, yes.",
    "Alternatively we can count: 7 apples. Final Answer: \\boxed{7}",
    "She waited while waiting for the await keyword. Hmm. wait. Wait! alternatively, ok.",
    "Let x = 12 - 5 = 7, then 7 * 2 = 14. The answer is \\boxed{14}. café naïve 你好",
] * 4


def make_tiny_lm(
    seed: int = 0, dtype: torch.dtype = torch.float64, layers: int = 3, context: int = 512
) -> LoadedModel:
    tokenizer = train_tokenizer(CORPUS, vocab_size=311)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=36,
        intermediate_size=52,
        num_hidden_layers=layers,
        num_attention_heads=3,
        num_key_value_heads=3,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id="tiny-test", profile=resolve_profile(model, tokenizer)
    )


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return make_tiny_lm()


@pytest.fixture(scope="session")
def compiled_lm() -> LoadedModel:
    """One model for the tests that compile its decode step: a compile (tens of seconds here) is kept on the
    model, so they share it (the context is long enough for the compile-once test's widths)."""
    return make_tiny_lm(seed=5, context=8200)


BOUND_S = 60.0  # every wait of the server tests is bounded by this


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(server) -> Iterator[str]:
    """Run a `lynx_exit.serve.Server` with uvicorn on a background thread; yields its base URL."""
    # here, not at the top: the GPU check runs these tests where no server packages are installed
    import uvicorn

    from lynx_exit.serve import create_app

    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=free_port(), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND_S
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        uv.should_exit = True
        thread.join(BOUND_S)


@contextlib.contextmanager
def cli_server(model_dir, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`lynx-exit serve --model model_dir FLAGS` as a subprocess on a free loopback port, once /health
    answers; killed on the way out if it is still running."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lynx_exit.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *flags,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + BOUND_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()


def run_alone(lm, prompt, seed, config, policy=None):
    """The result of one request on an engine of its own (batch 1): what batching must not change."""
    from lynx_exit.engine import Engine

    engine = Engine(lm, max_batch_size=1)
    request_id = engine.add_request(prompt, config, policy=policy, seed=seed)
    list(engine.stream())
    return engine.result(request_id)
