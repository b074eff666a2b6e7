"""``--engine ray`` on a real local Ray (2 CPUs, tiny models): the samples of one process, in its
order, whatever the replicas; a replica killed mid-run costs nothing; a stopped or killed driver resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from qstar_cli.cli import app
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.runfiles.writer import OutputPaths
from qstar_cli.testing.tiny import build_tiny_model
from tests.helpers import (
    count_lines,
    file_bytes,
    one_line_error,
    read_lines,
    spawn,
    swapped_tokenizer,
    tiny_run_flags,
    write_prompts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: 48 prompts of spread lengths: 6 groups of 8 on 2 slots.
PROMPTS = [{"messages": [{"role": "user", "content": f"Count to {i} and stop. " * (1 + i % 4)}]} for i in range(48)]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for the module; the runs below join it (in process, or by RAY_ADDRESS)."""
    ray = __import__("ray") if os.environ.get("CI") == "true" else pytest.importorskip("ray")  # CI must not skip
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_args(spread_model_dirs, tmp_path_factory):
    # Batch size 1 (groups of 4 prompts), so that a stop or a kill lands mid-run.
    return tiny_run_flags(spread_model_dirs, write_prompts(tmp_path_factory.mktemp("ray_data"), PROMPTS), 60, 1)


def generate(*args):
    return CliRunner().invoke(app, ["generate", *args])


def manifest(out):
    return json.loads(OutputPaths(out).meta.read_text())


