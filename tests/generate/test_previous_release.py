"""A run begun by the previous release, killed, and resumed by this one: the lines that release
committed are kept as it wrote them (without ``format_version``), the new ones carry it, and the files
are otherwise an uninterrupted run's of this release, byte for byte. The previous release's lines are
this release's without ``format_version``, up to float32's rounding (its linears were MKL's sgemm,
this release's CPU linears are oneDNN's: the same tokens, numbers a few ulps apart). ``analyze`` and
``export`` read the previous release's files, and the resumed ones, as they read the same lines in
this release's format.

The previous release's package is taken from git (``git archive``), so this needs the repository's
history, as a clone has it."""

import math
import shutil
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from tests.helpers import analysis, as_previous_release, invoke, run_files, spawn, write_prompts

REPO = Path(__file__).resolve().parents[2]
#: The last commit of the previous release: the last before run files said their format version.
PREVIOUS_RELEASE = "dc96799269cf5e91cd4d2ad142d5070007f51789"
PROMPTS = [{"prompt": f"Count to {i} and then stop. " * (1 + i % 3)} for i in range(8)]


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("previous_release")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "qstar_cli"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def committed_samples(out: Path) -> int:
    try:
        return orjson.loads(run_files(out)[2].read_bytes())["counts"]["done"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return 0


def cut_copy(out: Path, samples: int, directory: Path) -> Path:
    """A copy of the run ``out`` in ``directory`` with its first ``samples`` samples alone; its main file."""
    directory.mkdir()
    for path, target in zip(run_files(out), run_files(directory / "run.jsonl")):
        shutil.copy(path, target)
    for path in run_files(directory / "run.jsonl")[:2]:
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:samples]))
    return directory / "run.jsonl"


def in_this_release_format(run: Path, directory: Path) -> Path:
    """A copy of the run ``run`` in ``directory`` whose sidecar lines all carry this release's
    ``format_version`` (the same data as this release writes it); its main file."""
    directory.mkdir()
    for path, target in zip(run_files(run), run_files(directory / "run.jsonl")):
        shutil.copy(path, target)
    sidecar = run_files(directory / "run.jsonl")[1]
    lines = sidecar.read_bytes().splitlines(keepends=True)
    sidecar.write_bytes(b"".join(line if line.startswith(b'{"format_version"') else b'{"format_version":2,' + line[1:] for line in lines))
    return directory / "run.jsonl"


def assert_equal_up_to_rounding(value, expected, path="") -> None:
    """The same JSON values, keys in the same order, floats to a relative 1e-4 (float32's rounding of
    other kernels, carried through a few operations)."""
    assert type(value) is type(expected), path
    if isinstance(value, dict):
        assert list(value) == list(expected), path
        for key in value:
            assert_equal_up_to_rounding(value[key], expected[key], f"{path}.{key}")
    elif isinstance(value, list):
        assert len(value) == len(expected), path
        for i, (v, e) in enumerate(zip(value, expected)):
            assert_equal_up_to_rounding(v, e, f"{path}[{i}]")
    elif isinstance(value, float):
        assert math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-6), (path, value, expected)
    else:
        assert value == expected, path


def exported(out: Path) -> bytes:
    train = out.with_name(out.stem + ".train.jsonl")
    assert invoke("export", out, "--output", train, "--include-truncated").exit_code == 0
    return train.read_bytes()


def test_a_run_of_the_previous_release_is_resumed_analysed_and_exported(previous_release, spread_model_dirs, tmp_path):
    theta, target = spread_model_dirs
    args = ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", write_prompts(tmp_path, PROMPTS),
            "--max-new-tokens", "120", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    reference, out = tmp_path / "ref.jsonl", tmp_path / "run.jsonl"
    assert spawn(args, reference).wait(timeout=300) == 0

    old = spawn(args, out, previous_release)
    while committed_samples(out) < 2 and old.poll() is None:  # killed once its manifest counts two
        time.sleep(0.01)
    old.kill()
    old.wait()
    committed = committed_samples(out)
    assert 2 <= committed < len(PROMPTS), "the previous release must be killed mid-run"
    assert all(b"format_version" not in path.read_bytes() for path in run_files(out))  # written by the previous release
    as_left = cut_copy(out, committed, tmp_path / "previous")  # what that release committed

    new = spawn(args, out)
    assert new.wait(timeout=300) == 0, new.stderr.read().decode()
    assert f"resuming: {committed} of {len(PROMPTS)}" in new.stdout.read().decode()
    assert run_files(out)[0].read_bytes() == run_files(reference)[0].read_bytes()
    lines = run_files(reference)[1].read_bytes().splitlines(keepends=True)
    previous_lines = run_files(as_left)[1].read_bytes().splitlines(keepends=True)
    assert run_files(out)[1].read_bytes() == b"".join(previous_lines) + b"".join(lines[committed:])
    for previous, line in zip(previous_lines, as_previous_release(b"".join(lines[:committed])).splitlines(), strict=True):
        assert_equal_up_to_rounding(orjson.loads(previous), orjson.loads(line))

    for run in (as_left, out):
        like = in_this_release_format(run, tmp_path / f"{run.parent.name}_as_this_release")
        assert analysis(run_files(run)[1]) == analysis(run_files(like)[1])
        assert exported(run) == exported(like)
