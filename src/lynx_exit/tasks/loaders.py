"""Problems of a task by name: from its shipped file, from the Hugging Face Hub (`datasets`, with its
cache and offline mode), or from a file or folder the user gives (`--data`: JSONL, Parquet, or a
folder laid out like the Hub repository)."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lynx_exit.artifacts import iter_jsonl
from lynx_exit.tasks.grading import grade
from lynx_exit.tasks.sources import DATA_DIR, TASKS, HubSource, TaskSpec

REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_ID_KEYS = (
    "id",
    "ID",
    "unique_id",
)  # a file's own id column, where the task's mapping names none that is there


@dataclass(frozen=True)
class Problem:
    task: str
    problem_id: str
    question: str
    gold: str

    @property
    def prompt(self) -> str:
        """The user turn sent to the model (how-it-works §3 prompt)."""
        return self.question + REASONING_SUFFIX

    def grade(self, response: str) -> bool:
        return grade(self.task, response, self.gold)


class TaskDataError(ValueError):
    """A task's data cannot be read; the message says what to do."""


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} (lynx-exit tasks lists them)")
    return TASKS[name]


@dataclass
class _Record:
    where: str  # file:line, or dataset (config) row N: for messages
    data: dict[str, Any]
    columns: Mapping[str, str]
    default_id: str | None = None  # where the record has no id of its own


def load_task(
    name: str, path: str | Path | None = None, limit: int | None = None, offset: int = 0
) -> list[Problem]:
    """Problems of task `name`, records [offset, offset+limit) (per subject for `math-train`).

    Without `path`: the shipped file, else the task's Hub dataset (the `datasets` cache when offline).
    `path` may be a JSONL or Parquet file with the task's columns, or a folder laid out like the Hub
    repository."""
    spec = get_task(name)
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")
    stop = None if limit is None else offset + limit
    if path is None and spec.shipped is not None:
        path = DATA_DIR / spec.shipped
    if path is None:
        if spec.hub is None:
            raise ValueError(
                f"task {name!r} ships no data and has no Hub source: pass a JSONL or Parquet file with --data"
            )
        records = _hub_records(spec, spec.hub, None, limit, offset)
    else:
        path = Path(path)
        if path.is_dir():
            if spec.hub is None:
                raise ValueError(
                    f"task {name!r} has no Hub layout to read folder {str(path)!r}: pass a JSONL or Parquet "
                    "file"
                )
            records = _hub_records(spec, spec.hub, path, limit, offset)
        elif not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} for task {name!r} does not exist")
        elif path.suffix == ".parquet":
            records = itertools.islice(_parquet_records(path, spec.columns), offset, stop)
        else:
            lines = (_Record(f"{path}:{line}", record, spec.columns) for line, record in iter_jsonl(path))
            records = itertools.islice(lines, offset, stop)
    return _problems(spec, records, offset)