@pytest.fixture(scope="module")
def reference(ray_address, ray_args, tmp_path_factory):
    """The files of an uninterrupted run on 2 replicas."""
    out = tmp_path_factory.mktemp("ray_reference") / "ray.jsonl"
    result = generate(*ray_args, "--engine", "ray", "--replicas", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_replicas_give_the_samples_of_one_process(ray_args, reference, tmp_path):
    local = tmp_path / "local.jsonl"
    assert generate(*ray_args, "--output", str(local)).exit_code == 0
    ray_side, local_side = read_lines(OutputPaths(reference).diagnostics), read_lines(OutputPaths(local).diagnostics)
    # Same samples in the same order: the tokens exactly (counter-based draws), the floats up to rounding
    # (the replicas' batches are other groups of prompts than the one process's).
    assert [r["sample_idx"] for r in ray_side] == [r["sample_idx"] for r in local_side] == list(range(48))
    assert [r["per_token"]["token_id"] for r in ray_side] == [r["per_token"]["token_id"] for r in local_side]
    lengths = [r["num_tokens"] for r in ray_side]
    assert min(lengths) < 20 and max(lengths) == 60, "lengths must spread"
    for ours, theirs in zip(ray_side, local_side):
        for name in ("alpha", "logp_theta", "logp_t", "logp_q", "kl_theta", "entropy_q"):
            np.testing.assert_allclose(ours["per_token"][name], theirs["per_token"][name], rtol=1e-4, atol=1e-5)
    assert [r["messages"] for r in read_lines(reference)] == [r["messages"] for r in read_lines(local)]

    meta = manifest(reference)
    engine = meta["sessions"][-1]["engine"]
    assert meta["status"] == "complete" and engine["name"] == "ray" and engine["replicas"] == 2
    assert len(engine["per_replica"]) == 2 and sum(r["samples"] for r in engine["per_replica"]) == 48
    assert all(r["tokens_per_s"] > 0 and r["device"] == "cpu" for r in engine["per_replica"])
    # A group's samples do not depend on the replica that made it: one replica writes the same bytes.
    one = tmp_path / "one.jsonl"
    assert generate(*ray_args, "--engine", "ray", "--replicas", "1", "--output", str(one)).exit_code == 0
    assert file_bytes(one) == file_bytes(reference)


def spawn_on_ray(args, out, ray_address):
    """The CLI on 2 replicas in a process of its own that joins the module's Ray; its output goes to
    ``OUT.log`` (a pipe nobody reads would block it once full)."""
    log = open(f"{out}.log", "wb")
    return spawn([*args, "--engine", "ray", "--replicas", "2"], out, stdout=log, stderr=subprocess.STDOUT,
                 env={**os.environ, "RAY_ADDRESS": ray_address})  # fmt: skip


def log_of(out):
    return open(f"{out}.log", "rb").read().decode(errors="replace")


def wait_for(condition, proc, out, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log_of(out)
        assert time.monotonic() < deadline, log_of(out)
        time.sleep(0.02)


def test_a_replica_killed_mid_run_costs_nothing(ray_address, ray_args, reference, tmp_path):
    out = tmp_path / "k.jsonl"
    proc = spawn_on_ray(ray_args, out, ray_address)
    meta_path = OutputPaths(out).meta

    def a_replica_reported():
        return meta_path.exists() and manifest(out)["sessions"][-1]["engine"]["per_replica"]

    wait_for(a_replica_reported, proc, out)
    meta = manifest(out)
    [pid] = meta["sessions"][-1]["engine"]["per_replica"][0]["pids"]
    assert meta["counts"]["done"] < 48, "the kill must come mid-run"
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, log_of(out)
    assert file_bytes(out) == file_bytes(reference)  # every sample once, as an unbroken run wrote it
    meta = manifest(out)
    assert meta["status"] == "complete" and meta["counts"]["done"] == 48
    # Ray restarted the replica, which ran the groups it held again.
    [killed] = [r for r in meta["sessions"][-1]["engine"]["per_replica"] if pid in r["pids"]]
    assert len(killed["pids"]) == 2


def test_a_stopped_or_killed_driver_resumes(ray_address, ray_args, reference, tmp_path):
    out = tmp_path / "d.jsonl"
    proc = spawn_on_ray(ray_args, out, ray_address)
    wait_for(lambda: count_lines(out) >= 8, proc, out)
    proc.send_signal(signal.SIGTERM)  # Ray's own SIGTERM handler would abort; the run's stops it after saving
    assert proc.wait(timeout=120) == 130, log_of(out)
    assert "re-run the same command to resume" in log_of(out)
    stopped = manifest(out)
    assert stopped["status"] == "interrupted" and stopped["counts"]["done"] == count_lines(out) < 48

    proc = spawn_on_ray(ray_args, out, ray_address)
    wait_for(lambda: manifest(out)["counts"]["done"] > stopped["counts"]["done"], proc, out)  # a commit of its own
    proc.kill()
    proc.wait()
    written = count_lines(out)
    assert written < 48, "the kill must come mid-run"
    # Resumed in this process (which joins the same Ray): the group it resumes in replays its written samples.
    result = generate(*ray_args, "--engine", "ray", "--replicas", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "resuming:" in result.output and file_bytes(out) == file_bytes(reference)
    sessions = manifest(out)["sessions"]
    assert len(sessions) == 3 and sessions[1]["resumed_from"] == stopped["counts"]["done"]
    assert stopped["counts"]["done"] < sessions[2]["resumed_from"] <= written


def test_the_launching_process_checks_the_models_without_their_weights(ray_address, ray_args, spread_model_dirs, tiny_tokenizer, tmp_path):
    theta, target = spread_model_dirs
    shapes = DualModelSampler.from_pretrained(theta, target, device="meta", theta_format="plain")
    loaded = DualModelSampler.from_pretrained(theta, target, device="cpu", theta_format="plain")
    assert all(p.is_meta for p in shapes.target.model.parameters())
    assert (shapes.vocab, shapes.context_limits) == (loaded.vocab, loaded.context_limits)
    conversation = [{"role": "user", "content": "Count to 3."}]
    assert shapes.encode_prompts(conversation) == loaded.encode_prompts(conversation)
    # A vocabulary mismatch is the user's error (exit 2), found before any replica starts.
    swapped, _ = swapped_tokenizer(tiny_tokenizer)
    build_tiny_model(swapped, seed=5).save_pretrained(tmp_path / "swapped")
    swapped.save_pretrained(tmp_path / "swapped")
    result = generate(*ray_args, "--engine", "ray", "--model-t", str(tmp_path / "swapped"), "--output", str(tmp_path / "v.jsonl"))
    one_line_error(result, "do not share a vocabulary")


def test_without_ray_the_engine_says_how_to_install_it(ray_args, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    result = generate(*ray_args, "--engine", "ray", "--output", str(tmp_path / "x.jsonl"))
    one_line_error(result, "--engine ray needs Ray", "pip install 'qstar[ray]'")
    one_line_error(generate(*ray_args, "--engine", "spark"), "--engine must be one of local, ray")
