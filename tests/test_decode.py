from dataclasses import dataclass

import pytest
import torch

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits import BasePolicy, Decision, NeverExit, TokenBudget, first_exit, make_policy

# A frequent cue ("e" anywhere) so that a random tiny model yields many cue events.
FREQUENT = dict(cue_regex=r"e", max_new_tokens=48, min_new_tokens=48)


@dataclass
class ExitAtCue(BasePolicy):
    """Exit at the k-th cue event (hand-made decisions for tests)."""

    k: int = 1
    name: str = "exit-at-cue"
    seen: int = 0

    def reset(self):
        self.seen = 0

    def observe(self, step):
        if step.cue is None:
            return Decision.CONTINUE
        self.seen += 1
        return Decision.EXIT if self.seen == self.k else Decision.CONTINUE


@dataclass
class FeatureThreshold(BasePolicy):
    """Exit at a cue whose first feature exceeds a threshold: a stand-in probe."""

    threshold: float = 0.0
    feature_spec: object = None
    name: str = "feature-threshold"

    def reset(self):
        pass

    def observe(self, step):
        if step.cue is not None and float(step.features[0]) > self.threshold:
            return Decision.EXIT
        return Decision.CONTINUE


def prompts(lm):
    return [lm.prompt_ids("What is 3+4?"), lm.prompt_ids("Tom has 12 apples, eats 5. How many left? Think.")]


def test_greedy_loop_equals_model_generate(tiny_lm):
    prompt = prompts(tiny_lm)[1]
    result = DecodeLoop(tiny_lm, [prompt], GenerationConfig(max_new_tokens=30, temperature=0)).run()[0]
    reference = tiny_lm.model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
    assert result.token_ids == reference[0, len(prompt) :].tolist()
    assert result.finish_reason == "length"