def _problems(spec: TaskSpec, records: Iterator[_Record], offset: int) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, str] = {}  # resumable jobs key their outputs by problem id
    for index, record in enumerate(records, start=offset):
        try:
            fields = _fields(record.data, record.columns, spec.optional)
            question, gold = spec.parse(fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{record.where}: not a {spec.name} record ({exc})") from exc
        given = fields.get("id")
        if given is None:
            given = next((record.data[key] for key in _ID_KEYS if record.data.get(key) is not None), None)
        problem_id = str(given) if given is not None else (record.default_id or f"{spec.name}-{index}")
        if problem_id in seen:
            raise ValueError(f"{record.where}: problem id {problem_id!r} repeats {seen[problem_id]}")
        line = record.where.rsplit(":", 1)[-1]
        seen[problem_id] = f"line {line}" if line.isdigit() else record.where
        problems.append(
            Problem(
                task=spec.name.removesuffix("-train"), problem_id=problem_id, question=question, gold=gold
            )
        )
    return problems


def _fields(data: Mapping[str, Any], columns: Mapping[str, str], optional: frozenset[str]) -> dict[str, Any]:
    fields = {}
    for role, column in columns.items():
        if data.get(column) is not None:
            fields[role] = data[column]
        elif role not in optional:
            raise KeyError(column)
    return fields


def _parquet_records(path: Path, columns: Mapping[str, str]) -> Iterator[_Record]:

    table = _load_local("parquet", data_files=str(path), split="train")
    for row, data in enumerate(table):
        yield _Record(f"{path} row {row}", dict(data), columns)


def _load_local(*args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset` on a user's file or folder, in memory and with a cache of its own: the shared
    cache keys local data by folder name, so two folders of the same name would read each other's rows and
    schema."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="lynx-exit-data-") as cache:
        return datasets.load_dataset(*args, **kwargs, cache_dir=cache, keep_in_memory=True)


# -- the Hub ------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def download_hint(spec: TaskSpec) -> str:
    columns = ", ".join(c for r, c in spec.columns.items() if r not in spec.optional)
    return (
        f"run `lynx-exit tasks --download {spec.name}` once with network access (it fills the datasets "
        "cache, "
        f"which is read offline afterwards), or pass the data yourself: --data FILE (JSONL or Parquet with "
        f"columns {columns})"
    )


def _load(spec: TaskSpec, hub: HubSource, folder: Path | None, config: str | None) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = str(folder) if folder is not None else hub.dataset
    try:
        if folder is not None:
            return _load_local(where, config, split=hub.split)
        return datasets.load_dataset(hub.dataset, config, split=hub.split, revision=hub.revision)
    except DatasetNotFoundError as exc:
        if "gated" in str(exc):
            raise TaskDataError(
                f"task {spec.name!r}: dataset {hub.dataset} is gated on the Hub. Accept its terms at "
                f"{hub.url} with your "
                "account, then log in on this machine with `hf auth login` (or set HF_TOKEN), and run again"
            ) from None
        raise TaskDataError(f"task {spec.name!r}: dataset {where} was not found ({exc})") from None
    except ConnectionError as exc:
        state = (
            "nothing of it is cached here and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
            if _offline()
            else f"the Hub could not be reached ({exc})"
        )
        raise TaskDataError(
            f"task {spec.name!r} reads {hub.dataset} from the Hugging Face Hub, but {state}: "
            f"{download_hint(spec)}"
        ) from None
    except FileNotFoundError as exc:
        raise TaskDataError(
            f"task {spec.name!r}: {where} has no split {hub.split!r}"
            f"{f' in config {config!r}' if config else ''} ({exc})"
        ) from None


def _hub_records(
    spec: TaskSpec, hub: HubSource, folder: Path | None, limit: int | None, offset: int
) -> Iterator[_Record]:
    columns = spec.hub_columns()
    tables = []
    for config in hub.configs:
        table = _load(spec, hub, folder, config)
        missing = [
            c for role, c in columns.items() if role not in spec.optional and c not in table.column_names
        ]
        if missing:
            name = f"{folder or hub.dataset}{f' ({config})' if config else ''}"
            raise TaskDataError(
                f"task {spec.name!r}: {name} has no column {missing[0]!r}; its columns are "
                f"{', '.join(table.column_names)}"
            )
        tables.append((config, table))
    stop = None if limit is None else offset + limit

    def where(config: str | None, row: int) -> str:
        return f"{folder or hub.dataset}{f' ({config})' if config else ''} row {row}"

    if hub.per_config_permutation_seed is None:
        rows = ((config, table, row) for config, table in tables for row in range(len(table)))
        for config, table, row in itertools.islice(rows, offset, stop):
            yield _Record(where(config, row), dict(table[row]), columns)
        return
    # The official LYNX selection: one numpy generator seeded once, a permutation of each subject's rows in
    # subject order, and rows [offset, offset + limit) of each permutation (disjoint ranges per subject).
    rng = np.random.default_rng(hub.per_config_permutation_seed)
    for config, table in tables:
        for row in rng.permutation(len(table)).tolist()[offset:stop]:
            yield _Record(where(config, row), dict(table[row]), columns, default_id=f"{config}-{row}")


# -- the table `lynx-exit tasks` prints -------------------------------------------------------------------
GRADERS = {"number": "number (integers exact)", "math": "math-verify (symbolic)", "choice": "choice letter"}


def cached_datasets() -> dict[str, str]:
    """Hub datasets in this machine's Hugging Face cache: repo id -> size on disk."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir()
    except Exception:  # no cache folder yet, or one that cannot be read: nothing is cached
        return {}
    return {repo.repo_id: repo.size_on_disk_str for repo in info.repos if repo.repo_type == "dataset"}


def _source(spec: TaskSpec) -> str:
    if spec.hub is None:
        return "your file: `--data FILE`"
    configs = [c for c in spec.hub.configs if c]
    where = f"[{spec.hub.dataset}]({spec.hub.url})" + (
        f" ({', '.join(configs)})" if len(configs) == 1 else f" ({len(configs)} configs)" if configs else ""
    )
    hub = f"{where}, split {spec.hub.split}"
    return f"shipped (`{spec.shipped}`); Hub: {hub}" if spec.shipped else hub


def task_rows(with_cache: bool = True) -> list[dict[str, Any]]:
    """One row per task: name, summary, source, grader, and (with_cache) whether and how it reads offline."""
    cached = cached_datasets() if with_cache else {}
    rows = []
    for spec in TASKS.values():
        row: dict[str, Any] = {
            "task": spec.name,
            "summary": spec.summary,
            "source": _source(spec),
            "grader": GRADERS[spec.grader],
            "paper": spec.paper,
        }
        if with_cache:
            if spec.shipped is not None:
                lines = sum(1 for line in (DATA_DIR / spec.shipped).read_text().splitlines() if line.strip())
                row["offline"], row["size"] = "yes (shipped)", f"{lines} problems"
            elif spec.hub is not None and spec.hub.dataset in cached:
                row["offline"], row["size"] = "yes (cached)", cached[spec.hub.dataset]
            elif spec.hub is not None:
                row["offline"], row["size"] = "after `lynx-exit tasks --download`", "—"
            else:
                row["offline"], row["size"] = "your file", "—"
        rows.append(row)
    return rows


def task_table(with_cache: bool = True) -> str:
    rows = task_rows(with_cache)
    keys = ["task", "summary", "source", "grader"] + (["offline", "size"] if with_cache else ["paper"])
    titles = {"paper": "in the LYNX paper"}
    out = ["| " + " | ".join(titles.get(k, k) for k in keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(row[k]) or "—" for k in keys) + " |" for row in rows]
    return "\n".join(out) + "\n"


def download(name: str) -> int:
    """Read a Hub task once (online) so that the `datasets` cache holds it; returns its number of problems."""
    spec = get_task(name)
    if spec.shipped is not None:
        raise ValueError(f"task {name!r} ships its data with lynx-exit; there is nothing to download")
    if spec.hub is None:
        raise ValueError(f"task {name!r} has no Hub source; it reads the file you pass with --data")
    return len(load_task(name))
