"""The task table: every task's data source (a shipped file, a Hugging Face dataset, or a file the
user gives), its columns, how a record becomes a question and a gold answer, and its grader.

Hub ids, configs, splits and columns were read from the datasets' cards; `revision` pins the
dataset repository where a commit could be confirmed, else the default branch is read (README,
"Tasks"). Parsers read records by role (`question`, `answer`, ...) through the task's column
mapping, so one parser serves a shipped file and a Hub dataset whose columns are named otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lynx_exit.tasks.grading import extract_boxed, gsm8k_gold

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
Grader = Literal["number", "math", "choice"]
Fields = Mapping[str, Any]  # a record's values by role


def _number_text(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _gsm8k(fields: Fields) -> tuple[str, str]:
    return fields["question"], gsm8k_gold(fields["answer"])


def _number(fields: Fields) -> tuple[str, str]:
    return fields["question"], _number_text(fields["answer"])


def _svamp(fields: Fields) -> tuple[str, str]:
    body = fields["body"].strip()
    joiner = " " if body.endswith((".", "?", "!")) else ". "
    return body + joiner + fields["question"].strip(), _number_text(fields["answer"])


def _math(fields: Fields) -> tuple[str, str]:
    gold = fields.get("answer")
    if gold is None:
        gold = extract_boxed(fields["solution"])
        if gold is None:
            raise KeyError("answer (and no \\boxed{} in solution)")
    return fields["question"], str(gold).strip()


def _csqa(fields: Fields) -> tuple[str, str]:
    choices = fields["choices"]
    lines = [f"({label}) {text}" for label, text in zip(choices["label"], choices["text"], strict=True)]
    question = (
        fields["question"]
        + "\nChoices:\n"
        + "\n".join(lines)
        + "\nAnswer with the letter of the correct choice."
    )
    answer_key = fields["answer"]
    if not isinstance(answer_key, str) or answer_key.strip() not in choices["label"]:
        raise ValueError(f"answerKey {answer_key!r} is not one of the choice labels {choices['label']}")
    return question, answer_key.strip()


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face Hub, read with `datasets.load_dataset`."""

    dataset: str  # OWNER/NAME
    split: str
    configs: tuple[str | None, ...] = (None,)  # several: their rows are read one config after another
    revision: str | None = None  # a commit of the dataset repository; None reads the default branch
    columns: Mapping[str, str] | None = None  # role -> column here, where it differs from the task's own
    # The official LYNX data: a seeded permutation of each config's rows, then [offset, offset + limit) of
    # each (so train and calibration ranges are disjoint per subject); None: rows in order, ranges overall.
    per_config_permutation_seed: int | None = None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.dataset}"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    parse: Callable[[Fields], tuple[str, str]]
    grader: Grader
    columns: Mapping[str, str]  # role -> column of the shipped file or of a user's file
    optional: frozenset[str] = frozenset({"id"})  # roles a record may lack
    shipped: str | None = None  # file in lynx_exit/data
    hub: HubSource | None = None
    paper: str = ""  # where the LYNX paper (or the official code) uses it
    id_columns: tuple[str, ...] = field(default=("id",))

    def hub_columns(self) -> Mapping[str, str]:
        return self.hub.columns if self.hub is not None and self.hub.columns is not None else self.columns


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
_GSM8K = {"question": "question", "answer": "answer"}
_MATH = {"question": "problem", "answer": "answer", "solution": "solution", "id": "unique_id"}
_AIME = {"question": "problem", "answer": "answer", "id": "id"}

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "gsm8k",
            "GSM8K test, 1,319 grade-school word problems",
            _gsm8k,
            "number",
            _GSM8K,
            shipped="gsm8k_test.jsonl",
            hub=HubSource("openai/gsm8k", "test", ("main",)),
            paper="benchmark",
        ),
        TaskSpec(
            "gsm8k-train",
            "GSM8K train, 7,473 problems",
            _gsm8k,
            "number",
            _GSM8K,
            shipped="gsm8k_train.jsonl",
            hub=HubSource("openai/gsm8k", "train", ("main",)),
        ),
        TaskSpec(
            "math500",
            "MATH-500: 500 problems of the MATH test set",
            _math,
            "math",
            _MATH,
            optional=frozenset({"id", "solution"}),
            hub=HubSource("HuggingFaceH4/MATH-500", "test"),
            paper="benchmark",
        ),
        TaskSpec(
            "math-train",
            "MATH train, its seven subjects; offset and count are per subject",
            _math,
            "math",
            {**_MATH, "id": "id"},
            optional=frozenset({"id", "answer"}),
            hub=HubSource(
                "EleutherAI/hendrycks_math",
                "train",
                MATH_SUBJECTS,
                columns={"question": "problem", "solution": "solution"},
                per_config_permutation_seed=42,
            ),
            paper="probe training (offset 0) and calibration (offset 200), 200 per subject each",
        ),
        TaskSpec(
            "aime24",
            "AIME 2024, 30 problems",
            _math,
            "math",
            _AIME,
            optional=frozenset({"id", "solution"}),
            hub=HubSource("HuggingFaceH4/aime_2024", "train"),
            paper="benchmark",
        ),
        TaskSpec(
            "aime25",
            "AIME 2025, 30 problems",
            _math,
            "math",
            _AIME,
            optional=frozenset({"id", "solution"}),
            hub=HubSource("math-ai/aime25", "test"),
        ),
        TaskSpec(
            "amc23",
            "AMC 2023, 40 problems",
            _math,
            "math",
            {"question": "question", "answer": "answer", "id": "id"},
            optional=frozenset({"id", "solution"}),
            hub=HubSource("math-ai/amc23", "test"),
            paper="benchmark",
        ),
        TaskSpec(
            "csqa",
            "CommonsenseQA validation (the test split has no labels), 1,221 questions",
            _csqa,
            "choice",
            {"question": "question", "choices": "choices", "answer": "answerKey", "id": "id"},
            hub=HubSource("tau/commonsense_qa", "validation"),
            paper="benchmark (zero-shot transfer)",
        ),
        TaskSpec(
            "multiarith",
            "MultiArith, all 600 arithmetic word problems (the Hub copy splits them 420 / 180)",
            _number,
            "number",
            {"question": "input", "answer": "target"},
            shipped="multiarith_test.jsonl",
            hub=HubSource(
                "ChilleD/MultiArith", "test", columns={"question": "question", "answer": "final_ans"}
            ),
        ),
        TaskSpec(
            "svamp",
            "SVAMP, all 1,000 varied arithmetic word problems (the Hub copy splits them 700 / 300)",
            _svamp,
            "number",
            {"body": "Body", "question": "Question", "answer": "Answer", "id": "ID"},
            shipped="svamp_test.jsonl",
            hub=HubSource("ChilleD/SVAMP", "test"),
            id_columns=("ID",),
        ),
        TaskSpec(
            "math",
            "any MATH-style file (problem, answer or a \\boxed{} solution, unique_id): --data FILE",
            _math,
            "math",
            _MATH,
            optional=frozenset({"id", "answer", "solution"}),
        ),
        TaskSpec(
            "aime",
            "any AIME-style file (problem, answer): --data FILE",
            _math,
            "math",
            _AIME,
            optional=frozenset({"id", "solution"}),
        ),
    )
}
