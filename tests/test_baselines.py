"""The newer baselines (answer-convergence, first-answer, EAT, DeepConf): their rules on hand-made step
streams, the engine's batched trials and token confidences on a tiny model, and an eval with all four."""

import dataclasses
import json

import pytest
import torch

from lynx_exit.engine import Engine, ForcedAnswer, GenerationConfig, Step
from lynx_exit.evaluate import run_eval
from lynx_exit.exits import (
    AnswerConvergencePolicy,
    BasePolicy,
    Decision,
    DeepConfPolicy,
    DeerPolicy,
    EatPolicy,
    FirstAnswerPolicy,
    MethodContext,
    make_policy,
    parse_methods,
)
from lynx_exit.exits.deepconf import Warmup, load_warmup, lowest_group_confidence, run_warmup
from lynx_exit.tasks import Problem


def stream(texts=None, cues=(), confidences=None, n=None):
    n = n or len(texts or confidences)
    return [
        Step(
            request_id=0,
            index=i,
            token_id=5,
            text=(texts or ["x"] * n)[i],
            phase="think",
            cue="wait" if i in cues else None,
            confidence=None if confidences is None else confidences[i],
        )
        for i in range(n)
    ]


def replay(policy, steps, trial=lambda step, kind: None):
    """As the engine does: a trial only where `trial_at` asks for one. Returns the exit index or None."""
    policy.reset()
    for step in steps:
        kind = policy.trial_at(step)
        step.trial = trial(step, kind) if kind else None
        if policy.observe(step) is Decision.EXIT:
            return step.index
    return None


def answers(by_index, forced=3):
    return lambda step, kind: ForcedAnswer([7, 8], "", by_index[step.index], 0.5, forced_tokens=forced)


def test_answer_convergence_exits_when_the_last_k_cue_answers_agree_and_counts_every_trial():
    steps = stream(n=8, cues={1, 3, 4, 6, 7})
    by_index = {1: "4", 3: "5", 4: "5", 6: "5", 7: "5"}
    policy = AnswerConvergencePolicy(window=2)
    assert replay(policy, steps, answers(by_index)) == 4 and policy.trial_tokens == 3 * (3 + 2)
    policy = AnswerConvergencePolicy(window=3)
    assert replay(policy, steps, answers(by_index)) == 6 and policy.trial_tokens == 4 * 5
    assert (
        replay(AnswerConvergencePolicy(window=2), steps, answers(dict.fromkeys(by_index))) is None
    )  # no answer: no agreement
    with pytest.raises(ValueError, match="at least 2"):
        AnswerConvergencePolicy(window=1)


@pytest.mark.parametrize(
    ("texts", "exit_at"),
    [
        (
            ["Step 1: 3 + 4 = 7.\n", "So the answer is 1", "7", ".", "\n", "Wait"],
            4,
        ),  # "17." may still be "17.5"
        (["So the answer is 1", "7", " apples"], 2),
        (["so \\boxed{1", "2", "}", " ok"], 2),
        (["the answer is 12,", "000 ", "x"], 1),  # "12,000" is complete once a space follows
        (["The answer is unclear. ", "\\boxed{}", " hmm"], None),  # no number, an empty box
    ],
)
def test_first_answer_exits_at_the_first_complete_stated_answer_without_trials(texts, exit_at):
    policy = FirstAnswerPolicy()
    assert replay(policy, stream(texts)) == exit_at
    assert policy.trial_tokens == 0 and all(policy.trial_at(s) is None for s in stream(texts))


def entropies(by_index, forced=2):
    return lambda step, kind: ForcedAnswer(
        [], "", None, 0.0, forced_tokens=forced, entropy=by_index[step.index]
    )


def test_eat_exits_once_the_moving_variance_of_the_entropy_settles():
    steps = stream(n=10, cues={1, 2, 4, 6, 8, 9})
    settled = {1: 1.0, 2: 1.0, 4: 1.0, 6: 1.0, 8: 1.0, 9: 1.0}
    policy = EatPolicy(variance=1e-3)
    assert (
        replay(policy, steps, entropies(settled)) == 4 and policy.trial_tokens == 3 * 2
    )  # 3 trials, 2 forced tokens each
    jumpy = {1: 1.0, 2: 3.0, 4: 1.0, 6: 3.0, 8: 1.0, 9: 3.0}
    assert replay(EatPolicy(variance=1e-3), steps, entropies(jumpy)) is None
    # After trials 1.0 and 2.0 (α = 0.2): mean 1.2, variance 0.8·0.2·1² = 0.16; a third 1.2 leaves it at
    # 0.128.
    drift = {1: 1.0, 2: 2.0, 4: 1.2, 6: 1.2, 8: 1.2, 9: 1.2}
    assert replay(EatPolicy(variance=0.13), steps, entropies(drift)) == 4
    assert replay(EatPolicy(variance=0.12), steps, entropies(drift)) == 6
    every = EatPolicy(variance=1e-3, every=3)
    assert [every.trial_at(s) for s in stream(n=6)] == [None, None, "entropy", None, None, "entropy"]
    with pytest.raises(RuntimeError, match="entropy trials"):
        EatPolicy(variance=1e-3).observe(stream(n=2, cues={1})[1])


