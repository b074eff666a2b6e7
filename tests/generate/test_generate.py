"""``qstar generate`` end to end on tiny models: files, resume, refusals and bad input."""

import json
import signal
import time

import datasets
import numpy as np
import pytest
import yaml

from qstar_cli.engine.models import load_model, resolve_device
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.runfiles.writer import SUMMARY_FIELDS
from qstar_cli.testing.tiny import build_tiny_model
from tests.helpers import (
    PROMPTS,
    VALID,
    as_if_killed_after,
    cli,
    count_lines,
    file_bytes,
    kill_at_random_moments,
    one_line_error,
    paths,
    read_lines,
    spawn,
    swapped_tokenizer,
)


def test_generate_writes_what_the_sampler_samples(base_args, tiny_model_dirs, tmp_path):
    out = tmp_path / "run.jsonl"
    result = cli(*base_args, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "8/8 samples" in result.output and "1 empty prompt, 1 missing prompt" in result.output
    main_path, side_path, meta_path = paths(out)
    main, side = read_lines(main_path), read_lines(side_path)
    assert [r["sample_idx"] for r in main] == [r["sample_idx"] for r in side] == VALID
    assert [r["original_id"] for r in main] == VALID
    # Both files load as they are with the datasets library.
    assert datasets.load_dataset("json", data_files=str(main_path), split="train").num_rows == 8
    assert datasets.load_dataset("json", data_files=str(side_path), split="train").num_rows == 8
    meta = json.loads(open(meta_path).read())
    assert meta["status"] == "complete" and meta["counts"]["done"] == 8
    assert meta["counts"]["skipped"] == {"empty prompt": 1, "missing prompt": 1}

    # The same slots and schedule through the Python API give the same samples, value for value.
    device = resolve_device("cpu")
    theta, target = (load_model(d, device, __import__("torch").float32) for d in tiny_model_dirs)
    sampler = DualModelSampler(theta, target, theta_format="plain", max_new_tokens=16)
    conversations = [PROMPTS[i]["messages"] for i in VALID]
    results = sampler.generate(conversations, VALID, batch_size=3)
    for line, sidecar, expected in zip(main, side, results):
        assert line["messages"] == [*PROMPTS[expected.sample_idx]["messages"], {"role": "assistant", "content": expected.text}]
        assert line["finish_reason"] == sidecar["finish_reason"] == expected.finish_reason
        assert sidecar["per_token"] == expected.per_token
        assert sidecar["prompt_ids_theta"] == expected.prompt_ids_theta
        assert sidecar["prompt_ids_t"] == expected.prompt_ids_t
        assert sidecar["num_tokens"] == len(expected.token_ids) == len(sidecar["per_token"]["alpha"])
        for name in SUMMARY_FIELDS:
            values = np.array(expected.per_token[name])
            assert sidecar[f"{name}_mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            assert sidecar[f"{name}_std"] == pytest.approx(values.std(), rel=1e-9, abs=1e-12)
            assert (sidecar[f"{name}_min"], sidecar[f"{name}_max"]) == (values.min(), values.max())
        for name in ("logp_theta", "logp_t", "logp_q"):
            assert sidecar[f"{name}_sum"] == pytest.approx(sum(expected.per_token[name]), rel=1e-12)


def test_diagnostics_levels(base_args, tmp_path):
    """Each level does only the work it keeps, and draws the same tokens: the same main file, and at
    ``summary`` the same sidecar lines as ``full`` but for the arrays and ids."""
    args = (*base_args, "--num-samples", "4", "--draft-k", "2")
    for level in ("full", "summary", "none"):
        assert cli(*args, "--diagnostics", level, "--output", str(tmp_path / f"{level}.jsonl")).exit_code == 0
    main = [(tmp_path / f"{level}.jsonl").read_bytes() for level in ("full", "summary", "none")]
    assert main[0] == main[1] == main[2]
    full, summary = (read_lines(tmp_path / f"{level}.diagnostics.jsonl") for level in ("full", "summary"))
    arrays = ("per_token", "prompt_ids_theta", "prompt_ids_t")
    assert summary == [{k: v for k, v in line.items() if k not in arrays} for line in full]
    assert "alpha_mean" in summary[0] and "logp_q_sum" in summary[0] and "per_token" in full[0]
    assert not (tmp_path / "none.diagnostics.jsonl").exists() and len(read_lines(tmp_path / "none.jsonl")) == len(full) > 1


def test_config_file_and_flag_precedence(base_args, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"temperature": 0.5, "seed": 3, "top-k": 5, "num_samples": 2}))
    out = tmp_path / "c.jsonl"
    assert cli(*base_args, "--config", str(config), "--seed", "0", "--output", str(out)).exit_code == 0
    settings = json.loads(open(paths(out)[2]).read())["config"]
    assert (settings["temperature"], settings["seed"], settings["top_k"], settings["num_samples"]) == (0.5, 0, 5, 2)
    config.write_text("temprature: 0.5\n")
    result = cli(*base_args, "--config", str(config), "--output", str(out))
    assert result.exit_code == 2 and "unknown setting 'temprature'" in result.output


