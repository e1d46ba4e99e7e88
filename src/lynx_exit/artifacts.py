"""Files that matter: the one JSONL reader, atomic writes, content hashes and output-folder locks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

LOCK_FILE = ".lynx-exit.lock"


def _parse_line(path: Path, line_number: int, line: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """One JSONL record; a bad line raises naming file and line (chained to the JSON error, if any)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line_number}: invalid JSON: {exc.msg}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"{path}:{line_number}: record has no {', '.join(repr(key) for key in missing)}")
    return record


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a bad line raises naming file and line."""
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield line_number, _parse_line(path, line_number, line)


def read_appended_jsonl(
    path: Path, required: Sequence[str] = (), repair: bool = True
) -> list[dict[str, Any]]:
    """Records of a JSONL file a resumable job appends to ([] if it does not exist).

    A torn final line (no newline and not valid JSON: a crash or a full disk mid-write) is dropped
    with a warning; with `repair` (only the job that owns the folder) the file is rewritten
    atomically without it, so the next append starts on a fresh line. Any other bad line, or a
    record without a `required` key, is an error naming file and line.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_parse_line(path, line_number, line, required))
        except ValueError as exc:
            # The last piece has no newline after it: a line torn mid-write, not a bad record.
            if line_number < len(lines) or not isinstance(exc.__cause__, json.JSONDecodeError):
                raise
            logger.warning("%s:%d: dropping a torn final line (%d characters)", path, line_number, len(line))
            if repair:
                write_atomic(path, text[: len(text) - len(line)])
    return records


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and flush; readers drop a torn last line left by a crash."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        handle.flush()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it over `path`: never half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_tensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors` save through a temporary file and a rename, as `write_atomic`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def command_line() -> str:
    """The command that is running, as a shell would take it back (recorded in artifacts)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("cli.py", "__main__.py"):
        program = "lynx-exit"
    return shlex.join([program, *sys.argv[1:]])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderBusyError(RuntimeError):
    """Another run holds the output folder's lock."""


class FolderLock:
    """An exclusive, non-blocking lock on an output folder, held for one run.

    The operating system releases it when the process dies, so a crash never leaves a stale lock.
    """

    def __init__(self, folder: Path, what: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.what = folder, what
        self._lock = FileLock(str(folder / LOCK_FILE), timeout=0)

    def __enter__(self) -> FolderLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise FolderBusyError(
                f"{str(self.folder)!r} is in use by another {self.what} run (lock {LOCK_FILE}); "
                "wait for it to finish or choose another folder"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
