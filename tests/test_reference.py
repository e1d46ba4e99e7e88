import json
import random
import re

import pytest

from lynx_exit.models import REFERENCE_MODELS, load_model, tokenizer_fingerprint
from lynx_exit.reference import ReferenceTrainConfig, apply_op, make_problems, make_trace
from lynx_exit.tasks.grading import extract_boxed


def test_problems_are_correct_and_splits_disjoint():
    splits = {name: make_problems(name, 300) for name in ("train", "calib", "test")}
    keys = {name: {p.key() for p in problems} for name, problems in splits.items()}
    assert (
        not keys["train"] & keys["calib"]
        and not keys["train"] & keys["test"]
        and not keys["calib"] & keys["test"]
    )
    for problem in splits["test"]:
        value = problem.start
        for op, b in problem.ops:
            value = apply_op(value, op, b)
            assert 0 <= value <= 200
        assert value == problem.answer and 2 <= len(problem.ops) <= 6
    assert make_problems("test", 5) == make_problems("test", 5)
    with pytest.raises(ValueError, match="split"):
        make_problems("dev", 1)


def test_trace_structure():
    rng = random.Random(0)
    problems = make_problems("train", 400)
    traces = [make_trace(p, rng) for p in problems]
    cue = re.compile(r"(?i)\b(wait|hmm|alternatively)\b")
    for problem, trace in zip(problems, traces, strict=True):
        assert trace.endswith(f"</think> Final Answer: \\boxed{{{problem.answer}}}")
        assert extract_boxed(trace) == str(problem.answer)
        assert f"So the answer is {problem.answer}." in trace
        # every wrong intermediate result is followed by a "Wait" correction
        for line in trace.splitlines():
            match = re.match(r"Step \d+: .* so (\d+) ([-+*]) (\d+) = (\d+)\.", line)
            if match and apply_op(int(match[1]), match[2], int(match[3])) != int(match[4]):
                assert f"is not {match[4]}. It is" in trace
    corrections = sum("is not" in t for t in traces)
    rechecks = [t.split("So the answer is")[1].count("\n") - 1 for t in traces]
    assert corrections > 40  # genuine self-corrections
    assert len(set(rechecks)) >= 5  # overthinking of varying length
    assert sum(len(cue.findall(t)) for t in traces) / len(traces) >= 3


def test_train_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        ReferenceTrainConfig(hidden_size=130, num_heads=4)
    with pytest.raises(ValueError, match="steps"):
        ReferenceTrainConfig(steps=0)
    with pytest.raises(ValueError, match="tokenizer_from"):
        ReferenceTrainConfig(init_from="a", tokenizer_from="b")


def test_both_reference_models_load_offline_from_the_package_and_share_one_tokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small, large = load_model("reference"), load_model("reference-large")
    assert tokenizer_fingerprint(small.tokenizer) == tokenizer_fingerprint(large.tokenizer)
    text = "Tom has 3 apples. Wait, let me check step 1: 3 + 4 = 7. Yes, that is right."
    assert small.encode(text) == large.encode(text) and small.prompt_ids(text) == large.prompt_ids(text)
    params = [sum(p.numel() for p in lm.model.parameters()) for lm in (small, large)]
    assert params[1] >= 3 * params[0]
    for lm in (small, large):
        training = json.loads((REFERENCE_MODELS[lm.model_id] / "training.json").read_text())
        assert training["config"]["preset"] == lm.model_id


def test_shipped_reference_model_encodes_any_text_and_reasons():
    lm = load_model("reference")
    text = "Ünïcode ✓ 你好 {x} \\boxed{42}"
    assert lm.tokenizer.decode(lm.encode(text)) == text
    assert lm.profile.think_end == "</think>"
    assert lm.tokenizer.decode(lm.prompt_ids("hi")).endswith("<think>\n")
    from lynx_exit.engine import DecodeLoop, GenerationConfig

    problem = make_problems("test", 1)[0]
    result = DecodeLoop(
        lm, [lm.prompt_ids(problem.question())], GenerationConfig(max_new_tokens=600, temperature=0)
    ).run()[0]
    assert result.finish_reason == "eos" and "</think> Final Answer: \\boxed{" in result.text
