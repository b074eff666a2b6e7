"""``qstar grade`` and custom graders as an adversarial user found them: nothing overwritten (a live
run's files, a finished run's, the grader's own source), nothing mixed (two grades at once, a grader
edited before a resume), nothing left by a kill; whatever a grader raises, prints or calls at import
or while grading is one line or that sample's failure; a run regraded in place is what analyze and
export see; grades counted over all samples; progress lines without a terminal."""

import json
import subprocess
import sys
import time
from hashlib import sha256

import filelock
import pyarrow.parquet as pq
import pytest

from qstar_cli.generate.config import GenerateConfig
from qstar_cli.grading.graders import GraderSpec, grade
from tests.helpers import cli, invoke, one_line_error, paths, read_lines, spawn, tiny_run_flags, write_jsonl

ROWS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "id": i} for i in range(8)]
LOADING = "loading models"
MATH = GraderSpec("math")
#: A grader whose grades vary over gibberish; it marks each sample it starts in MARKS, sleeps DELAY
#: seconds (work that a test can wait on), and prints (which must not reach qstar's output).
GRADER = (
    "import time\n\ndef parity(response, row):\n    open(MARKS, 'a').write('start\\n')\n    print('grading', row['id'])\n"
    "    time.sleep(DELAY)\n    return len(response) % 2 == int(row['answer']) % 2\n"
)


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    """Generate flags, a finished ungraded run of 8 samples, and a maker of grader files."""
    root = tmp_path_factory.mktemp("grade_safety")
    args = [*tiny_run_flags(tiny_model_dirs, write_jsonl(root / "rows.jsonl", ROWS), 16, 3), "--grade-truncated"]
    run = root / "runs" / "run.jsonl"
    assert cli(*args, "--output", run).exit_code == 0  # most responses run to the budget: graded too (--grade-truncated)

    def grader(folder, delay: float = 0.0, name: str = "g.py") -> tuple[str, str]:
        path, marks = folder / name, folder / f"{name}.marks"
        path.write_text(GRADER.replace("MARKS", repr(str(marks))).replace("DELAY", str(delay)))
        return f"{path}:parity", marks

    return args, run, grader


def grade_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qstar_cli", "grade", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, process: subprocess.Popen) -> None:
    while not condition() and process.poll() is None:
        time.sleep(0.01)


