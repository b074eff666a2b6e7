"""Nothing mixed: files of two runs are never paired or continued as one. ``export``, ``analyze
--export-weights`` and ``report`` check a main file against its sidecar as ``generate`` does;
resuming checks every committed line against this run (level, speculative rounds, prompt ids) and
samples again whatever no commit made durable. Each case passed silently before (exit 0, mixed data)."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from tests.helpers import as_if_killed_after, copy_run, invoke, one_line_error, run_files, tiny_run_flags, write_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"prompt": f"Tell me about {word}."} for word in ("rivers", "bread", "owls", "glass", "tides", "salt")]
LOADING = "loading models"


@pytest.fixture(scope="module")
def runs(spread_model_dirs, tmp_path_factory):
    """Complete runs of the same 6 prompts (pi_theta stops early and often, so finish reasons differ):
    the reference, one with another seed, one at level summary, one speculative (with draft rounds)."""
    root = tmp_path_factory.mktemp("mixed")
    w = SimpleNamespace(root=root)
    w.flags = tiny_run_flags(spread_model_dirs, write_prompts(root, ROWS), 12, 3)
    for name, extra in {"ref": [], "seed": ["--seed", "7"], "summary": ["--diagnostics", "summary"], "spec": ["--draft-k", "2"]}.items():
        setattr(w, name, root / f"{name}.jsonl")
        result = invoke("generate", *w.flags, *extra, "--output", getattr(w, name))
        assert result.exit_code == 0, result.output
    return w


def records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_the_runs_disagree_where_a_check_can_see_it(runs):
    """The premise of the pairing tests: the seed-7 run's finish reasons differ from the reference's."""
    ref, seed = records(runs.ref), records(runs.seed)
    assert [r["finish_reason"] for r in ref] != [r["finish_reason"] for r in seed]


def test_export_analyze_and_report_refuse_a_sidecar_of_another_run(runs, tmp_path):
    out = copy_run(runs.ref, tmp_path)
    shutil.copy(run_files(runs.seed)[1], run_files(out)[1])  # another seed's sidecar beside the main file
    commands = [
        ["export", out, "--output", tmp_path / "train.jsonl", "--include-truncated"],
        ["analyze", run_files(out)[1], "--export-weights", tmp_path / "w.jsonl"],
        ["report", out, "--output", tmp_path / "r.html", "--tokenizer", runs.flags[3]],
    ]
    for command in commands:
        one_line_error(invoke(*command), "run.jsonl and", "disagree (sample", "finished by")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in run_files(out))
    assert invoke("export", runs.ref, "--output", tmp_path / "ok.jsonl", "--include-truncated").exit_code == 0


@pytest.mark.parametrize(
    "source, fragments",
    [
        ("summary", ["run.diagnostics.jsonl line 1 is a sidecar line of level summary", "writes level full", "another run"]),
        ("spec", ["run.diagnostics.jsonl line 1 holds the draft rounds of speculative sampling", "does not use", "another run"]),
    ],
)
def test_resume_refuses_committed_lines_of_another_level_or_kind(runs, tmp_path, source, fragments):
    """Data files of a run at level summary, or of a speculative run, copied over a plain run at level full."""
    out = copy_run(runs.ref, tmp_path)
    for theirs, mine in zip(run_files(getattr(runs, source))[:2], run_files(out)[:2]):
        shutil.copy(theirs, mine)
    before = [p.read_bytes() for p in run_files(out)]
    result = invoke("generate", *runs.flags, "--output", out)
    one_line_error(result, *fragments)
    assert LOADING not in result.stdout and [p.read_bytes() for p in run_files(out)] == before


def test_resume_refuses_a_committed_line_with_other_prompt_ids(runs, tmp_path):
    out = copy_run(runs.ref, tmp_path)
    sidecar = run_files(out)[1]
    lines = sidecar.read_bytes().splitlines(keepends=True)
    record = orjson.loads(lines[2])
    record["prompt_ids_theta"] = record["prompt_ids_theta"][1:]
    sidecar.write_bytes(b"".join([*lines[:2], orjson.dumps(record) + b"\n", *lines[3:]]))
    result = invoke("generate", *runs.flags, "--output", out)
    one_line_error(result, "run.diagnostics.jsonl line 3 (sample 2 response 0) holds other prompt ids", "another run")


def test_lines_past_the_committed_count_are_sampled_again(runs, tmp_path):
    """Lines beyond ``counts.done`` from a run with another seed are not kept: the resumed files equal
    the reference run's, byte for byte."""
    out = copy_run(runs.ref, tmp_path)
    for mine, theirs in zip(run_files(out)[:2], run_files(runs.seed)[:2]):
        mixed = mine.read_bytes().splitlines(keepends=True)[:3] + theirs.read_bytes().splitlines(keepends=True)[3:]
        mine.write_bytes(b"".join(mixed))
    as_if_killed_after(out, 3)
    result = invoke("generate", *runs.flags, "--output", out)
    assert result.exit_code == 0 and "resuming: 3 of 6" in result.output, result.output
    assert [p.read_bytes() for p in run_files(out)[:2]] == [p.read_bytes() for p in run_files(runs.ref)[:2]]
