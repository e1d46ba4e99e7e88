import json

import pytest

from lynx_exit.engine import DecodeLoop, ForcedAnswer, GenerationConfig, Step
from lynx_exit.evaluate import run_eval, summarize, wilson_interval, write_report
from lynx_exit.exits import (
    Decision,
    DeerPolicy,
    DynasorPolicy,
    MethodContext,
    NoWaitPolicy,
    cue_token_ids,
    first_exit,
    make_policy,
    parse_methods,
)
from lynx_exit.tasks import Problem


def _steps(answers, cues):
    """Hand-made trajectory: step i is a cue if i in `cues`; its trial answer is answers[i] (3 forced tokens +
    2)."""
    out = []
    for i, (answer, prob) in enumerate(answers):
        forced = ForcedAnswer(
            token_ids=[1, 2], text=f"{answer}}}", answer=answer, mean_prob=prob, forced_tokens=3
        )
        out.append(
            Step(
                request_id=0,
                index=i,
                token_id=5,
                text="x",
                phase="think",
                cue="wait" if i in cues else None,
                fork=lambda f=forced: f,
            )
        )
    return out


def test_deer_exits_at_first_confident_cue_and_counts_trials():
    steps = _steps([("3", 0.99), ("4", 0.5), ("4", 0.97), ("4", 0.99)], cues={1, 2, 3})
    policy = DeerPolicy(threshold=0.95)
    assert first_exit(policy, steps) == 2
    assert policy.trial_tokens == 2 * (3 + 2)  # trials at cues 1 and 2 only
    assert [policy.trial_at(s) for s in steps] == [None, "answer", "answer", "answer"]
    with pytest.raises(ValueError, match="threshold"):
        DeerPolicy(threshold=0)


def test_dynasor_exits_when_last_answers_agree():
    steps = _steps([("1", 0), ("2", 0), ("5", 0), ("5", 0), ("7", 0), ("5", 0), ("5", 0)], cues=set())
    policy = DynasorPolicy(interval=1, window=2)
    assert first_exit(policy, steps) == 3
    policy = DynasorPolicy(interval=2, window=2)  # probes at steps 1, 3, 5
    assert first_exit(policy, steps) == 5
    assert policy.trial_tokens == 3 * (3 + 2)


def test_nowait_bans_cue_tokens(tiny_lm):
    banned = cue_token_ids(tiny_lm.tokenizer)
    assert banned and all(
        tiny_lm.tokenizer.decode([t]).strip().lower() in {"wait", "hmm", "alternatively"} for t in banned
    )
    config = GenerationConfig(max_new_tokens=40, temperature=1.5, seed=0, min_new_tokens=40)
    prompt = tiny_lm.prompt_ids("Wait wait hmm?")
    result = DecodeLoop(tiny_lm, [prompt], config, policies=[NoWaitPolicy(banned)]).run()[0]
    assert not set(result.token_ids) & banned
    assert NoWaitPolicy().observe(_steps([("1", 1)], {0})[0]) is Decision.CONTINUE


def _record(setting, pid, correct, tokens, exit_index=None, trial=0, method=None):
    return {
        "method": method or setting.split("@")[0],
        "setting": setting,
        "knob": None,
        "problem_id": pid,
        "rollout": 0,
        "correct": correct,
        "generated_tokens": tokens,
        "trial_tokens": trial,
        "exit_index": exit_index,
        "latency_s": 0.5,
    }


