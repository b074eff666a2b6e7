"""Shards: the split, ``generate --num-shards``, and ``qstar merge`` against one process's files."""

import json
import shutil
import threading

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from qstar_cli import GenerateConfig, run_generate
from qstar_cli.cli import app
from qstar_cli.generate.schedule import shard_positions, snake_shard_positions
from qstar_cli.runfiles.format import FORMAT_VERSION
from qstar_cli.runfiles.writer import OutputPaths
from tests.helpers import (
    analysis,
    as_previous_release,
    file_bytes,
    one_line_error,
    read_lines,
    tiny_run_flags,
    write_prompts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Prompts of lengths 1x to 5x a sentence, and one row without a prompt (skipped by every shard).
PROMPTS = [{"messages": [{"role": "user", "content": f"Tell me about the number {i}. " * (1 + i * 7 % 5)}]} for i in range(14)]
PROMPTS[5]["messages"] = None
VALID = [i for i in range(14) if i != 5]


def test_shard_positions_are_prefix_stable_and_balanced():
    # Rounds of 3: each position goes to the lightest shard not yet dealt one in its round.
    lengths = [50, 10, 40, 20, 30, 60]
    assert [shard_positions(lengths, 3, i) for i in range(3)] == [[0, 5], [1, 3], [2, 4]]
    lengths = np.random.default_rng(7).integers(1, 1000, 101).tolist()
    shards = [shard_positions(lengths, 4, i) for i in range(4)]
    assert sorted(sum(shards, [])) == list(range(101)) and all(s == sorted(s) for s in shards)
    assert max(map(len, shards)) - min(map(len, shards)) == 1
    totals = [sum(lengths[p] for p in s) for s in shards]
    dealt = [sum(lengths[i::4]) for i in range(4)]  # round robin, blind to lengths
    assert max(totals) - min(totals) < (max(dealt) - min(dealt)) / 2
    # A schedule that grows keeps every shard's earlier positions (resuming a shard needs it).
    for grown in (102, 150):
        longer = lengths + np.random.default_rng(grown).integers(1, 1000, grown - 101).tolist()
        assert [[p for p in shard_positions(longer, 4, i) if p < 101] for i in range(4)] == shards
    assert shard_positions(lengths, 1, 0) == list(range(101))


def test_shards_begun_before_the_stable_split_keep_theirs():
    # Sorted by length: positions 1, 3, 4 | 2, 0, 5 go to shards 0, 1, 2 | 2, 1, 0.
    lengths = [50, 10, 40, 20, 30, 60]
    assert [snake_shard_positions(lengths, 3, i) for i in range(3)] == [[1, 5], [0, 3], [2, 4]]


def generate(*args):
    return CliRunner().invoke(app, ["generate", *args])


def merge(out):
    return CliRunner().invoke(app, ["merge", str(out)])


def shard_file(out, index, count=3):
    return out.with_name(f"{out.stem}-{index:05d}-of-{count:05d}.jsonl")


@pytest.fixture(scope="module")
def shard_args(tiny_model_dirs, tmp_path_factory):
    # One slot: every sample is computed alone, so one process and the shards agree bit for bit.
    return tiny_run_flags(tiny_model_dirs, write_prompts(tmp_path_factory.mktemp("shard_data"), PROMPTS), 16, 1)


@pytest.fixture(scope="module")
def runs(shard_args, tmp_path_factory):
    """A directory with one process's run ``single.jsonl`` and the three shards of ``run.jsonl``."""
    root = tmp_path_factory.mktemp("shards")
    assert generate(*shard_args, "--output", str(root / "single.jsonl")).exit_code == 0
    for index in range(3):
        result = generate(*shard_args, "--output", str(root / "run.jsonl"), "--num-shards", "3", "--shard-index", str(index))
        assert result.exit_code == 0, result.output
    return root


def manifest(out):
    return json.loads(OutputPaths(out).meta.read_text())


def copy_runs(runs, tmp_path):
    shutil.copytree(runs, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run.jsonl"


def test_three_shards_then_merge_equal_one_process(shard_args, runs, tmp_path):
    out = copy_runs(runs, tmp_path)
    shards = [[r["sample_idx"] for r in read_lines(shard_file(out, i))] for i in range(3)]
    assert sorted(sum(shards, [])) == VALID and all(s == sorted(s) for s in shards)
    assert [len(s) for s in shards] in ([5, 4, 4], [4, 5, 4], [4, 4, 5])
    meta = manifest(shard_file(out, 1))
    assert meta["shard"] == {"index": 1, "count": 3, "schedule_samples": 13, "split": "prefix-stable"} and meta["counts"]["samples"] == len(
        shards[1]
    )

    result = merge(out)
    assert result.exit_code == 0, result.output
    assert "13 samples from 3 shards" in result.output
    single = tmp_path / "single.jsonl"
    assert file_bytes(out) == file_bytes(single)
    merged, alone = manifest(out), manifest(single)
    assert merged["fingerprint"] == alone["fingerprint"] and merged["status"] == "complete"
    assert merged["counts"] == {**alone["counts"], "skipped": {"missing prompt": 1}}
    assert [s["shard"]["index"] for s in merged["shards"]] == [0, 1, 2]
    assert all(len(s["sessions"]) == 1 and s["sessions"][0]["done"] == s["counts"]["samples"] for s in merged["shards"])
    # The merged run is the one-process run: generate on it with the same settings finds it done.
    result = generate(*shard_args, "--output", str(out))
    assert result.exit_code == 0 and "resuming: 13 of 13" in result.output
    assert file_bytes(out) == file_bytes(single)
    # Merging again gives the same files.
    assert merge(out).exit_code == 0 and file_bytes(out) == file_bytes(single)


def test_a_shard_of_the_previous_release_merges_with_shards_of_this_one(shard_args, runs, tmp_path):
    """Shard 0 as the release before ``format_version`` wrote it (its sidecar lines and manifest
    without the field), the others by this release: the merged sidecar holds each line as its shard
    does, and the merged run is the one-process run to analyze and generate."""
    out = copy_runs(runs, tmp_path)
    old = OutputPaths(shard_file(out, 0))
    old.diagnostics.write_bytes(as_previous_release(old.diagnostics.read_bytes()))
    old.meta.write_text(json.dumps({k: v for k, v in manifest(old.main).items() if k != "format_version"}))
    assert merge(out).exit_code == 0
    single = tmp_path / "single.jsonl"
    of_old = {r["sample_idx"] for r in read_lines(old.main)}
    lines = OutputPaths(single).diagnostics.read_bytes().splitlines(keepends=True)
    expected = b"".join(as_previous_release(line) if orjson.loads(line)["sample_idx"] in of_old else line for line in lines)
    assert file_bytes(out) == [file_bytes(single)[0], expected] and as_previous_release(expected) != expected
    assert manifest(out)["format_version"] == FORMAT_VERSION
    result = generate(*shard_args, "--output", str(out))
    assert result.exit_code == 0 and "resuming: 13 of 13" in result.output
    assert analysis(OutputPaths(out).diagnostics) == analysis(OutputPaths(single).diagnostics)


def test_merge_refuses_a_shard_of_a_newer_format(runs, tmp_path):
    out = copy_runs(runs, tmp_path)
    side = OutputPaths(shard_file(out, 1)).diagnostics
    side.write_bytes(side.read_bytes().replace(b'{"format_version":2,', b'{"format_version":3,', 1))
    one_line_error(merge(out), f"{side} line 1 is in run-file format 3", "upgrade qstar")
    assert not out.exists() and not list(tmp_path.glob("*.merging"))
    meta = OutputPaths(shard_file(out, 2)).meta
    meta.write_text(json.dumps({**manifest(shard_file(out, 2)), "format_version": 3}))
    one_line_error(merge(out), f"the manifest {meta} is in run-file format 3", "upgrade qstar")


def test_merge_refuses_a_missing_shard(runs, tmp_path):
    out = copy_runs(runs, tmp_path)
    shard = OutputPaths(shard_file(out, 2))
    for path in (shard.main, shard.diagnostics, shard.meta):
        path.unlink()
    one_line_error(merge(out), "run-00002-of-00003.jsonl is missing", "--shard-index 2")
    assert not out.exists()


def test_merge_refuses_a_shard_of_another_configuration(shard_args, runs, tmp_path):
    out = copy_runs(runs, tmp_path)
    args = ["--output", str(out), "--num-shards", "3", "--shard-index", "1", "--temperature", "0.7", "--overwrite"]
    assert generate(*shard_args, *args).exit_code == 0
    one_line_error(merge(out), "run-00001-of-00003.jsonl was made with another configuration", "temperature (1.0 -> 0.7)")


def test_merge_refuses_an_incomplete_shard(shard_args, runs, tmp_path):
    out = copy_runs(runs, tmp_path)
    stop = threading.Event()

    class StopAfterFirstSample:
        """Asks for a stop once the first sample is written: the shard is left interrupted."""

        def message(self, text): ...
        def start(self, total, done): ...
        def tokens(self, count): ...
        def samples(self, count):
            stop.set()

    settings = dict(zip(shard_args[::2], shard_args[1::2]))
    config = GenerateConfig.from_dict({k.removeprefix("--"): v for k, v in settings.items()} | {
        "output": str(out), "num_shards": 3, "shard_index": 0, "overwrite": True,
        "max_new_tokens": 16, "batch_size": 1})  # fmt: skip
    summary = run_generate(config, progress=StopAfterFirstSample(), stop=stop)
    assert summary.status == "interrupted" and 0 < summary.done < summary.total
    one_line_error(merge(out), "run-00000-of-00003.jsonl is incomplete", f"({summary.done} of {summary.total} samples)")
    # The same shard finished by re-running its command: merge accepts it.
    assert generate(*shard_args, "--output", str(out), "--num-shards", "3", "--shard-index", "0").exit_code == 0
    assert merge(out).exit_code == 0 and file_bytes(out) == file_bytes(tmp_path / "single.jsonl")


def test_merge_refuses_torn_shards_and_foreign_outputs(runs, tmp_path):
    out = copy_runs(runs, tmp_path)
    foreign = orjson.loads((tmp_path / "single.meta.json").read_bytes())
    (tmp_path / "run.meta.json").write_bytes(orjson.dumps({**foreign, "fingerprint": "0123456789abcdef"}))
    out.write_text("{}\n")
    one_line_error(merge(out), "run.jsonl exists and holds another run")
    out.unlink()
    (tmp_path / "run.meta.json").unlink()
    side = OutputPaths(shard_file(out, 1)).diagnostics
    side.write_bytes(side.read_bytes()[:-30])
    one_line_error(merge(out), "run-00001-of-00003.jsonl line", "torn")
    assert not out.exists() and not list(tmp_path.glob("*.merging"))
    one_line_error(merge(tmp_path / "other.jsonl"), "no shards of", "other-00000-of-00003.jsonl")


def test_shard_flags_are_checked(shard_args, tmp_path):
    one_line_error(generate(*shard_args, "--num-shards", "3", "--shard-index", "3"), "--shard-index must lie in 0..2")
    one_line_error(generate(*shard_args, "--num-shards", "0"), "--num-shards must be positive")


def test_shards_keep_a_prompts_responses_together(shard_args, tmp_path):
    k = ["--samples-per-prompt", "2", "--num-samples", "6"]
    assert generate(*shard_args, *k, "--output", str(tmp_path / "single.jsonl")).exit_code == 0
    for index in range(2):
        result = generate(*shard_args, *k, "--output", str(tmp_path / "run.jsonl"), "--num-shards", "2", "--shard-index", str(index))
        assert result.exit_code == 0, result.output
        lines = read_lines(shard_file(tmp_path / "run.jsonl", index, count=2))
        assert [r["response_idx"] for r in lines] == [0, 1] * (len(lines) // 2)
    assert merge(tmp_path / "run.jsonl").exit_code == 0
    assert file_bytes(tmp_path / "run.jsonl") == file_bytes(tmp_path / "single.jsonl")