def test_a_live_run_is_never_written_over_and_shows_progress_under_a_pipe(setup, spread_model_dirs, tmp_path, monkeypatch):
    """While a generate writes live/run.jsonl (its grades taking 0.2 s each, so that it runs a while),
    grade may not write its main file or sidecar, nor regrade it in place; the run then ends whole.
    Its standard error, a pipe, carries a progress line at least every QSTAR_PROGRESS_SECONDS."""
    args, run, grader = setup
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"Count to {i}.", "answer": str(i), "id": i} for i in range(12)])
    name, marks = grader(tmp_path, delay=0.2)
    live = tmp_path / "live" / "run.jsonl"
    monkeypatch.setenv("QSTAR_PROGRESS_SECONDS", "0.3")
    proc = spawn([*tiny_run_flags(spread_model_dirs, rows, 40, 2), "--grader", name, "--grader-workers", "1"], live)
    wait_for(lambda: marks.exists(), proc)  # sampling and grading under way
    for target_file in (live, paths(live)[1]):
        line = one_line_error(invoke("grade", run, "--grader", name, "--output", target_file), f"--output {target_file}")
        assert "being written by another qstar process" in line or "of the run" in line, line
    one_line_error(invoke("grade", live, "--grader", name, "--in-place"), "a qstar process is writing the run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    lines = read_lines(live)
    assert len(lines) == 12 and all("grade" in line for line in lines) and len(read_lines(paths(live)[1])) == 12
    assert "Traceback" not in err.decode()
    progress = [line for line in err.decode().splitlines() if line.startswith("progress: ")]
    assert len(progress) >= 2 and any(" samples, " in line and " tok/s, ETA " in line for line in progress), progress
    assert invoke("export", live, "--output", tmp_path / "t.parquet", "--include-truncated").exit_code == 0


def test_grade_refuses_a_runs_files_and_its_graders_source(setup, tmp_path):
    args, run, grader = setup
    name, _ = grader(tmp_path)
    side, meta = paths(run)[1:]
    before = {p: open(p, "rb").read() for p in (run, side, meta)}
    cases = {side: "is the sidecar of the run", meta: "is the manifest of the run", f"{run}.lock": "is the lock of the run",
             name.rpartition(":")[0]: "would overwrite the input"}  # fmt: skip
    for output, fragment in cases.items():
        one_line_error(invoke("grade", run, "--grader", name, "--output", output), fragment)
    one_line_error(invoke("grade", run, "--grader", name, "--output", run), "would overwrite the input", "--in-place")
    other = tmp_path / "copy.jsonl"
    other.write_bytes(before[run])
    one_line_error(invoke("grade", other, "--grader", name, "--output", run), f"--output {run} is the main file of the run")
    assert {p: open(p, "rb").read() for p in before} == before


def test_two_grades_at_once_and_a_kill_leave_one_whole_output_and_no_temporary(setup, tmp_path):
    args, run, grader = setup
    name, marks = grader(tmp_path, delay=0.3)
    out = tmp_path / "graded" / "out.jsonl"
    out.parent.mkdir()
    first = grade_process(run, "--grader", name, "--grade-truncated", "--output", out)
    wait_for(lambda: marks.exists(), first)
    one_line_error(invoke("grade", run, "--grader", name, "--output", out), f"--output {out} is being written by another qstar process")
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr.decode()
    # What the grader prints goes to standard error, prefixed; qstar's output is its summary alone.
    assert len(stdout.decode().splitlines()) == 1 and stdout.decode().startswith(f"8 lines graded in {out}: accuracy")
    assert "grader output: grading 0" in stderr.decode() and "Traceback" not in stderr.decode()
    lines = read_lines(out)
    assert [line["grade"]["correct"] for line in lines] == [len(line["messages"][-1]["content"]) % 2 == 0 for line in lines]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]

    marks.unlink()
    killed = grade_process(run, "--grader", name, "--grade-truncated", "--output", out)
    wait_for(lambda: marks.exists(), killed)
    killed.kill()
    killed.wait()
    # The output is the previous one, whole; no temporary is left (the lock file stays, as a killed run's does).
    assert read_lines(out) == lines and sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl", "out.jsonl.lock"]
    assert invoke("grade", run, "--grader", name, "--grade-truncated", "--output", out).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]


def test_a_grader_edited_before_a_resume_is_refused(setup, tmp_path):
    args, _, grader = setup
    name, _ = grader(tmp_path)
    out = tmp_path / "run.jsonl"
    assert cli(*args, "--num-samples", "4", "--grader", name, "--output", out).exit_code == 0
    file = name.rpartition(":")[0]
    with open(file, "a") as f:
        f.write("\n# returns the opposite now\n")
    result = cli(*args, "--grader", name, "--output", out)  # 8 rows: a resume of the 4 done
    one_line_error(result, f"the grader {file} changed in content since the run began")
    assert LOADING not in result.stdout and len(read_lines(out)) == 4
    assert cli(*args, "--grader", name, "--overwrite", "--output", out).exit_code == 0
    # An adapter's file is fingerprinted by its content the same way.
    adapter = tmp_path / "adapter.py"
    adapter.write_text("from qstar_cli.adapters import DatasetAdapter\n")
    config = GenerateConfig(model_theta="demo", model_t="demo", dataset="d.jsonl", adapter=f"{adapter}:Mine", grader=name)
    digests = {k: config.fingerprint_config()[k] for k in ("grader_sha256", "adapter_sha256")}
    assert digests == {
        "grader_sha256": sha256(open(file, "rb").read()).hexdigest(),
        "adapter_sha256": sha256(adapter.read_bytes()).hexdigest(),
    }


