"""The engine on CUDA (marker `gpu`; `python -m pytest -m gpu`): the paths that only a GPU takes, checked
against the model's own forward passes.

A tiny Qwen2 with grouped-query attention in float32, prompts of different lengths (decode steps with a mask,
the batch that crashed on an H200 at 5aada8b): eager, `--compile` (CUDA graphs) and `model.generate` give the
same tokens; requests that join and leave a running batch get the tokens they get alone; any sequence of cache
verbs leaves logits equal to a fresh forward; a LYNX exit matches its offline replay; Speculative Thinking
runs a tiny pair. `LYNX_TEST_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py` runs the same tests on a
CPU (a check of the tests themselves; the CPU suite covers these paths on its own)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from cache_verbs import exercise_cache_verbs
from conftest import CORPUS
from transformers import Qwen2Config, Qwen2ForCausalLM

from lynx_exit.engine import DecodeLoop, Engine, GenerationConfig, StoreBackend
from lynx_exit.engine.assist import AssistConfig
from lynx_exit.exits import LynxPolicy, first_exit
from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import resolve_profile
from lynx_exit.probe import Probe, load_probe, save_probe, write_conformal
from lynx_exit.reference.tokenizer import train_tokenizer

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("LYNX_TEST_DEVICE", "cuda")
TOLERANCE = 2e-4  # float32 logits of one forward against another (the kernels differ by batch shape)
TEXTS = [
    "Hi",
    "What is 3+4?",
    "Tom has 12 apples, eats 5. How many left? Think step by step and check.",
    "Wait",
    "Let x = 12 - 5 = 7, then 7 * 2 = 14. Alternatively count them: " * 3,
    "café naïve 你好 ok?",
]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def tiny_qwen(
    seed: int = 0, hidden: int = 48, layers: int = 3, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    tokenizer = train_tokenizer(CORPUS, vocab_size=311)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 6,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id="tiny-qwen2-gpu", profile=resolve_profile(model, tokenizer)
    )


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_qwen()


def _fresh(lm: LoadedModel, token_ids: list[int], no_eos: bool = False) -> torch.Tensor:
    with torch.inference_mode():
        logits = (
            lm.model(input_ids=torch.tensor([token_ids], device=lm.device), use_cache=False)
            .logits[0, -1]
            .float()
        )
        if no_eos:  # min_new_tokens bans end of sequence
            logits[sorted(lm.eos_token_ids)] = float("-inf")
        return logits


def _greedy_tokens(lm: LoadedModel, compile: bool) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    engine = Engine(lm, max_batch_size=4, backend=StoreBackend(lm, compile=compile))
    ids = [engine.add_request(lm.prompt_ids(t), config) for t in TEXTS]
    list(engine.stream())
    return [engine.result(i).token_ids for i in ids]


def test_eager_compiled_and_generate_give_the_same_tokens_on_mixed_lengths(lm):
    prompts = [lm.prompt_ids(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    eager = _greedy_tokens(lm, compile=False)
    compiled = _greedy_tokens(lm, compile=True)
    assert compiled == eager
    for prompt, tokens in zip(prompts, eager, strict=True):
        with torch.inference_mode():
            out = lm.model.generate(
                torch.tensor([prompt], device=lm.device),
                max_new_tokens=len(tokens),
                min_new_tokens=len(tokens),
                do_sample=False,
                pad_token_id=lm.pad_token_id,
            )
        assert out[0, len(prompt) :].tolist() == tokens
        for i, token in enumerate(tokens):  # and each one is the argmax of a fresh forward
            assert int(_fresh(lm, prompt + tokens[:i], no_eos=True).argmax()) == token


def test_requests_that_join_and_leave_get_their_tokens_alone(lm):
    configs = [
        GenerationConfig(max_new_tokens=n, min_new_tokens=n, temperature=0.0) for n in (5, 17, 9, 13, 3, 11)
    ]
    engine = Engine(lm, max_batch_size=3)
    ids = []
    for i, (text, config) in enumerate(zip(TEXTS, configs, strict=True)):
        ids.append(engine.add_request(lm.prompt_ids(text), config))
        for _ in range(i):
            engine.step()
    list(engine.stream())
    for request_id, text, config in zip(ids, TEXTS, configs, strict=True):
        alone = Engine(lm, max_batch_size=1)
        single = alone.add_request(lm.prompt_ids(text), config)
        list(alone.stream())
        assert engine.result(request_id).token_ids == alone.result(single).token_ids


def test_random_cache_verbs_equal_a_fresh_forward(lm):
    exercise_cache_verbs(
        StoreBackend(lm),
        lm.model.config.vocab_size,
        lambda tokens: _fresh(lm, tokens),
        TOLERANCE,
        seed=5,
        longest_prompt=40,
    )


def test_a_lynx_exit_matches_its_offline_replay(lm, tmp_path):
    config = GenerationConfig(
        max_new_tokens=30, min_new_tokens=30, temperature=1.0, seed=2, cue_regex="e", answer_max_tokens=4
    )
    spec = lm.feature_spec()
    prompts = [lm.prompt_ids(t) for t in TEXTS[:3]]
    recorded = [
        list(DecodeLoop(lm, [p], config, layers=spec.layers, seeds=[7 + i]).steps())
        for i, p in enumerate(prompts)
    ]
    torch.manual_seed(0)
    probe = Probe(spec.feature_dim)
    scores = sorted(
        float(probe.prob_safe(s.features[None].cpu())[0]) for steps in recorded for s in steps if s.cue
    )
    assert scores
    save_probe(tmp_path, probe, spec, {"training_task": "toy"})
    event = {"delta": 0.2, "q_pos": 1.0, "q_neg": scores[len(scores) // 2], "n_pos": 10, "n_neg": 10}
    write_conformal(tmp_path, {"event": [event], "trajectory": [], "harm": []})
    bundle = load_probe(tmp_path)
    bundle.probe.to(lm.device)
    engine = Engine(lm, max_batch_size=3)
    ids = [
        engine.add_request(p, config, policy=LynxPolicy(bundle=bundle, delta=0.2), seed=7 + i)
        for i, p in enumerate(prompts)
    ]
    list(engine.stream())
    results = [engine.result(i) for i in ids]
    offline = [first_exit(LynxPolicy(bundle=bundle, delta=0.2), steps) for steps in recorded]
    assert [r.exit_index for r in results] == offline
    exited = [r for r in results if r.exit_index is not None]
    assert exited
    cue_ids = lm.exit_cue_ids()
    for result in exited:  # the exit cue follows the kept prefix (the cue token dropped), then the answer
        kept = result.reasoning_tokens
        assert result.token_ids[kept : kept + len(cue_ids)] == cue_ids


def test_speculative_thinking_on_a_tiny_pair():
    thinker, assistant = tiny_qwen(seed=1), tiny_qwen(seed=2, hidden=72, layers=4)
    config = GenerationConfig(max_new_tokens=40, temperature=0.0)
    alone = Engine(thinker, max_batch_size=1)
    first = alone.add_request(thinker.prompt_ids(TEXTS[0]), config)
    list(alone.stream())
    # The trigger is the first piece of text the thinker writes, the keywords every word of the
    # look-ahead after it: greedy, so the first look-ahead hands over to the assistant on this device whatever
    # the random weights say.
    tokens = alone.result(first).token_ids
    decode = thinker.tokenizer.decode
    at = next(i for i, t in enumerate(tokens) if decode([t], skip_special_tokens=True).strip())
    trigger = decode([tokens[at]], skip_special_tokens=True).strip()
    words = tuple(
        dict.fromkeys(re.findall(r"\w+", decode(tokens[at + 1 : at + 5], skip_special_tokens=True)))
    )
    assert words, "the thinker's look-ahead holds no word to use as a keyword"
    assist = AssistConfig(lookahead=4, takeover=5, verify_extension=0, trigger=trigger, verify_words=words)
    engine = Engine(thinker, max_batch_size=2, assistant=assistant)
    ids = [engine.add_request(thinker.prompt_ids(t), config, assist=assist, hold=True) for t in TEXTS[:2]]
    list(engine.stream())
    assert engine.result(ids[0]).assist["assistant_tokens"] >= 1
    for request_id, text in zip(ids, TEXTS[:2], strict=True):
        result = engine.result(request_id)
        assert result.assist is not None
        tokens = thinker.prompt_ids(text) + result.token_ids
        held = engine.backend.length(
            request_id
        )  # the thinker's cache holds what was written, by either model
        assert len(tokens) - 1 <= held <= len(tokens)
        slot = engine.backend.rows[request_id]
        with torch.inference_mode():
            fresh = thinker.model(
                input_ids=torch.tensor([tokens[:held]], device=thinker.device), use_cache=True
            )
        cache = getattr(fresh, "cache", None) or fresh.past_key_values
        for layer in range(thinker.model.config.num_hidden_layers):
            torch.testing.assert_close(
                engine.backend.store.keys[layer][slot, :, :held],
                cache.layers[layer].keys[0],
                rtol=TOLERANCE,
                atol=TOLERANCE,
            )
