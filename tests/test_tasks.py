import json

import pytest

from lynx_exit.tasks import load_task


def test_shipped_tasks_load():
    gsm = load_task("gsm8k", limit=3)
    assert len(gsm) == 3 and gsm[0].gold == "18"
    assert gsm[0].prompt.endswith("within \\boxed{}.")
    assert load_task("multiarith", limit=1)[0].gold == "39"
    svamp = load_task("svamp", limit=1)[0]
    assert svamp.gold == "145" and "How big is each group" in svamp.question
    assert load_task("gsm8k-train", limit=2, offset=5)[0].problem_id == "gsm8k-train-5"


def test_user_files(tmp_path):
    math_file = tmp_path / "m.jsonl"
    math_file.write_text(json.dumps({"problem": "p", "solution": r"so \boxed{\frac{3}{4}}"}) + "\n")
    assert load_task("math", math_file)[0].gold == r"\frac{3}{4}"
    csqa = tmp_path / "c.jsonl"
    record = {"question": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "B"}
    csqa.write_text(json.dumps(record) + "\n")
    problem = load_task("csqa", csqa)[0]
    assert "(B) y" in problem.question and problem.grade(r"\boxed{B}")
    aime = tmp_path / "a.jsonl"
    aime.write_text(json.dumps({"problem": "p", "answer": 204}) + "\n")
    assert load_task("aime", aime)[0].gold == "204"


def test_bad_inputs_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_task("gsm8k", bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"input": "q"}\n')
    with pytest.raises(ValueError, match=r"wrong.jsonl:1: not a gsm8k record"):
        load_task("gsm8k", wrong)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ValueError, match="ships no data"):
        load_task("math")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_task("gsm8k", tmp_path / "missing.jsonl")


@pytest.mark.parametrize("answer_key", ["", None, "F", 2])
def test_csqa_answer_key_must_be_a_choice_label(tmp_path, answer_key):
    good = {"question": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"}
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answerKey": answer_key}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: not a csqa record .*answerKey"):
        load_task("csqa", data)


def test_math500_keeps_its_unique_id(tmp_path):
    data = tmp_path / "math500.jsonl"
    records = [
        {"problem": "p", "answer": "3", "unique_id": "test/algebra/1.json"},
        {"problem": "q", "answer": "4"},
    ]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert [problem.problem_id for problem in load_task("math", data)] == ["test/algebra/1.json", "math-1"]


def test_repeated_problem_ids_are_an_error(tmp_path):
    data = tmp_path / "m.jsonl"
    record = {"problem": "p", "answer": "3", "unique_id": "x"}
    data.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:2: problem id 'x' repeats line 1"):
        load_task("math", data)