def test_system_exit_from_a_grader_at_import_is_one_line_and_while_grading_a_failure(setup, tmp_path):
    args, run, _ = setup
    at_import, at_grading = tmp_path / "at_import.py", tmp_path / "at_grading.py"
    at_import.write_text("import sys\nsys.exit(0)\n\ndef g(response, row):\n    return True\n")
    at_grading.write_text("import sys\n\ndef g(response, row):\n    sys.exit(3)\n")
    result = cli(*args, "--grader", f"{at_import}:g", "--output", tmp_path / "a.jsonl")
    one_line_error(result, "importing", "raised SystemExit")
    assert LOADING not in result.stdout
    one_line_error(invoke("grade", run, "--grader", f"{at_import}:g", "--output", tmp_path / "b.jsonl"), "raised SystemExit")
    failed = {"correct": None, "score": None, "extracted": None, "failure": "raised SystemExit"}
    result = invoke("grade", run, "--grader", f"{at_grading}:g", "--grade-truncated", "--output", tmp_path / "c.jsonl")
    assert result.exit_code == 0 and "ungraded: 8 raised SystemExit" in result.stdout
    assert [line["grade"] for line in read_lines(tmp_path / "c.jsonl")] == [failed] * 8
    assert cli(*args, "--num-samples", "2", "--grader", f"{at_grading}:g", "--output", tmp_path / "d.jsonl").exit_code == 0
    assert [line["grade"] for line in read_lines(tmp_path / "d.jsonl")] == [failed] * 2


def test_a_run_regraded_in_place_is_what_analyze_export_and_a_resume_see(setup, tmp_path):
    args, run, grader = setup
    out = tmp_path / "run.jsonl"
    for source, target in zip(paths(run), paths(out)):
        open(target, "wb").write(open(source, "rb").read())
    name, _ = grader(tmp_path)
    one_line_error(invoke("export", out, "--output", tmp_path / "x.parquet", "--keep", "correct"), "is not graded", "--in-place")
    copy = tmp_path / "copy.jsonl"
    assert invoke("grade", out, "--grader", name, "--grade-truncated", "--output", copy).exit_code == 0
    one_line_error(
        invoke("export", copy, "--output", tmp_path / "x.parquet"), "is not a run's main file", "qstar grade OUT.jsonl --in-place"
    )
    with filelock.FileLock(f"{out}.lock", timeout=0):  # a generate writing the run
        one_line_error(invoke("grade", out, "--grader", name, "--in-place"), "a qstar process is writing the run")

    result = invoke("grade", out, "--grader", name, "--grade-truncated", "--in-place")
    assert result.exit_code == 0, result.output
    assert open(out, "rb").read() == open(copy, "rb").read()  # the copy's bytes, in the run itself
    right = sum(line["grade"]["correct"] for line in read_lines(out))
    summary = json.loads(invoke("analyze", paths(out)[1], "--json").stdout)["grades"]
    assert (summary["samples"], summary["graded"], summary["correct"]) == (8, 8, right)
    # A custom grader extracts no answer: no majority vote to take (null, n/a), not 0.
    assert summary["majority_accuracy"] is None
    table = invoke("analyze", paths(out)[1]).stdout.splitlines()
    assert [line.split()[-1] for line in table if line.split()[:2] == ["majority-vote", "accuracy"]] == ["n/a"]
    result = invoke("export", out, "--output", tmp_path / "kept.parquet", "--keep", "correct", "--include-truncated")
    assert result.exit_code == 0 and pq.read_table(tmp_path / "kept.parquet").num_rows == right
    meta = json.loads(open(paths(out)[2]).read())
    assert meta["config"]["grader"] == meta["fingerprint_config"]["grader"] == name and meta["regraded"]["correct"] == right
    # The run resumes with the grader it now has, and with no other.
    one_line_error(cli(*args, "--output", out), "another configuration", "grader")
    result = cli(*args, "--grader", name, "--grade-truncated", "--output", out)
    assert result.exit_code == 0 and "8/8 samples" in result.stdout and open(out, "rb").read() == open(copy, "rb").read()