def test_batched_rows_equal_rows_alone_with_sampling(tiny_lm):
    config = GenerationConfig(max_new_tokens=25, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    batch = DecodeLoop(tiny_lm, prompts(tiny_lm), config).run()
    for row, prompt in enumerate(prompts(tiny_lm)):
        alone = DecodeLoop(tiny_lm, [prompt], config, seeds=[7 + row]).run()[0]
        assert alone.token_ids == batch[row].token_ids
    assert batch[0].token_ids != batch[1].token_ids


def test_same_seed_same_rollout_other_seed_differs(tiny_lm):
    config = GenerationConfig(max_new_tokens=25, temperature=1.0, seed=3)
    p = prompts(tiny_lm)[:1]
    a = DecodeLoop(tiny_lm, p, config).run()[0].token_ids
    assert a == DecodeLoop(tiny_lm, p, config).run()[0].token_ids
    assert a != DecodeLoop(tiny_lm, p, config, seeds=[4]).run()[0].token_ids


def test_hooks_equal_output_hidden_states(tiny_lm):
    layers = (0, 1, 2, 3)
    config = GenerationConfig(temperature=0, **FREQUENT)
    prompt = prompts(tiny_lm)[0]
    loop = DecodeLoop(tiny_lm, [prompt], config, layers=layers)
    steps = [s for s in loop.steps() if s.phase == "think"]
    result = loop.results()[0]
    assert any(s.cue for s in steps)
    full = torch.tensor([prompt + result.token_ids])
    hidden = tiny_lm.model(full, output_hidden_states=True).hidden_states
    for step in steps:
        position = len(prompt) + step.index
        expected = torch.cat([hidden[layer][0, position] for layer in layers]).float()
        torch.testing.assert_close(step.features, expected, rtol=1e-5, atol=1e-6)


def test_exit_drops_cue_and_answer_equals_rerun_of_prefix_ids(tiny_lm):
    config = GenerationConfig(temperature=0.8, seed=1, answer_max_tokens=12, **FREQUENT)
    prompt = prompts(tiny_lm)[0]
    result = DecodeLoop(tiny_lm, [prompt], config, policies=[ExitAtCue(k=2)]).run()[0]
    assert result.finish_reason == "exit"
    never = DecodeLoop(tiny_lm, [prompt], config).run()[0]
    cue_index = never.cue_indices[1]
    assert result.exit_index == cue_index
    cue_ids = tiny_lm.exit_cue_ids()
    assert result.token_ids[: cue_index + len(cue_ids)] == never.token_ids[:cue_index] + cue_ids
    answer_ids = result.token_ids[cue_index + len(cue_ids) :]
    rerun = tiny_lm.model.generate(
        torch.tensor([prompt + never.token_ids[:cue_index] + cue_ids]),
        max_new_tokens=len(answer_ids),
        do_sample=False,
    )
    assert answer_ids == rerun[0, -len(answer_ids) :].tolist()


def test_batched_forced_answers_from_cache_equal_rerun(tiny_lm):
    config = GenerationConfig(temperature=0.8, seed=2, max_new_tokens=30, min_new_tokens=30)
    batch = prompts(tiny_lm)
    loop = DecodeLoop(tiny_lm, batch, config, hold=True)
    loop.run()
    results = loop.results()
    cut_points = [(0, 3), (0, 10), (1, 7), (1, 20)]  # (row, generated tokens kept)
    cue_ids = tiny_lm.exit_cue_ids()
    answers = loop.engine.forced_answers(cut_points, cue_ids, 6)
    for (row, kept), forced in zip(cut_points, answers, strict=True):
        prefix = batch[row] + results[row].token_ids[:kept] + cue_ids
        rerun = tiny_lm.model.generate(
            torch.tensor([prefix]), max_new_tokens=len(forced.token_ids), do_sample=False
        )
        assert forced.token_ids == rerun[0, len(prefix) :].tolist()
        assert 0 < forced.mean_prob <= 1


def test_online_decisions_equal_offline_replay(tiny_lm):
    config = GenerationConfig(temperature=0.9, seed=5, **FREQUENT)
    prompt = prompts(tiny_lm)[1]
    never_loop = DecodeLoop(tiny_lm, [prompt], config, layers=tiny_lm.feature_spec().layers)
    recorded = list(never_loop.steps())
    feats = torch.stack([s.features[0] for s in recorded if s.cue])
    threshold = float(feats.median())
    offline = first_exit(FeatureThreshold(threshold), recorded)
    policy = FeatureThreshold(threshold, feature_spec=tiny_lm.feature_spec())
    online = DecodeLoop(tiny_lm, [prompt], config, policies=[policy]).run()[0]
    assert offline is not None and online.exit_index == offline


def test_token_budget_and_registry(tiny_lm):
    config = GenerationConfig(temperature=0.7, seed=0, max_new_tokens=40, answer_max_tokens=5)
    result = DecodeLoop(
        tiny_lm, prompts(tiny_lm)[:1], config, policies=[make_policy("token-budget", budget=10)]
    ).run()[0]
    assert result.exit_index == 9
    assert result.token_ids[10 : 10 + len(tiny_lm.exit_cue_ids())] == tiny_lm.exit_cue_ids()
    never = DecodeLoop(tiny_lm, prompts(tiny_lm)[:1], config, policies=[NeverExit()]).run()[0]
    assert never.exit_index is None and never.num_generated_tokens == 40
    with pytest.raises(ValueError, match="unknown exit method 'bogus'"):
        make_policy("bogus")
    with pytest.raises(ValueError, match="budget must be >= 1"):
        TokenBudget(0)


@pytest.mark.parametrize(
    "field,value",
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("exit_cue", "  ")],
)
def test_bad_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


def test_bad_loop_inputs(tiny_lm):
    with pytest.raises(ValueError, match="at least one token"):
        DecodeLoop(tiny_lm, [[]])
    with pytest.raises(ValueError, match="2 policies for 1 prompts"):
        DecodeLoop(tiny_lm, [[1, 2]], policies=[None, None])
    with pytest.raises(ValueError, match="layer 9 out of range"):
        tiny_lm.feature_spec([1, 9])


def test_continuous_batching_equals_rows_alone(tiny_lm):
    texts = [
        "Hi",
        "What is 3+4?",
        "A much longer prompt about twelve apples and five pears, think hard.",
        "x",
        "Tom?",
    ]
    batch = [tiny_lm.prompt_ids(t) for t in texts]
    config = GenerationConfig(max_new_tokens=20, temperature=0.9, seed=4, cue_regex="e", answer_max_tokens=4)
    lengths = [6, 20, 9, 14, 20]  # different budgets so rows finish at different steps and slots get refilled
    policies = [TokenBudget(n) if n < 20 else NeverExit() for n in lengths]
    loop = DecodeLoop(tiny_lm, batch, config, policies=policies, max_batch_size=2)
    refilled = loop.run()
    for i, prompt in enumerate(batch):
        policy = TokenBudget(lengths[i]) if lengths[i] < 20 else NeverExit()
        alone = DecodeLoop(tiny_lm, [prompt], config, policies=[policy], seeds=[4 + i]).run()[0]
        assert refilled[i].token_ids == alone.token_ids, i
        assert refilled[i].exit_index == alone.exit_index
    assert loop.engine.max_batch_size == 2
    with pytest.raises(ValueError, match="max_batch_size"):
        DecodeLoop(tiny_lm, batch, config, max_batch_size=0)
