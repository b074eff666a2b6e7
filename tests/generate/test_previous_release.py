"""A run begun by the previous release, killed, and resumed by this one ends as an uninterrupted run
of this one: the same samples byte for byte, the per-token numbers to float rounding (the attention
kernels changed); the fingerprint, the files and the schedule are compatible across the release.

The previous release's package is taken from git (``git archive``), so this needs the repository's
history, as a clone has it."""

import subprocess
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.helpers import run_files, spawn, write_prompts

REPO = Path(__file__).resolve().parents[2]
#: The last commit of the previous release (before the reliability work of issues 21 and 25).
PREVIOUS_RELEASE = "8a5728c"
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


def test_a_run_of_the_previous_release_resumes_byte_identical(previous_release, spread_model_dirs, tmp_path):
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
    committed = out.read_bytes().count(b"\n")
    assert 2 <= committed < len(PROMPTS), "the previous release must be killed mid-run"
    assert b"weights_sha256" not in run_files(out)[2].read_bytes()  # written by the previous release

    new = spawn(args, out)
    assert new.wait(timeout=300) == 0, new.stderr.read().decode()
    assert "resuming: " in new.stdout.read().decode()
    # The samples, byte for byte; the per-token numbers to float rounding: this release attends
    # through another kernel path (packed grouped-query heads, an additive mask), which moves them
    # in the last bits (the samples the previous release wrote carry its rounding).
    assert run_files(out)[0].read_bytes() == run_files(reference)[0].read_bytes()
    resumed, fresh = ([orjson.loads(line) for line in run_files(path)[1].open("rb")] for path in (out, reference))
    assert len(resumed) == len(fresh) == len(PROMPTS)
    for got, want in zip(resumed, fresh):
        assert got.keys() == want.keys() and got["per_token"]["token_id"] == want["per_token"]["token_id"]
        for name, values in want["per_token"].items():
            np.testing.assert_allclose(got["per_token"][name], values, rtol=1e-5, atol=1e-5, err_msg=name)