def test_grades_are_counted_over_all_samples(setup, tmp_path):
    """A main file whose later lines have no grade: those are counted as not graded, not dropped."""
    args, run, grader = setup
    name, _ = grader(tmp_path)
    out = tmp_path / "run.jsonl"
    for source, target in zip(paths(run), paths(out)):
        open(target, "wb").write(open(source, "rb").read())
    assert invoke("grade", out, "--grader", name, "--grade-truncated", "--in-place").exit_code == 0
    lines = read_lines(out)
    for line in lines[4:]:
        del line["grade"]
    out.write_bytes(b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines))
    summary = json.loads(invoke("analyze", paths(out)[1], "--json").stdout)["grades"]
    assert (summary["samples"], summary["graded"], summary["not_graded"]) == (8, 4, 4)
    assert (summary["prompts"], summary["prompts_all_graded"]) == (8, 4) and list(summary["pass_at_k"]) == ["1"]
    table = invoke("analyze", paths(out)[1]).stdout
    assert "4 of 8" in table and "not graded (no grade in the line)" in table


#: The demo's response to row 22 (the fifth of five numbers averaging 12) cut off at its 96 tokens: it
#: restates 12 mid-sentence, and math-verify's last-expression rule took that for its answer.
DEMO_TRUNCATED = (
    " This is a classic example of a lateral thinking puzzle. Let's break it down step by step.\n\nWe are g"
    "iven that the average of five numbers (A) is 12. To find the fifth number, we need to consider the t"
    "wo values that satisfy this condition: the average of the first five numbers (which is 12) and the f"
    "ifth number itself.\n\nLet's assume we can represent the values A = 12 and the third number"
)


def test_a_truncated_response_is_graded_wrong_and_misuse_is_one_line(setup, tmp_path):
    _, run, _ = setup
    row = {"answer": "12"}
    assert grade(MATH, DEMO_TRUNCATED, row, "length") == {"correct": False, "score": 0.0, "extracted": None, "reason": "truncated"}
    assert grade(GraderSpec("math", grade_truncated=True), DEMO_TRUNCATED, row, "length")["correct"] is True  # the spurious right
    chat = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": DEMO_TRUNCATED}], "original_answer": "12"}
    source = write_jsonl(tmp_path / "demo.jsonl", [{**chat, "finish_reason": "length"}, {**chat, "finish_reason": "stop"}])
    result = invoke("grade", source, "--output", tmp_path / "graded.jsonl")
    assert result.exit_code == 0 and "accuracy 0.500 (1 of 2 right; 1 cut off by the token budget graded wrong)" in result.stdout
    assert [line["grade"].get("reason") for line in read_lines(tmp_path / "graded.jsonl")] == ["truncated", None]

    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(json.dumps(chat) + "\n{not json\n")
    one_line_error(invoke("grade", damaged, "--output", tmp_path / "d.jsonl"), f"{damaged} line 2 is not JSON")
    one_line_error(invoke("grade", run, "--output", tmp_path / "e.jsonl", "--in-place"), "not both")
    one_line_error(invoke("grade", run), "give --output GRADED.jsonl for a graded copy, or --in-place")
    one_line_error(
        invoke("generate", "--overwrite", "--no-overwrite", "--model-theta", "demo"), "--overwrite and --no-overwrite contradict"
    )
    assert not any(p.name.startswith(("d.jsonl", "e.jsonl", ".d.jsonl")) for p in tmp_path.iterdir())