def test_aggregation_math_on_hand_made_records():
    records = [
        _record("never", "a", True, 100),
        _record("never", "b", False, 200),
        _record("never", "c", True, 300),
        _record("lynx@0.1", "a", True, 40, 30),
        _record("lynx@0.1", "b", True, 60, 50),
        _record("lynx@0.1", "c", False, 50, 40),
        _record("deer@0.9", "a", True, 50, 10, trial=50),
    ]
    rows = {r["setting"]: r for r in summarize(records, seconds_per_rollout={"never": 2.0})["settings"]}
    lynx = rows["lynx@0.1"]
    assert lynx["accuracy"] == pytest.approx(2 / 3)
    assert lynx["mean_generated_tokens"] == pytest.approx(50)
    assert lynx["tokens_saved_pct"] == pytest.approx(75.0)
    assert lynx["exit_rate"] == 1 and lynx["help"] == 1 and lynx["harm"] == 1
    assert rows["deer@0.9"]["mean_total_tokens"] == 100 and rows["deer@0.9"][
        "tokens_saved_pct"
    ] == pytest.approx(50.0)
    assert (
        rows["never"]["wall_time_per_problem_s"] == 2.0
        and rows["lynx@0.1"]["wall_time_per_problem_s"] is None
    )
    low, high = wilson_interval(2, 3)
    assert low < 2 / 3 < high and lynx["accuracy_ci95"] == [low, high]


def test_parse_methods_errors():
    (lynx,) = parse_methods(["lynx"], {"delta": "0.1"})
    with pytest.raises(ValueError, match="needs a probe"):
        make_policy(lynx.method, MethodContext(), **dict(lynx.options))
    with pytest.raises(ValueError, match="--budgets"):
        parse_methods(["token-budget"])
    with pytest.raises(ValueError, match="unknown exit method 'fast'; choose from .*lynx-harm"):
        parse_methods(["fast"])
    with pytest.raises(ValueError, match="--deltas: bad delta '1.5'"):
        parse_methods(["lynx"], {"delta": "0.1,1.5"})
    settings = parse_methods(["never", "token-budget", "dynasor"], {"budget": "8,16", "interval": "4:2"})
    assert [s.label for s in settings] == ["never", "token-budget@8", "token-budget@16", "dynasor@4"]
    assert dict(settings[-1].options) == {"interval": 4, "window": 2}


def test_eval_is_paired_resumable_and_reports(tiny_lm, tmp_path):
    problems = [Problem("gsm8k", f"p{i}", f"What is {i} plus 2?", str(i + 2)) for i in range(5)]
    settings = parse_methods(
        ["never", "token-budget", "deer", "dynasor", "nowait"],
        {"budget": "6", "threshold": "0.5", "interval": "5:2"},
    )
    config = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3, answer_max_tokens=4, cue_regex="e")
    calls = []

    def crash_after_three():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(
            tiny_lm,
            problems,
            settings,
            config,
            tmp_path,
            batch_size=2,
            progress=False,
            on_record=crash_after_three,
        )
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 3
    summary = run_eval(tiny_lm, problems, settings, config, tmp_path, batch_size=2, progress=False)
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 25 and len({(r["setting"], r["problem_id"]) for r in records}) == 25
    never = {r["problem_id"]: r for r in records if r["setting"] == "never"}
    budget = {r["problem_id"]: r for r in records if r["setting"] == "token-budget@6"}
    # paired seeds: the same rollout up to the budget's exit
    again = DecodeLoop(
        tiny_lm, [tiny_lm.prompt_ids(problems[0].prompt)], config, seeds=[3 * 1_000_003]
    ).run()[0]
    assert again.num_generated_tokens == never["p0"]["generated_tokens"]
    assert all(budget[p]["exit_index"] == 5 for p in budget if budget[p]["finish_reason"] == "exit")
    assert any(r["trial_tokens"] > 0 for r in records if r["method"] in ("deer", "dynasor"))
    write_report(summary, tmp_path, {"model": "tiny"}, "t")
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert "token-budget@6" in (tmp_path / "summary.md").read_text()


def test_pareto_plot_draws_settings_at_0_and_100_percent(tmp_path):
    from lynx_exit.evaluate import pareto_plot

    records = [
        _record(s, f"p{i}", s != "deer@0.9", 10) for s in ("never", "lynx@0.1", "deer@0.9") for i in range(6)
    ]  # 6/6: the interval end rounds below 100 %
    pareto_plot(summarize(records, ["never", "lynx@0.1", "deer@0.9"]), tmp_path / "p.png", lynx_mode="harm")
    assert (tmp_path / "p.png").stat().st_size > 1000
