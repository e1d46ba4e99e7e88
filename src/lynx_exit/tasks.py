"""Tasks as data: JSONL loaders, prompts and gold answers, chosen by name from a registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import iter_jsonl
from lynx_exit.grading import extract_boxed, grade, gsm8k_gold

DATA_DIR = Path(__file__).parent / "data"
REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    task: str
    problem_id: str
    question: str
    gold: str

    @property
    def prompt(self) -> str:
        """The user turn sent to the model (spec §3 prompt)."""
        return self.question + REASONING_SUFFIX

    def grade(self, response: str) -> bool:
        return grade(self.task, response, self.gold)


def _number_text(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _gsm8k(record: dict[str, Any]) -> tuple[str, str]:
    return record["question"], gsm8k_gold(record["answer"])


def _multiarith(record: dict[str, Any]) -> tuple[str, str]:
    return record["input"], _number_text(record["target"])


def _svamp(record: dict[str, Any]) -> tuple[str, str]:
    body = record["Body"].strip()
    joiner = " " if body.endswith((".", "?", "!")) else ". "
    return body + joiner + record["Question"].strip(), _number_text(record["Answer"])


def _math(record: dict[str, Any]) -> tuple[str, str]:
    gold = record.get("answer")
    if gold is None:
        gold = extract_boxed(record["solution"])
        if gold is None:
            raise KeyError("answer (and no \\boxed{} in solution)")
    return record["problem"], str(gold)


def _aime(record: dict[str, Any]) -> tuple[str, str]:
    return record["problem"], str(record["answer"]).strip()


def _csqa(record: dict[str, Any]) -> tuple[str, str]:
    choices = record["choices"]
    lines = [f"({label}) {text}" for label, text in zip(choices["label"], choices["text"], strict=True)]
    question = record["question"] + "\nChoices:\n" + "\n".join(lines) + "\nAnswer with the letter of the correct choice."
    answer_key = record["answerKey"]
    if not isinstance(answer_key, str) or answer_key.strip() not in choices["label"]:
        raise ValueError(f"answerKey {answer_key!r} is not one of the choice labels {choices['label']}")
    return question, answer_key.strip()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    parse: Callable[[dict[str, Any]], tuple[str, str]]
    default_file: str | None  # shipped in lynx_exit/data, or None: the user gives a path


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("gsm8k", _gsm8k, "gsm8k_test.jsonl"),
        TaskSpec("gsm8k-train", _gsm8k, "gsm8k_train.jsonl"),
        TaskSpec("multiarith", _multiarith, "multiarith_test.jsonl"),
        TaskSpec("svamp", _svamp, "svamp_test.jsonl"),
        TaskSpec("math", _math, None),
        TaskSpec("aime", _aime, None),
        TaskSpec("csqa", _csqa, None),
    )
}


# The file's own id: `id` (GSM8K copies, CSQA), `ID` (SVAMP), `unique_id` (MATH-500).
_ID_KEYS = ("id", "ID", "unique_id")


def load_task(name: str, path: str | Path | None = None, limit: int | None = None, offset: int = 0) -> list[Problem]:
    """Problems of task `name` from `path` (or the shipped file), records [offset, offset+limit)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    spec = TASKS[name]
    if path is None:
        if spec.default_file is None:
            raise ValueError(f"task {name!r} ships no data: pass a JSONL file with --data")
        path = DATA_DIR / spec.default_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} for task {name!r} does not exist")
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")
    problems: list[Problem] = []
    id_lines: dict[str, int] = {}  # resumable jobs key their outputs by problem id
    for index, (line_number, record) in enumerate(iter_jsonl(path)):
        if index < offset:
            continue
        if limit is not None and len(problems) >= limit:
            break
        try:
            question, gold = spec.parse(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{line_number}: not a {name} record ({exc})") from exc
        problem_id = next((str(record[key]) for key in _ID_KEYS if record.get(key) is not None), f"{name}-{index}")
        if problem_id in id_lines:
            raise ValueError(f"{path}:{line_number}: problem id {problem_id!r} repeats line {id_lines[problem_id]}")
        id_lines[problem_id] = line_number
        problems.append(Problem(task=name.removesuffix("-train"), problem_id=problem_id, question=question, gold=gold))
    return problems
