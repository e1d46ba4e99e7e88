"""Tasks as data: each task's source (shipped file, Hugging Face dataset, or the user's file), columns,
parser and grader in one table (`sources`), loading by name (`loaders`), and grading (`grading`)."""

from lynx_exit.tasks.loaders import (
    REASONING_SUFFIX,
    Problem,
    TaskDataError,
    download,
    get_task,
    load_task,
    task_rows,
    task_table,
)
from lynx_exit.tasks.sources import DATA_DIR, MATH_SUBJECTS, TASKS, HubSource, TaskSpec

__all__ = [
    "DATA_DIR",
    "MATH_SUBJECTS",
    "REASONING_SUFFIX",
    "TASKS",
    "HubSource",
    "Problem",
    "TaskDataError",
    "TaskSpec",
    "download",
    "get_task",
    "load_task",
    "task_rows",
    "task_table",
]
