"""Fault isolation in the engine: bad settings are refused before they join a batch, and a request
that still fails inside a step fails alone while the others finish as if it had never been there."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import run_alone

from lynx_exit.engine import DecodeLoop, Engine, GenerationConfig, StoreBackend
from lynx_exit.engine.sampler import SamplingParams
from lynx_exit.exits import BasePolicy, Decision, MethodContext, get_method, make_policy, parse_methods

CONFIG = GenerationConfig(
    max_new_tokens=20, min_new_tokens=20, temperature=0.9, top_p=0.9, cue_regex="e", answer_max_tokens=4
)
TEXTS = ["What is 3+4?", "Hi", "A longer prompt about twelve apples and five pears.", "Tom?"]


def alone(lm, prompt, seed, config=CONFIG):
    return run_alone(lm, prompt, seed, config)


def run_all(engine):
    steps = list(engine.stream())
    return steps, {s.request_id: s for s in steps if s.finish_reason is not None}


# -- settings are checked before they reach the shared step ----------------------------------------
@pytest.mark.parametrize("top_k", [2**63, 10**30])
def test_a_top_k_above_the_vocabulary_means_off_and_never_reaches_torch(tiny_lm, top_k):
    prompt = tiny_lm.prompt_ids("Hi")
    got = DecodeLoop(tiny_lm, [prompt], dataclasses.replace(CONFIG, top_k=top_k)).run()[0]
    want = DecodeLoop(tiny_lm, [prompt], dataclasses.replace(CONFIG, top_k=0)).run()[0]
    assert got.token_ids == want.token_ids and got.finish_reason == "length"


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 9e-6])
def test_a_temperature_below_the_epsilon_is_greedy(tiny_lm, temperature):
    prompt = tiny_lm.prompt_ids("What is 3+4?")
    got = DecodeLoop(
        tiny_lm, [prompt], dataclasses.replace(CONFIG, temperature=temperature), seeds=[1]
    ).run()[0]
    want = DecodeLoop(tiny_lm, [prompt], dataclasses.replace(CONFIG, temperature=0.0), seeds=[2]).run()[0]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 2**40, "max_new_tokens must be in [1, 2147483647]"),
        ("max_new_tokens", True, "max_new_tokens must be a whole number"),
        ("min_new_tokens", "3", "min_new_tokens must be a whole number"),
        ("top_k", -1, "top_k must be in [0, "),
        ("seed", 2**64, "seed must be in ["),
        ("temperature", "0.5", "temperature must be a finite number"),
        ("answer_max_tokens", 0, "answer_max_tokens must be in [1, "),
    ],
)
def test_generation_config_bounds_and_types_every_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GenerationConfig(**{field: value})


def test_prompt_ids_outside_the_vocabulary_and_seeds_out_of_range_are_refused_when_added(tiny_lm):
    engine = Engine(tiny_lm)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, \d+\), got \[999999\]"):
        engine.add_request([1, 999999], CONFIG)
    with pytest.raises(ValueError, match="seed must be in"):
        engine.add_request([1, 2], CONFIG, seed=-(2**70))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("dynasor", {"interval": 32, "window": [3]}, "dynasor window must be a whole number, got [3]"),
        ("dynasor", {"interval": 32, "window": 1e20}, "dynasor window must be a whole number, got 1e+20"),
        ("dynasor", {"interval": 32, "window": 2.9}, "dynasor window must be a whole number, got 2.9"),
        ("dynasor", {"interval": 32, "window": 10**30}, "dynasor window must be in [2, 4096]"),
        ("eat", {"variance": 0.1, "every": [1]}, "eat every must be a whole number, got [1]"),
        ("lynx", {"delta": 0.1, "mode": ["event"]}, "lynx mode must be one of event, trajectory, harm"),
    ],
)
def test_exit_options_are_parsed_and_bounded_in_the_registry(method, options, message):
    with pytest.raises(ValueError) as info:
        make_policy(method, MethodContext(probe="unused"), **options)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"interval": "32:99999999999999999999"}, "must be in [2, 4096]"),
        ({"agree": str(10**30)}, "must be in [2, 4096]"),
        ({"interval": "32.5"}, "must be a whole number"),
    ],
)
def test_knob_values_are_bounded_too(grid, message):
    method = {"interval": "dynasor", "agree": "answer-convergence"}[next(iter(grid))]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_methods([method], grid)


def test_a_parsed_option_is_what_the_policy_gets():
    policy = make_policy("dynasor", None, interval=16, window="3")
    assert policy.window == 3 and policy.interval == 16
    assert get_method("dynasor").parse_option("window", " 5 ") == 5


# -- what still goes wrong fails only the request that caused it ------------------------------------
def test_a_row_whose_sampling_params_break_the_sampler_fails_alone(tiny_lm):
    """D1 at the engine: a value no validation let through (set behind the engine's back) breaks `sample`;
    that row ends with "error" and the others keep their tokens."""
    prompts = [tiny_lm.prompt_ids(t) for t in TEXTS]
    config = dataclasses.replace(CONFIG, top_k=40)  # a filter on: the rows' top-k values become one tensor
    engine = Engine(tiny_lm, max_batch_size=4)
    ids = [engine.add_request(p, config, seed=i) for i, p in enumerate(prompts)]
    for _ in range(3):
        engine.step()
    engine._requests[ids[2]].params = SamplingParams(temperature="hot")  # type: ignore[arg-type]
    _, finished = run_all(engine)
    assert finished[ids[2]].finish_reason == "error" and "TypeError" in finished[ids[2]].error
    assert engine.result(ids[2]).error is not None
    for i in (0, 1, 3):
        assert engine.result(ids[i]).token_ids == alone(tiny_lm, prompts[i], i, config).token_ids


class _RaisingPolicy(BasePolicy):
    name = "raises"

    def __init__(self, at: int) -> None:
        self.at = at

    def observe(self, step):
        if step.index == self.at:
            raise ZeroDivisionError("policy bug")
        return Decision.CONTINUE


def test_a_policy_that_raises_fails_only_its_own_request(tiny_lm):
    prompts = [tiny_lm.prompt_ids(t) for t in TEXTS]
    engine = Engine(tiny_lm, max_batch_size=4)
    ids = [
        engine.add_request(p, CONFIG, policy=_RaisingPolicy(4) if i == 1 else None, seed=i)
        for i, p in enumerate(prompts)
    ]
    steps, finished = run_all(engine)
    assert (
        finished[ids[1]].finish_reason == "error"
        and finished[ids[1]].error == "ZeroDivisionError: policy bug"
    )
    assert max(s.index for s in steps if s.request_id == ids[1]) == 4  # nothing of it after the fault
    for i in (0, 2, 3):
        assert engine.result(ids[i]).token_ids == alone(tiny_lm, prompts[i], i).token_ids
    assert not engine.has_unfinished() and not engine.backend.rows


class _PoisonedPrefill(StoreBackend):
    """A backend whose prefill fails for one prompt (a stand-in for, e.g., out-of-memory on a huge prompt)."""

    def __init__(self, lm, poison):
        super().__init__(lm)
        self.poison = poison
        self.prefill_calls = 0

    def prefill(self, request_ids, prompts):
        self.prefill_calls += 1
        if any(list(p) == self.poison for p in prompts):
            raise torch.OutOfMemoryError("poisoned prompt")
        return super().prefill(request_ids, prompts)


def test_a_prefill_failure_is_bisected_to_the_request_that_caused_it(tiny_lm):
    prompts = [tiny_lm.prompt_ids(t) for t in TEXTS]
    backend = _PoisonedPrefill(tiny_lm, prompts[3])
    engine = Engine(tiny_lm, max_batch_size=4, backend=backend)
    first = engine.add_request(prompts[0], CONFIG, seed=0)
    engine.step()
    engine.step()
    ids = [first] + [engine.add_request(p, CONFIG, seed=i) for i, p in enumerate(prompts[1:], start=1)]
    _, finished = run_all(engine)
    assert finished[ids[3]].finish_reason == "error" and "poisoned prompt" in finished[ids[3]].error
    assert backend.prefill_calls > 2  # the admitted group was split
    for i in (0, 1, 2):
        assert engine.result(ids[i]).token_ids == alone(tiny_lm, prompts[i], i).token_ids


def test_a_batch_job_does_not_drop_a_failed_prompt(tiny_lm):
    prompts = [tiny_lm.prompt_ids(t) for t in TEXTS[:2]]
    loop = DecodeLoop(tiny_lm, prompts, CONFIG, policies=[None, _RaisingPolicy(2)])
    with pytest.raises(RuntimeError, match="prompt 1 failed: ZeroDivisionError: policy bug") as info:
        loop.run()
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_row_that_does_not_filter_samples_the_same_beside_one_that_does():
    """Found by the API fuzz test: a batch with one top-k/top-p row sent every row through the sorted path,
    where the noise raced in rank order, so a plain row's token depended on its neighbour's settings."""
    from lynx_exit.engine.sampler import sample

    torch.manual_seed(1)
    logits = torch.randn(2, 64) * 2
    plain, filtering = SamplingParams(1.0, 1.0, 0), SamplingParams(0.8, 0.9, 20)
    differ = 0
    for seed in range(200):
        together = sample(
            logits,
            [plain, filtering],
            [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)],
        )
        first = sample(logits[:1], [plain], [torch.Generator().manual_seed(seed)]).item()
        second = sample(logits[1:], [filtering], [torch.Generator().manual_seed(seed + 1)]).item()
        assert together.tolist() == [first, second], seed
        differ += first != int(logits[0].argmax())
    assert differ > 20  # the plain row really samples
