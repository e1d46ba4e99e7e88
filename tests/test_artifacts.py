"""The JSONL reader, atomic writes and output-folder locks shared by every resumable job."""

import pytest

from lynx_exit.artifacts import FolderBusyError, FolderLock, read_appended_jsonl, write_jsonl_atomic


def test_torn_final_line_is_dropped_with_a_warning_and_the_file_repaired(tmp_path, caplog):
    """Reproduction: a half-written last record stopped the rerun with 'Expecting value' and no file name."""
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": [1, 2')
    with caplog.at_level("WARNING"):
        assert read_appended_jsonl(path, repair=False) == [{"a": 1}, {"a": 2}]
    assert "torn final line" in caplog.text and "records.jsonl:3" in caplog.text
    assert path.read_text().endswith("[1, 2")  # a reader that does not own the folder leaves it alone
    assert read_appended_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'  # the next append starts on a fresh line
    assert not list(tmp_path.glob("*.tmp"))


def test_a_bad_line_that_is_not_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"events.jsonl:2: invalid JSON"):
        read_appended_jsonl(path)
    assert path.read_text() == '{"a": 1}\n{"a": \n{"a": 3}\n'  # untouched


def test_a_record_without_a_required_key_names_file_line_and_key(tmp_path):
    """Reproduction: an event line without `shard` ended in a KeyError traceback."""
    path = tmp_path / "events.jsonl"
    path.write_text('{"shard": "s", "row": 1}\n{"row": 2}\n')
    with pytest.raises(ValueError, match=r"events.jsonl:2: record has no 'shard'"):
        read_appended_jsonl(path, required=("shard", "row"))


def test_atomic_rewrite_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("old\n")
    write_jsonl_atomic(path, [{"x": 1}, {"y": "é"}])
    assert path.read_text(encoding="utf-8") == '{"x": 1}\n{"y": "é"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.jsonl"]


def test_a_second_run_on_a_locked_folder_fails_at_once_and_the_lock_is_released(tmp_path):
    busy = pytest.raises(FolderBusyError, match=r"in use by another lynx-exit eval run")
    with FolderLock(tmp_path / "out", "lynx-exit eval"), busy, FolderLock(tmp_path / "out", "lynx-exit eval"):
        pass
    with FolderLock(tmp_path / "out", "lynx-exit eval"):  # released on exit
        pass