def test_resume_refusals_and_overwrite(base_args, tmp_path):
    out = tmp_path / "r.jsonl"
    assert cli(*base_args, "--output", str(out)).exit_code == 0
    first = file_bytes(out)
    result = cli(*base_args, "--output", str(out), "--temperature", "0.7")
    assert result.exit_code == 2
    assert "temperature (1.0 -> 0.7)" in result.output and "--overwrite" in result.output
    # Batch size and device are not part of the configuration: a finished run stays finished.
    result = cli(*base_args, "--output", str(out), "--batch-size", "5")
    assert result.exit_code == 0 and "resuming: 8 of 8" in result.output and file_bytes(out) == first
    # --overwrite starts afresh: the files equal those of a fresh run with the new settings.
    assert cli(*base_args, "--output", str(out), "--seed", "1", "--overwrite").exit_code == 0
    assert cli(*base_args, "--output", str(tmp_path / "fresh.jsonl"), "--seed", "1").exit_code == 0
    assert file_bytes(out) == file_bytes(tmp_path / "fresh.jsonl") != first


def test_torn_lines_are_repaired(base_args, tmp_path):
    out = tmp_path / "t.jsonl"
    assert cli(*base_args, "--output", str(out)).exit_code == 0
    complete = file_bytes(out)
    main_path, side_path, _ = paths(out)
    # A crash mid-write, after the commit of 6 samples: the main file's last line is torn, the
    # sidecar lacks two samples (one of them torn).
    as_if_killed_after(out, 6)
    with open(main_path, "r+b") as f:
        f.truncate(len(complete[0]) - 25)
    lines = complete[1].splitlines(keepends=True)
    open(side_path, "wb").write(b"".join(lines[:-2]) + lines[-2][:40])
    result = cli(*base_args, "--output", str(out))
    assert result.exit_code == 0 and "resuming: 6 of 8" in result.output
    assert file_bytes(out) == complete


def test_foreign_output_refused(base_args, tmp_path):
    out = tmp_path / "foreign.jsonl"
    out.write_text('{"not": "ours"}\n')
    result = cli(*base_args, "--output", str(out))
    assert result.exit_code == 2 and "without a manifest" in result.output


def test_bad_input_exit_2_with_one_line(base_args, tiny_tokenizer, tmp_path):
    args = base_args + ["--output", str(tmp_path / "x.jsonl")]
    missing = str(tmp_path / "nope.jsonl")
    one_line_error(cli(*args, "--dataset", missing), "dataset not found", "nope.jsonl")
    one_line_error(cli(*args, "--model-t", "no-such-org/no-such-model"), "cannot load model", "no-such-org/no-such-model")
    one_line_error(cli(*args, "--model-theta", str(tmp_path / "m.gguf")), "model file not found")
    swapped, by_id = swapped_tokenizer(tiny_tokenizer)
    build_tiny_model(swapped, seed=5).save_pretrained(tmp_path / "swapped")
    swapped.save_pretrained(tmp_path / "swapped")
    one_line_error(cli(*args, "--model-t", str(tmp_path / "swapped")), "do not share a vocabulary", "token id 100")
    one_line_error(cli(*args, "--adapter", "deepscaler"), "needs column 'problem'", "columns present: messages, id")
    one_line_error(cli(*args, "--top-p", "0"), "top_p")
    one_line_error(cli(*args, "--alpha-method", "magic"), "unknown alpha method")
    one_line_error(cli(*args, "--diagnostics", "all"), "--diagnostics")
    one_line_error(cli(*args, "--config", str(tmp_path / "none.yaml")), "cannot read config")
    one_line_error(cli("--dataset", "x"), "--model-theta is required")


