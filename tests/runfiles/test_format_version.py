"""Files that say their version: the manifest and every sidecar line carry ``format_version``; lines of
an earlier version (without it, or without a field added since) are read, analysed, exported and
resumed as they are, and a newer version is refused in one line asking for a newer qstar. A run begun
by the previous release itself: tests/generate/test_previous_release.py."""

import json
from types import SimpleNamespace

import orjson
import pytest

from qstar_cli.runfiles.format import FORMAT_VERSION
from tests.helpers import (
    analysis,
    as_if_killed_after,
    as_previous_release,
    copy_run,
    invoke,
    one_line_error,
    run_files,
    tiny_run_flags,
    write_prompts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"prompt": f"Say {word} twice."} for word in ("rain", "stone", "moss", "wind", "clay")]
LOADING = "loading models"  # what generate prints just before the models load


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    """A complete run of 5 samples, in this process."""
    root = tmp_path_factory.mktemp("versions")
    w = SimpleNamespace(flags=tiny_run_flags(tiny_model_dirs, write_prompts(root, ROWS), 8, 2), out=root / "ref.jsonl")
    result = invoke("generate", *w.flags, "--output", w.out)
    assert result.exit_code == 0, result.output
    return w


def export(out, directory) -> bytes:
    train = directory / "train.jsonl"
    train.unlink(missing_ok=True)
    result = invoke("export", out, "--output", train, "--include-truncated")
    assert result.exit_code == 0, result.output
    return train.read_bytes()


def edit_manifest(out, **fields) -> None:
    meta_path = run_files(out)[2]
    meta = {**json.loads(meta_path.read_text()), **fields}
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_the_manifest_and_every_sidecar_line_say_their_format_version(run):
    main, sidecar, meta = run_files(run.out)
    assert FORMAT_VERSION == 2 and json.loads(meta.read_text())["format_version"] == 2
    lines = sidecar.read_bytes().splitlines()
    assert len(lines) == len(ROWS) and all(line.startswith(b'{"format_version":2,"sample_idx":') for line in lines)
    assert b"format_version" not in main.read_bytes()  # the main file is OpenAI chat format, read by datasets as it is


def test_lines_of_an_earlier_version_are_read_a_field_they_lack_absent(run, tmp_path):
    """Lines without ``format_version`` (the previous release's), the first also without
    ``response_idx`` and without ``entropy_q``, as if written before those fields existed: nothing is
    corrupt, ``entropy_q`` is summarised over the lines that hold it, and the rest reads as before."""
    out = copy_run(run.out, tmp_path)
    sidecar = run_files(out)[1]
    records = [orjson.loads(line) for line in as_previous_release(sidecar.read_bytes()).splitlines()]
    old = {k: v for k, v in records[0].items() if k != "response_idx" and not k.startswith("entropy_q_")}
    old["per_token"] = {k: v for k, v in old["per_token"].items() if k != "entropy_q"}
    sidecar.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [old, *records[1:]]))
    edit_manifest(out, format_version=None)

    got, want = analysis(sidecar), analysis(run_files(run.out)[1])
    assert got["corrupt_lines"] == 0 and got["samples"] == len(ROWS)
    entropy_q = got["fields"].pop("entropy_q")
    want["fields"].pop("entropy_q")
    assert got == want
    held = [value for record in records[1:] for value in record["per_token"]["entropy_q"]]
    assert entropy_q["tokens"]["mean"] == pytest.approx(sum(held) / len(held), rel=1e-12)
    assert entropy_q["samples"]["mean"] == pytest.approx(sum(r["entropy_q_mean"] for r in records[1:]) / (len(ROWS) - 1), rel=1e-12)
    assert export(out, tmp_path) == export(run.out, tmp_path)
    before = [p.read_bytes() for p in run_files(out)[:2]]
    result = invoke("generate", *run.flags, "--output", out)
    assert result.exit_code == 0 and f"resuming: {len(ROWS)} of {len(ROWS)}" in result.output, result.output
    assert [p.read_bytes() for p in run_files(out)[:2]] == before
    assert json.loads(run_files(out)[2].read_text())["format_version"] == FORMAT_VERSION


