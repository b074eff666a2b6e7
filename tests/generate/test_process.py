"""The process around a run: a closed standard output, SIGTERM during start-up, repeated Ctrl-C, what a
failed run leaves, and the settings that only the command line can change. Each case failed before
(silent exit 1 or 143, a traceback, a manifest left ``running``, files and directories left behind)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qstar_cli.generate.config import GenerateConfig
from qstar_cli.generate.engines import LocalEngine
from qstar_cli.runfiles.writer import CheckpointedWriter
from tests.helpers import invoke, one_line_error, run_files, tiny_run_flags, write_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"prompt": f"Tell me a long story about the number {i}."} for i in range(24)]


@pytest.fixture(scope="module")
def flags(spread_model_dirs, tmp_path_factory):
    """A run long enough to be stopped in the middle (24 samples, up to 120 tokens, 2 slots)."""
    return tiny_run_flags(spread_model_dirs, write_prompts(tmp_path_factory.mktemp("process"), ROWS), 120, 2)


def start(flags, out, **popen):
    return subprocess.Popen([sys.executable, "-m", "qstar_cli", "generate", *flags, "--output", str(out)], **popen)


def manifest(out) -> dict:
    return json.loads(run_files(out)[2].read_text())


def test_a_closed_stdout_stops_the_run_like_ctrl_c(flags, tmp_path):
    """``qstar generate ... | head -2``: the samples committed are kept, the status recorded, one line said."""
    out = tmp_path / "p.jsonl"
    proc = start(flags, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(2):
        proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 130
    [line] = [ln for ln in proc.stderr.read().decode().splitlines() if not ln.startswith("progress: ")]
    done = manifest(out)["counts"]["done"]
    assert line == f"standard output was closed: {done} of 24 samples are saved; re-run the same command to resume"
    assert manifest(out)["status"] == "interrupted" and 0 < done < 24
    assert len(out.read_bytes().splitlines()) == done


@pytest.mark.parametrize("delay", [0.2, 1.0])
def test_sigterm_during_start_up_exits_130(flags, tmp_path, delay):
    out = tmp_path / "t.jsonl"
    proc = start(flags, out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)  # still importing
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert "Traceback" not in proc.stderr.read().decode()
    assert not tmp_path.joinpath("t.jsonl.lock").exists()


def test_repeated_ctrl_c_ends_without_a_traceback(flags, tmp_path):
    out = tmp_path / "c.jsonl"
    proc = start(flags, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while b"samples," not in proc.stdout.readline():  # the first commit
        pass
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    assert proc.wait(timeout=120) == 130
    stderr = proc.stderr.read().decode()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def test_a_failed_run_leaves_no_lock_and_no_new_directory(flags, tmp_path):
    """Refused after the output was locked (no usable prompt once the models loaded): nothing is left."""
    empty_template = tmp_path / "empty.jinja"
    empty_template.write_text("")
    out = tmp_path / "new" / "deeper" / "o.jsonl"
    result = invoke("generate", *flags, "--theta-format", empty_template, "--output", out)
    one_line_error(result, "no usable prompt", "prompt renders to no tokens for pi_theta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jinja"]


def test_rows_that_render_to_no_tokens_are_skipped_and_counted(flags, tmp_path):
    template = tmp_path / "odd.jinja"  # renders the rows of even numbers to nothing
    template.write_text("{% if messages[-1].content[-2] in '13579' %}{{ messages[-1].content }}{% endif %}")
    result = invoke("generate", *flags, "--theta-format", template, "--max-new-tokens", "2", "--output", tmp_path / "o.jsonl")
    assert result.exit_code == 0, result.output
    assert "(rows skipped: 12 prompt renders to no tokens for pi_theta)" in result.stdout
    assert manifest(tmp_path / "o.jsonl")["counts"]["skipped"] == {"prompt renders to no tokens for pi_theta": 12}


def test_no_overwrite_turns_off_a_config_files_overwrite(flags, tmp_path):
    config, out = tmp_path / "c.yaml", tmp_path / "o.jsonl"
    config.write_text("overwrite: true\n")
    assert invoke("generate", *flags, "--max-new-tokens", "2", "--num-samples", "2", "--output", out).exit_code == 0
    before = [p.read_bytes() for p in run_files(out)[:2]]
    result = invoke(
        "generate", *flags, "--max-new-tokens", "2", "--num-samples", "3", "--config", config, "--no-overwrite", "--output", out
    )
    assert result.exit_code == 0 and "resuming: 2 of 3" in result.stdout, result.output
    assert all(p.read_bytes().startswith(b) for p, b in zip(run_files(out)[:2], before))


def test_a_manifest_that_cannot_be_written_is_said(flags, tmp_path, monkeypatch):
    """A full disk that takes the manifest too: the one line says so, instead of the docs' `failed`."""
    commits = {"n": 0}
    original = CheckpointedWriter.commit

    def commit(self):
        commits["n"] += 1
        if commits["n"] == 3:
            monkeypatch.setattr(
                CheckpointedWriter, "write_meta", lambda self, meta: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            )
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self)

    monkeypatch.setattr(CheckpointedWriter, "commit", commit)
    out = tmp_path / "f.jsonl"
    line = one_line_error(invoke("generate", *flags, "--output", out), "No space left on device", code=1)
    assert "the manifest f.meta.json could not be updated (it still says running)" in line
    assert manifest(out)["status"] == "running"


def test_slots_are_capped_at_the_samples():
    config = GenerateConfig(model_theta="demo", model_t="demo", dataset="d.jsonl", batch_size=5000)
    engine = LocalEngine(config)
    assert engine.plan_slots([([1], [1])] * 3, 3) is None and engine.slots == 3


def test_keywords_take_any_case():
    config = GenerateConfig(model_theta="DEMO", model_t="demo", dataset="d.jsonl", compile="ON", diagnostics="FULL",
                            scheduler="Static", alpha_method="KL_Symmetry", dtype="Float32", draft="THETA", adapter="DeepScaleR",
                            theta_format="Plain", batch_size="AUTO", engine="Local")  # fmt: skip
    values = (config.model_theta, config.compile, config.diagnostics, config.scheduler, config.alpha_method, config.dtype,
              config.draft, config.adapter, config.theta_format, config.batch_size, config.engine)  # fmt: skip
    assert values == ("demo", "on", "full", "static", "kl_symmetry", "float32", "theta", "deepscaler", "plain", "auto", "local")


@pytest.mark.parametrize("command", [[], ["generate"], ["analyze"], ["compare"], ["grade"]])
def test_help_shows_no_python_types(command):
    """Flags show no value, arguments their name in capitals (typer 0.27 and later printed <bool>,
    <list[Path]> and {sidecar})."""
    result = subprocess.run(
        [sys.executable, "-m", "qstar_cli", *command, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert result.returncode == 0 and "Usage: qstar" in result.stdout, result.stderr
    for marker in ("<bool>", "<list", "<path>"):
        assert marker not in result.stdout, (marker, result.stdout)
    [usage] = [line for line in result.stdout.splitlines() if "Usage: qstar" in line]
    assert "{" not in usage, usage