def test_deepconf_exits_when_the_window_mean_confidence_falls_below_the_threshold():
    confidences = [5.0, 5.0, 5.0, 1.0, 1.0, 1.0]
    assert (
        replay(DeepConfPolicy(threshold=3.0, window=3), stream(confidences=confidences)) == 4
    )  # (5+1+1)/3 < 3
    assert (
        replay(DeepConfPolicy(threshold=3.7, window=3), stream(confidences=confidences)) == 3
    )  # (5+5+1)/3 < 3.7
    assert replay(DeepConfPolicy(threshold=0.5, window=3), stream(confidences=confidences)) is None
    assert (
        replay(DeepConfPolicy(threshold=9.0, window=7), stream(confidences=confidences)) is None
    )  # never a full window


def test_deepconf_threshold_is_the_warmup_percentile_of_lowest_group_confidences():
    assert lowest_group_confidence([1, 2, 3, 4], 2) == 1.5 and lowest_group_confidence([1], 2) is None
    warmup = Warmup("m", "h", top_k=5, window=2, traces=((1, 2, 3, 4), (4, 4, 4, 4), (1, 1), (9,)))
    assert warmup.threshold(50) == 1.5  # lows 1.5, 4.0, 1.0; the 1-token trace has no full window
    assert warmup.threshold(90) < 1.5 < warmup.threshold(10)  # keeping more traces: a lower threshold
    assert warmup.threshold(50, window=4) == 3.25  # lows 2.5 and 4.0 (interpolated median)
    with pytest.raises(ValueError, match="shorter than the window of 5"):
        warmup.threshold(50, window=5)
    with pytest.raises(ValueError, match=r"\(0, 100\)"):
        warmup.threshold(100)


class Trials(BasePolicy):
    """Asks for a trial of `kind` at every cue and keeps what it gets; never exits."""

    def __init__(self, kind, top_k=0):
        self.kind, self.confidence_top_k, self.got, self.steps, self.name = kind, top_k, [], [], "trials"

    def trial_at(self, step):
        return self.kind if step.cue is not None else None

    def observe(self, step):
        self.steps.append(step)
        if step.cue is not None:
            self.got.append((step.trial, step.fork))
        return Decision.CONTINUE


CUES = GenerationConfig(
    max_new_tokens=16, min_new_tokens=16, temperature=1.0, cue_regex="[aeo]", answer_max_tokens=4
)


def test_the_trials_of_all_rows_of_a_step_are_one_batched_fork_equal_to_single_forks(tiny_lm, monkeypatch):
    engine = Engine(tiny_lm, max_batch_size=4)
    calls = []
    original = engine.backend.fork
    monkeypatch.setattr(
        engine.backend, "fork", lambda items, *a, **k: calls.append(len(items)) or original(items, *a, **k)
    )
    policies = [Trials("answer") for _ in range(4)]
    config = dataclasses.replace(
        CUES, max_new_tokens=40, min_new_tokens=40
    )  # long enough for rows to cue together
    for i, policy in enumerate(policies):
        engine.add_request(tiny_lm.prompt_ids(f"What is {i} + 2?"), config, policy, seed=i)
    steps_with_trials: dict[int, int] = {}
    for step in engine.stream():
        if step.trial is not None:
            steps_with_trials[step.index] = steps_with_trials.get(step.index, 0) + 1
    assert sum(calls) == sum(steps_with_trials.values()) > len(calls)  # some fork served several rows at once
    assert max(calls) > 1 and len(calls) == len(steps_with_trials)  # one fork per step with trials


def test_batched_trials_equal_single_forks_and_entropy_matches_a_direct_forward(tiny_lm):
    for kind in ("answer", "entropy"):
        engine = Engine(tiny_lm, max_batch_size=2)
        policies = [Trials(kind), Trials(kind)]
        prompts = [tiny_lm.prompt_ids("What is 3 + 4?"), tiny_lm.prompt_ids("Hi")]
        for i, (prompt, policy) in enumerate(zip(prompts, policies, strict=True)):
            engine.add_request(prompt, CUES, policy, seed=10 + i)
        checked = 0
        for step in engine.stream():
            if step.trial is None:
                continue
            if (
                kind == "answer" and step.index < CUES.max_new_tokens - 1
            ):  # (a request's last step has left the cache)
                # the step's own single fork, run now from the same cache, agrees
                single = step.fork()
                assert single.token_ids == step.trial.token_ids and single.mean_prob == pytest.approx(
                    step.trial.mean_prob
                )
                assert step.trial.forced_tokens == len(tiny_lm.exit_cue_ids())
            checked += 1
        assert checked > 2
    # entropy: recompute the last trial from scratch, a forward over prompt + kept tokens + exit cue
    policy = policies[-1]
    request = next(s for s in reversed(policy.steps) if s.cue is not None)
    kept = [
        s.token_id for s in policy.steps[: request.index]
    ]  # the cue token itself is dropped, as on an exit
    marker = tiny_lm.exit_cue_ids()
    ids = torch.tensor([prompts[1] + kept + marker])
    with torch.no_grad():
        logits = tiny_lm.model(ids).logits[0, -1].float()
    want = float(-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum())
    got = next(t for t, _ in reversed(policy.got))
    assert (
        got.entropy == pytest.approx(want, rel=1e-6)
        and got.forced_tokens == len(marker)
        and got.token_ids == []
    )


