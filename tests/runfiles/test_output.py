"""The one way every command writes a file (:mod:`qstar_cli.runfiles.output`): a run's files, a file
under a held lock and the command's inputs refused; the output replaced whole or not at all, under
its lock, through a temporary that nothing leaves behind."""

import os

import filelock
import pytest

from qstar_cli.errors import QstarInputError
from qstar_cli.runfiles.format import OutputPaths
from qstar_cli.runfiles.output import OutputBusy, atomic_output, check_output, lock_held


def test_an_output_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")
    with pytest.raises(RuntimeError), atomic_output(out) as f:
        f.write(b"half of the new")
        raise RuntimeError("the disk failed")
    assert out.read_bytes() == b"old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    with atomic_output(out) as f:
        f.write(b"new\n")
        assert out.read_bytes() == b"old\n"  # nothing of the new one shows before the end
    assert out.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["out.jsonl"]


def test_without_unnamed_files_a_killed_writers_temporary_is_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_TMPFILE")  # a file system without them (macOS, NFS)
    out = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.4242.partial").write_bytes(b"what a kill -9 left")
    (tmp_path / ".out.jsonl.notes.partial").write_bytes(b"not a temporary of ours")
    with atomic_output(out) as f:
        f.write(b"new\n")
        assert {p.name for p in tmp_path.iterdir()} == {f".out.jsonl.{os.getpid()}.partial", ".out.jsonl.notes.partial", "out.jsonl.lock"}
    assert {p.name for p in tmp_path.iterdir()} == {"out.jsonl", ".out.jsonl.notes.partial"} and out.read_bytes() == b"new\n"


def test_a_second_writer_and_a_runs_files_are_refused(tmp_path):
    out = tmp_path / "weights.jsonl"
    with filelock.FileLock(f"{out}.lock", timeout=0):  # another process writing it
        assert lock_held(tmp_path / "weights.jsonl.lock")
        with pytest.raises(OutputBusy, match="is being written by another qstar process"):
            check_output(out, "--output")
    assert not lock_held(tmp_path / "weights.jsonl.lock") and not lock_held(tmp_path / "absent.lock")
    run = OutputPaths(tmp_path / "run.jsonl")
    run.meta.write_text("{}")
    for path, kind in ((run.main, "the main file"), (run.diagnostics, "the sidecar"), (run.meta, "the manifest"), (run.lock, "the lock")):
        assert OutputPaths.of(path) == run
        with pytest.raises(QstarInputError, match=f"--output {path} is {kind} of the run {run.main}"):
            check_output(path, "--output")
    grader = tmp_path / "grader.py"
    with pytest.raises(QstarInputError, match="would overwrite the input"):
        check_output(grader, "--output", [grader])