# --- Processes: locks, kill -9 and SIGTERM ---------------------------------------------------------


@pytest.fixture(scope="module", params=["plain", "plain-none", "speculative-summary", "pair-teacher-topk"])
def slow_args(spread_model_dirs, prompts_file, request):
    """Long responses of spread lengths on 2 slots: samples finish out of order (plain sampling,
    and speculative sampling, whose rounds a resumed run replays, drafted by pi_theta or by a pair
    keeping pi_t's top-K), at each diagnostics level."""
    theta, target = spread_model_dirs
    drafting = {
        "plain": [],
        "plain-none": ["--diagnostics", "none"],
        "speculative-summary": ["--draft-k", "auto", "--diagnostics", "summary"],
        "pair-teacher-topk": [
            "--draft-k",
            "3",
            "--draft",
            "pair",
            "--draft-model-theta",
            theta,
            "--draft-model-t",
            target,
            "--teacher-topk",
            "7",
        ],
    }[request.param]
    return ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", prompts_file,
            "--max-new-tokens", "120", "--batch-size", "2", "--device", "cpu", *drafting]  # fmt: skip


@pytest.fixture(scope="module")
def reference(slow_args, tmp_path_factory):
    """The files of an uninterrupted run in a separate process, and its samples' lengths."""
    out = tmp_path_factory.mktemp("reference") / "ref.jsonl"
    proc = spawn(slow_args, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    files = file_bytes(out)
    if files[1] is not None:  # --diagnostics none writes no sidecar (its tokens are plain's)
        lengths = [r["num_tokens"] for r in read_lines(paths(out)[1])]
        assert len(set(lengths)) > 4 and min(lengths) < 60 and max(lengths) > 100, "lengths must spread"
    assert files[0]
    return files


def test_kill_9_and_resume_is_byte_identical(slow_args, reference, tmp_path):
    rng = np.random.default_rng(20261125)
    out = tmp_path / "k.jsonl"
    interrupted = kill_at_random_moments(lambda: spawn(slow_args, out), out, rng, max_delay=0.8)
    assert interrupted >= 2  # otherwise the test did not test resuming
    proc = spawn(slow_args, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert file_bytes(out) == reference


#: Stopping and locking do not depend on how tokens are drawn: those tests run with plain sampling alone.
plain_sampling_only = pytest.mark.parametrize("slow_args", ["plain"], indirect=True)


@plain_sampling_only
def test_sigterm_stops_cleanly_and_resumes(slow_args, reference, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = spawn(slow_args, out)
    while count_lines(out) < 1 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    stderr = proc.stderr.read().decode()
    assert "re-run the same command to resume" in stderr and "Traceback" not in stderr
    meta = json.loads(open(paths(out)[2]).read())
    assert meta["status"] == "interrupted" and meta["counts"]["done"] == count_lines(out) < 8
    proc = spawn(slow_args, out)
    assert proc.wait(timeout=300) == 0
    assert file_bytes(out) == reference


@plain_sampling_only
def test_second_writer_refused(slow_args, tmp_path):
    out = tmp_path / "l.jsonl"
    proc = spawn(slow_args, out)
    while count_lines(out) < 1 and proc.poll() is None:
        time.sleep(0.01)
    try:
        result = cli(*slow_args, "--output", str(out))
        one_line_error(result, "another qstar process is writing")
    finally:
        proc.kill()
        proc.wait()