def test_a_run_of_lines_without_the_version_is_repaired_and_resumed_with_it(run, tmp_path):
    """A run that the previous release left after a kill (2 samples committed, a third torn): the
    resumed files keep its 2 lines as they are and write the rest in this version."""
    out = copy_run(run.out, tmp_path)
    main, sidecar = run_files(out)[:2]
    kept = [path.read_bytes().splitlines(keepends=True) for path in (main, sidecar)]
    main.write_bytes(b"".join(kept[0][:3]))
    sidecar.write_bytes(as_previous_release(b"".join(kept[1][:2])) + kept[1][2][:40])
    as_if_killed_after(out, 2)
    edit_manifest(out, format_version=None)
    result = invoke("generate", *run.flags, "--output", out)
    assert result.exit_code == 0 and f"resuming: 2 of {len(ROWS)}" in result.output, result.output
    assert main.read_bytes() == run_files(run.out)[0].read_bytes()
    assert sidecar.read_bytes() == as_previous_release(b"".join(kept[1][:2])) + b"".join(kept[1][2:])


@pytest.mark.parametrize("command", ["analyze", "export", "report", "generate"])
def test_a_line_of_a_newer_format_is_refused_asking_for_a_newer_qstar(run, tmp_path, command):
    out = copy_run(run.out, tmp_path)
    sidecar = run_files(out)[1]
    lines = sidecar.read_bytes().splitlines(keepends=True)
    sidecar.write_bytes(lines[0] + lines[1].replace(b'"format_version":2', b'"format_version":3', 1) + b"".join(lines[2:]))
    before = [p.read_bytes() for p in run_files(out)]
    args = {
        "analyze": ["analyze", sidecar, "--json"],
        "export": ["export", out, "--output", tmp_path / "train.jsonl"],
        "report": ["report", out, "--output", tmp_path / "report.html", "--tokenizer", run.flags[3]],
        "generate": ["generate", *run.flags, "--output", out],
    }[command]
    result = invoke(*args)
    one_line_error(result, f"{sidecar} line 2 is in run-file format 3", f"(format {FORMAT_VERSION} and earlier): upgrade qstar")
    assert LOADING not in result.stdout and [p.read_bytes() for p in run_files(out)] == before
    assert sorted(tmp_path.iterdir()) == sorted(run_files(out))


@pytest.mark.parametrize(
    "version, fragment",
    [
        (3, "run.meta.json is in run-file format 3, newer than qstar"),
        ("two", "run.meta.json is damaged (format_version is 'two', not a version)"),
    ],
)
def test_a_manifest_of_a_newer_or_damaged_format_is_refused(run, tmp_path, version, fragment):
    out = copy_run(run.out, tmp_path)
    edit_manifest(out, format_version=version)
    before = [p.read_bytes() for p in run_files(out)]
    for args in (["generate", *run.flags, "--output", out], ["report", out, "--output", tmp_path / "r.html", "--tokenizer", run.flags[3]]):
        result = invoke(*args)
        one_line_error(result, fragment)
        assert LOADING not in result.stdout and [p.read_bytes() for p in run_files(out)] == before


def test_a_line_whose_version_is_damaged_is_a_damaged_line(run, tmp_path):
    out = copy_run(run.out, tmp_path)
    sidecar = run_files(out)[1]
    lines = sidecar.read_bytes().splitlines(keepends=True)
    sidecar.write_bytes(lines[0] + lines[1].replace(b'"format_version":2', b'"format_version":"2"', 1) + b"".join(lines[2:]))
    result = invoke("analyze", sidecar, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["corrupt_lines"] == 1 and "skipped 1 corrupt line(s): 2" in result.stderr
    one_line_error(invoke("generate", *run.flags, "--output", out), "run.diagnostics.jsonl line 2 is damaged (not a sample record)")
