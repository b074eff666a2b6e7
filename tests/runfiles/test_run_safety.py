"""Nothing lost, nothing mixed, nothing silent: run files a crash cannot explain, models changed in
place, shards that grow, a full disk, NaN log-probabilities, unwritable files and odd inputs. Each
case failed on qstar before it was handled (traceback, silent loss, or a run that mixed data)."""

import gc
import json
import os
import resource
import shutil
import subprocess
import weakref
from pathlib import Path
from types import SimpleNamespace

import filelock
import pytest
import torch
import yaml

from qstar_cli.distributions.sampling import counter_uniform
from qstar_cli.engine.models import LoadedModel, file_sha256
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.generate.config import GenerateConfig
from qstar_cli.testing.tiny import (
    build_tiny_model,
    build_tiny_tokenizer,
    save_tiny_model,
)
from tests.helpers import (
    copy_run,
    invoke,
    one_line_error,
    run_files,
    snapshot,
    spawn,
    tiny_run_flags,
    write_prompts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"prompt": f"Question {i}: what is {i} times {i}?", "id": i} for i in range(12)]
LOADING = "loading models"  # what generate prints just before the models load


@pytest.fixture(scope="module")
def w(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    w = SimpleNamespace(root=root, models=tiny_model_dirs)
    w.data = write_prompts(root, ROWS)
    w.flags = [*tiny_run_flags(tiny_model_dirs, w.data, 6, 2), "--num-samples", "6"]
    w.ref = root / "ref.jsonl"  # a complete run of 6 samples
    assert invoke("generate", *w.flags, "--output", w.ref).exit_code == 0
    return w


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- Run files that a crash cannot explain: refused, nothing cut -----------------------------------


def test_a_missing_sidecar_is_refused_and_the_main_file_kept(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    run_files(out)[1].unlink()
    before = snapshot(tmp_path)
    result = invoke("generate", *w.flags, "--output", out)
    one_line_error(result, "run.diagnostics.jsonl is missing", "run.jsonl holds 6 samples", "--overwrite")
    assert snapshot(tmp_path) == before and LOADING not in result.stdout


def test_a_missing_main_file_is_refused(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    out.unlink()
    before = snapshot(tmp_path)
    one_line_error(invoke("generate", *w.flags, "--output", out), "run.jsonl is missing", "diagnostics.jsonl holds 6 samples")
    assert snapshot(tmp_path) == before


def test_a_deleted_main_file_line_names_the_damaged_file(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    kept = lines(out)
    out.write_bytes(b"".join(kept[:2] + kept[3:]))  # a curated main file: sample 2 deleted
    before = snapshot(tmp_path)
    one_line_error(invoke("generate", *w.flags, "--output", out), f"{out} holds 5 samples, but the manifest says 6 are done")
    assert snapshot(tmp_path) == before
    out.write_bytes(b"".join(kept[:2] + kept[3:4] + kept[2:3] + kept[4:]))  # two lines swapped
    one_line_error(
        invoke("generate", *w.flags, "--output", out),
        f"{out} line 4 holds sample 2 response 0 after sample 3 response 0",
        "moved or edited",
    )


def test_a_damaged_sidecar_line_changes_nothing(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    sidecar = run_files(out)[1]
    kept = lines(sidecar)
    sidecar.write_bytes(b"".join(kept[:2]) + kept[2][:50] + b"\n" + b"".join(kept[3:]))
    before = snapshot(tmp_path)
    one_line_error(invoke("generate", *w.flags, "--output", out), f"{sidecar} line 3 is damaged")
    assert snapshot(tmp_path) == before  # the manifest too


# --- Model identity follows the content ------------------------------------------------------------


def test_weights_saved_over_a_checkpoint_of_the_same_shape_are_refused(w, tmp_path, monkeypatch):
    monkeypatch.setenv("QSTAR_CACHE", str(tmp_path / "cache"))
    theta = save_tiny_model(tmp_path / "theta", seed=1, sharpness=4.0)
    flags = [*tiny_run_flags((str(theta), w.models[1]), w.data, 6, 2)]
    out = tmp_path / "out" / "run.jsonl"
    assert invoke("generate", *flags, "--num-samples", "3", "--output", out).exit_code == 0
    sizes = {f.name: f.stat().st_size for f in theta.iterdir()}
    save_tiny_model(theta, seed=11, sharpness=4.0)  # fine-tuned and saved over it: same names and sizes
    assert {f.name: f.stat().st_size for f in theta.iterdir()} == sizes
    before = snapshot(out.parent)
    result = invoke("generate", *flags, "--num-samples", "6", "--output", out)
    one_line_error(result, "the files of pi_theta changed", str(theta), "model.safetensors differs in content")
    assert snapshot(out.parent) == before and LOADING not in result.stdout


def test_a_run_without_recorded_digests_resumes_and_records_them(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    meta_path = run_files(out)[2]
    meta = json.loads(meta_path.read_text())
    assert set(meta["weights_sha256"]) == {"model_theta", "model_t"}
    del meta["weights_sha256"]  # as the previous release wrote it
    meta_path.write_text(json.dumps(meta))
    result = invoke("generate", *w.flags, "--num-samples", "8", "--output", out)
    assert result.exit_code == 0 and "resuming: 6 of 8" in result.stdout
    assert json.loads(meta_path.read_text())["weights_sha256"]["model_t"]["model.safetensors"] == file_sha256(
        Path(w.models[1]) / "model.safetensors"
    )


def test_file_digests_are_computed_once_per_content(tmp_path, monkeypatch):
    import hashlib

    import qstar_cli.engine.models as models

    monkeypatch.setenv("QSTAR_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(1 << 20))
    assert file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    calls, sha256 = [], hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda: calls.append(1) or sha256())
    file_sha256(weights)
    assert calls == []  # cached: a stat, no read
    weights.write_bytes(os.urandom(1 << 20))  # new content, same size: mtime_ns moves
    assert file_sha256(weights) == sha256(weights.read_bytes()).hexdigest() and calls == [1]


# --- Shards whose schedule grows -------------------------------------------------------------------


def test_a_shard_rerun_with_more_samples_equals_a_fresh_shard_run(w, tmp_path):
    shard = ["--num-shards", "3", "--shard-index", "1"]
    flags = tiny_run_flags(w.models, w.data, 6, 2)
    grown, fresh = tmp_path / "grown.jsonl", tmp_path / "fresh.jsonl"
    assert invoke("generate", *flags, *shard, "--num-samples", "5", "--output", grown).exit_code == 0
    result = invoke("generate", *flags, *shard, "--num-samples", "9", "--output", grown)
    assert result.exit_code == 0, result.output
    assert invoke("generate", *flags, *shard, "--num-samples", "9", "--output", fresh).exit_code == 0
    shard_of = lambda out: run_files(out.with_name(f"{out.stem}-00001-of-00003.jsonl"))  # noqa: E731
    assert [p.read_bytes() for p in shard_of(grown)[:2]] == [p.read_bytes() for p in shard_of(fresh)[:2]]
    assert len(lines(shard_of(fresh)[0])) == 3

    # A shard begun with the split of earlier releases (it changes with the schedule) may not grow.
    meta_path = shard_of(grown)[2]
    meta = json.loads(meta_path.read_text())
    del meta["shard"]["split"]
    meta_path.write_text(json.dumps(meta))
    one_line_error(invoke("generate", *flags, *shard, "--num-samples", "12", "--output", grown), "--num-samples", "(9 samples)")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda meta: b"{not json", "not valid JSON"),
        (lambda meta: json.dumps({**meta, "counts": None}).encode(), "counts is None, not dict"),
        (lambda meta: json.dumps({**meta, "shard": {"index": 1}, "fingerprint": 7}).encode(), "fingerprint is 7, not str"),
        (lambda meta: json.dumps([meta]).encode(), "not a JSON object"),
    ],
    ids=["not json", "no counts", "wrong types", "a list"],
)
def test_merge_refuses_a_damaged_shard_manifest(w, tmp_path_factory, damage, fragment):
    root = tmp_path_factory.mktemp("merge")
    out = root / "run.jsonl"
    for index in range(2):
        args = ["--num-samples", "4", "--num-shards", "2", "--shard-index", str(index), "--output", out]
        assert invoke("generate", *tiny_run_flags(w.models, w.data, 4, 2), *args).exit_code == 0
    meta_path = run_files(root / "run-00001-of-00002.jsonl")[2]
    meta_path.write_bytes(damage(json.loads(meta_path.read_text())))
    one_line_error(invoke("merge", out), "run-00001-of-00002.meta.json is damaged", fragment)
    assert not out.exists()


# --- Inputs that are not what they say --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("latin1.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', "line 2 is not UTF-8 text (byte 0xe9)"),
        ("list.jsonl", b'{"prompt": "ok"}\n\n[1, 2]\n', "line 3 is a JSON list, not an object"),
        ("malformed.jsonl", b'{"prompt": "ok"}\n{"prompt": \n', "line 2 is not valid JSON"),
        ("latin1.csv", b"prompt,id\nhello,1\ncaf\xe9,2\n", "line 3 is not UTF-8 text"),
    ],
)
def test_a_dataset_that_cannot_be_parsed_names_file_line_and_cause(w, tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    result = invoke("generate", *tiny_run_flags(w.models, tmp_path / name, 4, 2), "--output", tmp_path / "o.jsonl")
    one_line_error(result, f"{tmp_path / name} {fragment}")
    assert not (tmp_path / "o.jsonl").exists()


def test_an_unreadable_model_is_one_line(w, tmp_path):
    broken = Path(shutil.copytree(w.models[0], tmp_path / "broken"))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    result = invoke("generate", *tiny_run_flags((str(broken), w.models[1]), w.data, 4, 2), "--output", tmp_path / "o.jsonl")
    one_line_error(result, "cannot load model", str(broken))


# --- The machine fails: one line, what is saved, the same command resumes --------------------------


def test_a_full_disk_is_one_line_and_the_same_command_resumes(w, tmp_path):
    flags = [*tiny_run_flags(w.models, w.data, 24, 2), "--num-samples", "10"]
    reference, out = tmp_path / "ref.jsonl", tmp_path / "full.jsonl"
    assert spawn(flags, reference).wait(timeout=300) == 0
    # A file may not grow past half the reference sidecar (EFBIG, as ENOSPC would be): the run fails mid-way.
    limit = run_files(reference)[1].stat().st_size // 2
    failed = spawn(flags, out, text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    stderr = failed.communicate(timeout=300)[1]
    assert failed.returncode == 1 and "Traceback" not in stderr, stderr
    [line] = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("progress: ")]
    saved = json.loads(run_files(out)[2].read_text())["counts"]["done"]
    assert line.startswith("error: cannot write the run files") and f"{saved} of 10 samples are saved" in line
    assert "run the same command to resume" in line and 0 < saved < 10
    assert json.loads(run_files(out)[2].read_text())["status"] == "failed"
    assert spawn(flags, out).wait(timeout=300) == 0
    assert [p.read_bytes() for p in run_files(out)[:2]] == [p.read_bytes() for p in run_files(reference)[:2]]


@pytest.mark.parametrize("role", ["pi_theta", "pi_t"])
def test_nan_log_probabilities_stop_the_run_and_name_the_model(w, tmp_path, role):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=1, sharpness=4.0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # a damaged checkpoint: every logit is NaN
    bad = tmp_path / "nan_model"
    model.save_pretrained(bad)
    tokenizer.save_pretrained(bad)
    models = (str(bad), w.models[1]) if role == "pi_theta" else (w.models[0], str(bad))
    out = tmp_path / "o.jsonl"
    result = invoke("generate", *tiny_run_flags(models, w.data, 4, 2), "--output", out)
    one_line_error(result, f"{role} ({bad}) gave NaN log-probabilities", "0 of 12 samples are saved", code=1)
    assert out.read_bytes() == b""  # no such token is written as a q* sample


def test_a_sampler_is_freed_when_its_user_drops_it(tiny_models, tiny_tokenizer):
    sampler = DualModelSampler(
        LoadedModel(tiny_models[0], tiny_tokenizer, "a"), LoadedModel(tiny_models[1], tiny_tokenizer, "b"), draft_k="auto"
    )
    costs = sampler.round_costs(4)
    assert sampler.round_costs(4) is costs  # kept per sampler
    ref = weakref.ref(sampler)
    del sampler
    gc.collect()
    assert ref() is None


def test_counter_uniform_takes_any_stream():
    idx = torch.arange(64)
    streams = [counter_uniform(7, idx, idx, stream) for stream in (0, 1, 2, 3, 1 << 40)]
    assert all(((u > 0) & (u < 1)).all() for u in streams)
    assert len({tuple(u.tolist()) for u in streams}) == len(streams)  # distinct streams, distinct uniforms


# --- Unwritable files: refused before any work -----------------------------------------------------


@pytest.fixture
def immutable():
    """``chattr +i`` a file for the test (root, as CI runs; no file system call can then change it)."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and chattr")
    made = []

    def make(path):
        subprocess.run(["chattr", "+i", str(path)], check=True)
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_immutable_main_file_is_refused_before_the_models_load(w, tmp_path, immutable):
    out = copy_run(w.ref, tmp_path)
    immutable(out)
    result = invoke("generate", *w.flags, "--num-samples", "8", "--output", out)
    one_line_error(result, f"--output {out} cannot be written")
    assert LOADING not in result.stdout


def test_export_and_report_refuse_unwritable_outputs(w, tmp_path):
    (tmp_path / "a_dir").mkdir()
    cases = [
        ("export", w.ref, "--output", tmp_path / "a_dir.jsonl", "--include-truncated"),  # a directory named .jsonl
        ("export", w.ref, "--output", "/proc/qstar.parquet", "--include-truncated"),
        ("report", w.ref, "--output", tmp_path / "a_dir", "--tokenizer", w.models[1]),
        ("report", w.ref, "--output", "/proc/qstar.html", "--tokenizer", w.models[1]),
    ]
    (tmp_path / "a_dir.jsonl").mkdir()
    for args in cases:
        line = one_line_error(invoke(*args), "--output")
        assert "directory" in line or "cannot be written" in line, line
    assert not list(tmp_path.rglob("*.tmp")) and not list(w.root.glob("*.tmp"))


# --- Smaller ones ----------------------------------------------------------------------------------


def test_export_of_an_unfinished_run_says_so(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    meta_path = run_files(out)[2]
    meta = json.loads(meta_path.read_text())
    meta["status"], meta["counts"]["samples"] = "interrupted", 9
    meta_path.write_text(json.dumps(meta))
    result = invoke("export", out, "--output", tmp_path / "t.jsonl", "--include-truncated")
    assert result.exit_code == 0 and "the run is not finished (6 of 9 samples" in result.stderr
    done = invoke("export", w.ref, "--output", tmp_path / "u.jsonl", "--include-truncated")
    assert done.exit_code == 0 and "not finished" not in done.stderr


def test_ray_settings_without_the_ray_engine_are_refused(w, tmp_path):
    out = tmp_path / "o.jsonl"
    one_line_error(invoke("generate", *w.flags, "--replicas", "2", "--output", out), "--replicas 2 is for --engine ray")
    one_line_error(invoke("generate", *w.flags, "--ray-address", "auto", "--output", out), "--ray-address is for --engine ray")


@pytest.mark.parametrize(
    "address, fragment",
    [("notahost", "is not HOST:PORT"), ("notahost.invalid:6379", "no such host"), ("127.0.0.1:1", "cannot reach the Ray cluster")],
)
def test_a_bad_ray_address_is_one_line_and_leaves_nothing(w, tmp_path, address, fragment):
    if os.environ.get("CI") != "true":  # CI must not skip
        pytest.importorskip("ray")
    result = invoke("generate", *w.flags, "--engine", "ray", "--ray-address", address, "--output", tmp_path / "o.jsonl")
    one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_setting_spelled_twice_in_a_config_is_refused(w, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model-theta: {w.models[0]}\nmodel_theta: {w.models[1]}\n")
    one_line_error(invoke("generate", *w.flags, "--config", config, "--output", tmp_path / "o.jsonl"), "model_theta is given twice")


def test_explain_json_writes_no_figures_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("explain", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["cases"]
    assert list(tmp_path.iterdir()) == []


def test_version_flag():
    import qstar_cli

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == qstar_cli.__version__


def test_a_refusal_shows_no_raw_dicts(w, tmp_path):
    pair = ["--draft-k", "2", "--draft", "pair", "--draft-model-theta", w.models[0], "--draft-model-t", w.models[1]]
    out = tmp_path / "p.jsonl"
    assert invoke("generate", *w.flags, *pair, "--output", out).exit_code == 0
    again = invoke("generate", *w.flags, *pair, "--output", out)  # a pair drafter's run resumes (complete here)
    assert again.exit_code == 0 and "resuming: 6 of 6" in again.stdout
    swapped = pair[:-1] + [w.models[0]]
    line = one_line_error(invoke("generate", *w.flags, *swapped, "--output", out), "draft_model_t")
    assert "{" not in line


# --- What an adversarial run of this release found ---------------------------------------------------


def test_export_weights_and_report_never_overwrite_an_input(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    tokenizer = Path(shutil.copytree(w.models[1], tmp_path / "tokenizer"))
    before = snapshot(tmp_path)
    one_line_error(invoke("analyze", run_files(out)[1], "--export-weights", out), "would overwrite the input")
    one_line_error(invoke("analyze", run_files(out)[1], "--export-weights", run_files(out)[2]), "would overwrite the input")
    for target in (tokenizer / "tokenizer.json", Path(w.data), Path(w.models[1]) / "model.safetensors"):
        one_line_error(invoke("report", out, "--tokenizer", tokenizer, "--output", target), "would overwrite the input")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("done", [-1, "6", 5.0, None, True])
def test_a_manifest_whose_count_is_not_a_count_is_damaged(w, tmp_path, done):
    out = copy_run(w.ref, tmp_path)
    meta_path = run_files(out)[2]
    meta = json.loads(meta_path.read_text())
    meta["counts"]["done"] = done
    meta_path.write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    one_line_error(invoke("generate", *w.flags, "--output", out), f"the manifest {meta_path} is damaged (counts.done")
    assert snapshot(tmp_path) == before


def test_files_that_disagree_or_lines_out_of_order_are_refused_before_the_models_load(w, tmp_path):
    out = copy_run(w.ref, tmp_path)
    kept = lines(out)
    out.write_bytes(b"".join(kept[:2] + kept[3:4] + kept[2:3] + kept[4:]))  # two lines swapped
    result = invoke("generate", *w.flags, "--output", out)
    one_line_error(result, f"{out} line 4 holds sample 2 response 0 after sample 3 response 0", "moved or edited")
    assert LOADING not in result.stdout
    edited = kept[0].replace(b'"finish_reason":"length"', b'"finish_reason":"stop"')
    assert edited != kept[0]
    out.write_bytes(b"".join([edited, *kept[1:]]))
    result = invoke("generate", *w.flags, "--output", out)
    one_line_error(result, "run.jsonl and", "run.diagnostics.jsonl disagree (sample 0 response 0 finished by stop against length)")
    assert LOADING not in result.stdout


def test_a_shard_file_is_not_continued_as_a_run_of_its_own(w, tmp_path):
    flags = tiny_run_flags(w.models, w.data, 4, 2)
    assert (
        invoke(
            "generate", *flags, "--num-samples", "4", "--num-shards", "2", "--shard-index", "1", "--output", tmp_path / "run.jsonl"
        ).exit_code
        == 0
    )
    result = invoke("generate", *flags, "--num-samples", "4", "--output", tmp_path / "run-00001-of-00002.jsonl")
    one_line_error(result, "is shard 1 of 2 of a run", "--num-shards 2 --shard-index 1")
    assert LOADING not in result.stdout


def test_merge_names_a_missing_shard_sidecar(w, tmp_path):
    for index in range(2):
        args = ["--num-samples", "4", "--num-shards", "2", "--shard-index", str(index), "--output", tmp_path / "run.jsonl"]
        assert invoke("generate", *tiny_run_flags(w.models, w.data, 4, 2), *args).exit_code == 0
    shard = tmp_path / "run-00001-of-00002.jsonl"
    meta = json.loads(run_files(shard)[2].read_text())
    run_files(shard)[2].write_text(json.dumps({**meta, "status": "running", "counts": {**meta["counts"], "done": 1}}))
    with filelock.FileLock(f"{shard}.lock", timeout=0):  # a generate still writing the shard
        one_line_error(
            invoke("merge", tmp_path / "run.jsonl"), "run-00001-of-00002.jsonl is incomplete (1 of 2 samples): wait for it to finish"
        )
    one_line_error(invoke("merge", tmp_path / "run.jsonl"), "is incomplete (1 of 2 samples): re-run its generate command")
    run_files(shard)[2].write_text(json.dumps(meta))
    run_files(shard)[1].unlink()
    one_line_error(invoke("merge", tmp_path / "run.jsonl"), "run-00001-of-00002.jsonl has no sidecar")


def test_a_report_is_replaced_whole_or_not_at_all(w, tmp_path, monkeypatch):
    page = tmp_path / "r.html"
    page.write_text("the previous report")

    def full_disk(fd):  # the written bytes cannot all be stored
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    result = invoke("report", w.ref, "--output", page, "--tokenizer", w.models[1])
    one_line_error(result, "No space left on device", code=1)
    assert page.read_text() == "the previous report" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_a_yaml_boolean_is_not_a_number(w, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("top_k: true\n")
    one_line_error(invoke("generate", *w.flags, "--config", config, "--output", tmp_path / "o.jsonl"), "top_k must be an integer, got True")


def test_a_yaml_on_or_off_is_a_compile_setting():
    # YAML 1.1 reads a bare on / off as a boolean.
    run = "model_theta: demo\nmodel_t: demo\ndataset: d.jsonl\n"
    assert [GenerateConfig.from_dict(yaml.safe_load(f"{run}compile: {word}")).compile for word in ("on", "off", "auto")] == [
        "on",
        "off",
        "auto",
    ]