def test_token_confidence_is_the_negative_mean_top_k_log_probability_where_the_token_was_sampled(tiny_lm):
    engine = Engine(tiny_lm, max_batch_size=2)
    policy = Trials(None, top_k=3)
    prompt = tiny_lm.prompt_ids("What is 3 + 4?")
    engine.add_request(tiny_lm.prompt_ids("Hi"), CUES, Trials(None), seed=1)  # a row that asks for nothing
    engine.add_request(prompt, CUES, policy, seed=2)
    list(engine.stream())
    tokens = [s.token_id for s in policy.steps]
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([prompt + tokens])).logits[0].float()
    logits[:, sorted(tiny_lm.eos_token_ids)] = float(
        "-inf"
    )  # min_new_tokens bans end-of-sequence: not in the distribution
    log_probs = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], -1)
    want = (-log_probs.topk(3, -1).values.mean(-1)).tolist()
    assert [s.confidence for s in policy.steps] == pytest.approx(want, rel=1e-6)


def test_eval_runs_the_four_methods_on_paired_seeds(tiny_lm, tmp_path):
    problems = [Problem("gsm8k", f"p{i}", f"What is {i} plus 2?", str(i + 2)) for i in range(4)]
    config = GenerationConfig(
        max_new_tokens=20, temperature=1.0, seed=3, answer_max_tokens=4, cue_regex="[ae]"
    )
    summary = run_warmup(tiny_lm, problems, config, tmp_path / "warmup", top_k=4, window=5, progress=False)
    assert summary["traces"] == 4 and load_warmup(tmp_path / "warmup").top_k == 4
    settings = parse_methods(
        ["never", "deepconf", "eat", "answer-convergence", "first-answer"],
        {"keep": "50", "variance": "0.5", "agree": "2"},
    )
    summary = run_eval(
        tiny_lm,
        problems,
        settings,
        config,
        tmp_path / "eval",
        progress=False,
        deepconf=str(tmp_path / "warmup"),
    )
    records = [json.loads(x) for x in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {
        "never",
        "deepconf",
        "eat",
        "answer-convergence",
        "first-answer",
    }
    assert len(records) == 5 * 4 and len(summary["settings"]) == 5
    assert all(
        any(r["trial_tokens"] > 0 for r in records if r["method"] == m) for m in ("eat", "answer-convergence")
    )
    assert all(
        r["trial_tokens"] == 0 for r in records if r["method"] in ("deepconf", "first-answer", "never")
    )
    assert any(
        r["exit_index"] is not None for r in records if r["method"] == "deepconf"
    )  # keep 50 %: half the traces exit


def test_deepconf_needs_a_warmup_of_the_same_model(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="needs a warm-up"):
        make_policy("deepconf", MethodContext(lm=tiny_lm), keep=50)
    (tmp_path / "deepconf.json").write_text(
        json.dumps(
            {
                "format": "lynx-exit-deepconf-warmup-v1",
                "model_id": "other",
                "tokenizer_hash": "0" * 64,
                "top_k": 5,
                "window": 2,
                "traces": [{"confidences": [1.0, 2.0]}],
            }
        )
    )
    with pytest.raises(ValueError, match="made with model 'other'"):
        make_policy("deepconf", MethodContext(lm=tiny_lm, deepconf=str(tmp_path)), keep=50)
    with pytest.raises(FileNotFoundError, match="lynx-exit deepconf-warmup"):
        make_policy("deepconf", MethodContext(lm=tiny_lm, deepconf=str(tmp_path / "nowhere")), keep=50)
    assert isinstance(make_policy("deer", threshold=0.9), DeerPolicy)


def test_readme_methods_table_lists_every_registered_method_with_its_flags():
    from pathlib import Path

    from lynx_exit.exits import METHODS

    readme = (Path(__file__).parents[1] / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    table = readme.split("<!-- methods:start -->", 1)[1].split("<!-- methods:end -->", 1)[0]
    for name, method in METHODS.items():
        row = next((line for line in table.splitlines() if f"`{name}`" in line), None)
        assert row is not None, name
        if method.knob is not None:
            assert f"`{method.knob.flag}` / `{method.knob.grid_flag}`" in row, name
