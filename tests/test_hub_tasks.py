"""Tasks by name from the Hub, without the network: each Hub task read from a folder laid out like its Hub
repository (README configs + Parquet files, the real column names) through the same `datasets` code path,
the official MATH-train selection, offline and gated errors, and the README's task table and recipe."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lynx_exit.cli import build_parser, main
from lynx_exit.tasks import MATH_SUBJECTS, TASKS, TaskDataError, load_task, task_table

README = Path(__file__).resolve().parent.parent / "docs" / "tasks.md"
CHOICES = {"label": ["A", "B", "C", "D", "E"], "text": ["bank", "park", "shop", "home", "school"]}

# A few rows per Hub task, in the dataset's own column names, and the (question start, gold) each must give.
ROWS = {
    "gsm8k": (
        [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}],
        ("Tom has 3", "7"),
    ),
    "gsm8k-train": ([{"question": "Ann has 2 pens.", "answer": "#### 1,200"}], ("Ann has 2", "1200")),
    "math500": (
        [
            {
                "problem": "Compute $\\frac{3}{4}+0$.",
                "solution": "It is $\\boxed{\\frac{3}{4}}$.",
                "answer": "\\frac{3}{4}",
                "subject": "Algebra",
                "level": 1,
                "unique_id": "test/algebra/1.json",
            }
        ],
        ("Compute", "\\frac{3}{4}"),
    ),
    "aime24": (
        [
            {
                "id": 60,
                "problem": "Find the number.",
                "solution": "...",
                "answer": "204",
                "url": "u",
                "year": "2024",
            }
        ],
        ("Find the", "204"),
    ),
    "aime25": ([{"problem": "Find $n$.", "answer": "70", "id": "0"}], ("Find $n$", "70")),
    "amc23": ([{"id": 0, "question": "What is $2+2$?", "answer": 4.0, "url": "u"}], ("What is", "4.0")),
    "csqa": (
        [
            {
                "id": "q1",
                "question": "Where do you keep money?",
                "question_concept": "money",
                "choices": CHOICES,
                "answerKey": "A",
            }
        ],
        ("Where do you keep money?\nChoices:\n(A) bank", "A"),
    ),
    "multiarith": (
        [{"question": "Debby had 32 candies and ate 35 of 74. How many are left?", "final_ans": "39"}],
        ("Debby had", "39"),
    ),
    "svamp": (
        [
            {
                "ID": "chal-1",
                "Body": "There are 87 oranges",
                "Question": "How many?",
                "Equation": "( 87 )",
                "Answer": 87.0,
                "Type": "Addition",
                "question_concat": "x",
            }
        ],
        ("There are 87 oranges. How many?", "87"),
    ),
}


def write_hub_folder(root: Path, task: str, rows_by_config: dict[str | None, list[dict]]) -> Path:
    """A folder laid out like the task's Hub repository: README.md front matter naming configs and data
    files."""
    hub = TASKS[task].hub
    assert hub is not None
    folder = root / hub.dataset
    lines = ["---", "configs:"]
    for config, rows in rows_by_config.items():
        name = config or "default"
        (folder / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / name / f"{hub.split}-00000-of-00001.parquet")
        lines += [
            f"- config_name: {name}",
            "  data_files:",
            f"  - split: {hub.split}",
            f"    path: {name}/{hub.split}-*",
        ]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))
    return folder


@pytest.mark.parametrize("task", sorted(ROWS))
def test_each_hub_task_reads_a_folder_laid_out_like_its_hub_repository(tmp_path, task):
    rows, (question_start, gold) = ROWS[task]
    configs = TASKS[task].hub.configs
    folder = write_hub_folder(tmp_path, task, {configs[0]: rows})
    problems = load_task(task, folder)
    assert len(problems) == 1
    assert problems[0].question.startswith(question_start) and problems[0].gold == gold
    assert problems[0].grade(f"so \\boxed{{{gold}}}")


def math_train_folder(tmp_path, per_subject=30):
    rows = {
        subject: [
            {
                "problem": f"{subject} problem {i}",
                "level": "Level 1",
                "type": subject,
                "solution": f"so $\\boxed{{{i}}}$",
            }
            for i in range(per_subject + k)
        ]
        for k, subject in enumerate(MATH_SUBJECTS)
    }  # subjects of different sizes: the generator state must carry over
    return write_hub_folder(tmp_path, "math-train", rows), rows


def test_math_train_takes_the_official_per_subject_ranges(tmp_path):
    folder, rows = math_train_folder(tmp_path)
    train = load_task("math-train", folder, limit=10, offset=0)
    calib = load_task("math-train", folder, limit=10, offset=10)
    assert len(train) == len(calib) == 10 * len(MATH_SUBJECTS)
    assert not {p.problem_id for p in train} & {p.problem_id for p in calib}
    assert [p.problem_id for p in train] == [
        p.problem_id for p in load_task("math-train", folder, limit=10)
    ]  # stable
    # The selection of the official code: one generator seeded 42, a permutation per subject in subject order.
    rng = np.random.default_rng(42)
    want = []
    for subject in MATH_SUBJECTS:
        order = rng.permutation(len(rows[subject])).tolist()
        want += [f"{subject}-{i}" for i in order[10:20]]
    assert [p.problem_id for p in calib] == want
    first = calib[0]
    subject, row = first.problem_id.rsplit("-", 1)
    assert first.question == f"{subject} problem {row}" and first.gold == row and first.task == "math"


def test_a_missing_column_names_the_columns_there_are(tmp_path):
    folder = write_hub_folder(tmp_path, "amc23", {None: [{"id": 0, "problem": "p", "answer": "1"}]})
    with pytest.raises(TaskDataError) as info:
        load_task("amc23", folder)
    assert (
        str(info.value)
        == f"task 'amc23': {folder} has no column 'question'; its columns are id, problem, answer"
    )


def test_offline_with_nothing_cached_says_what_to_run(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lynx_exit.cli",
            "eval",
            "--model",
            "reference",
            "--task",
            "math500",
            "--methods",
            "never",
            "--out",
            str(tmp_path / "e"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "lynx-exit eval: error: task 'math500' reads HuggingFaceH4/MATH-500 from the Hugging Face Hub, but "
        "nothing of it "
        "is cached here and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: run `lynx-exit tasks --download "
        "math500` once "
        "with network access (it fills the datasets cache, which is read offline afterwards), or pass the "
        "data yourself: "
        "--data FILE (JSONL or Parquet with columns problem, answer)"
    )
    assert not (tmp_path / "e").exists()


def test_a_gated_dataset_says_how_to_log_in(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def gated(path, *args, **kwargs):  # what `datasets` raises for a gated repository without a token
        raise DatasetNotFoundError(
            f"Dataset '{path}' is a gated dataset on the Hub. You must be authenticated to access it."
        )

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(TaskDataError) as info:
        load_task("aime24")
    assert str(info.value) == (
        "task 'aime24': dataset HuggingFaceH4/aime_2024 is gated on the Hub. Accept its terms at "
        "https://huggingface.co/datasets/HuggingFaceH4/aime_2024 with your account, then log in on this "
        "machine with "
        "`hf auth login` (or set HF_TOKEN), and run again"
    )


def test_shipped_tasks_never_touch_the_hub(monkeypatch):
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: pytest.fail("a shipped task called the Hub")
    )
    for name in ("gsm8k", "gsm8k-train", "multiarith", "svamp"):
        assert load_task(name, limit=2)


def test_data_as_parquet_file(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "3", "unique_id": "u1"}]), path)
    problem = load_task("math", path)[0]
    assert (problem.problem_id, problem.gold) == ("u1", "3")


def test_eval_runs_several_tasks_on_one_model(tmp_path):
    out = tmp_path / "e"
    assert (
        main(
            [
                "eval",
                "--model",
                "reference",
                "--task",
                "gsm8k,multiarith",
                "--num-problems",
                "2",
                "--methods",
                "never",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    for task in ("gsm8k", "multiarith"):
        summary = json.loads((out / task / "summary.json").read_text())
        assert summary["task"] == task and summary["settings"][0]["n"] == 2


def test_tasks_command_lists_every_task(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["task"] for row in rows] == list(TASKS)
    assert {row["task"]: row["offline"] for row in rows}["gsm8k"] == "yes (shipped)"


def test_readme_task_table_is_the_registry():
    text = README.read_text()
    start = text.index("| task | summary | source | grader | in the LYNX paper |")
    assert text[start : start + len(task_table(with_cache=False))] == task_table(with_cache=False)


def test_readme_hub_recipe_parses_with_the_task_names():
    text = README.read_text()
    block = text[text.index("<!-- hub-recipe -->") :]
    block = block[block.index("```bash") + len("```bash") : block.index("```", block.index("```bash") + 7)]
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("lynx-exit ")]
    assert len(commands) >= 5
    parser = build_parser()
    used = set()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        used |= set(getattr(args, "task", "").split(",")) - {""}
    assert used >= {"math-train", "math500", "aime24", "gsm8k"} and used <= set(TASKS)
    assert re.search(r"build-data .*--task math-train .*--offset 200", " ".join(commands))
