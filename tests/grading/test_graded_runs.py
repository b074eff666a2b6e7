"""Graded runs end to end on tiny models: grades in the main file, off the decode path and bounded in
time, resumable byte for byte; ``qstar grade``, ``analyze``/``compare`` and ``export --keep correct``
on them; each bad input one line and exit 2 before the models load."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from qstar_cli.analysis.statistics import logsumexp
from tests.helpers import cli, file_bytes, invoke, kill_at_random_moments, one_line_error, paths, read_lines, spawn, write_jsonl

ROWS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "id": i} for i in range(8)]
LOADING = "loading models"  # what generate prints just before the models load
#: A grader whose grades vary over gibberish: the response's length against the answer's parity.
PARITY = "import time\n\ndef parity(response, row):\n    time.sleep(DELAY)\n    return len(response) % 2 == int(row['answer']) % 2\n"


@pytest.fixture(scope="module")
def graded(tiny_model_dirs, tmp_path_factory):
    """Model and dataset flags, and a parity grader file that sleeps ``delay`` seconds per response."""
    root = tmp_path_factory.mktemp("graded")
    theta, target = tiny_model_dirs
    # Most responses of a tiny random model run to the token budget: graded too, so that grades vary.
    args = ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", str(write_jsonl(root / "rows.jsonl", ROWS)),
            "--max-new-tokens", "16", "--batch-size", "3", "--device", "cpu", "--grade-truncated"]  # fmt: skip

    def grader(delay: float) -> str:
        path = root / f"parity_{str(delay).replace('.', '_')}.py"
        path.write_text(PARITY.replace("DELAY", str(delay)))
        return f"{path}:parity"

    return args, grader, root


def test_grades_in_the_main_file_and_qstar_grade_gives_the_same_bytes(graded, tmp_path):
    args, grader, _ = graded
    out, plain = tmp_path / "graded.jsonl", tmp_path / "plain.jsonl"
    assert cli(*args, "--grader", grader(0.02), "--output", out).exit_code == 0
    assert cli(*args, "--output", plain).exit_code == 0
    lines = read_lines(out)
    for line in lines:
        expected = len(line["messages"][-1]["content"]) % 2 == int(line["original_answer"]) % 2
        assert line["grade"] == {"correct": expected, "score": float(expected), "extracted": None}
        assert list(line)[-1] == "grade"
    assert {line["grade"]["correct"] for line in lines} == {True, False}
    # Grading changes nothing else: the ungraded run's lines are the graded one's without grade.
    assert [{k: v for k, v in line.items() if k != "grade"} for line in lines] == read_lines(plain)
    assert file_bytes(out)[1] == file_bytes(plain)[1]
    meta = json.loads(open(paths(out)[2]).read())
    assert meta["fingerprint_config"]["grader"].endswith("parity_0_02.py:parity")
    assert "grader" not in json.loads(open(paths(plain)[2]).read())["fingerprint_config"]  # ungraded: fingerprinted as before
    correct = sum(line["grade"]["correct"] for line in lines)
    assert meta["sessions"][-1]["grades"] == {"grader": meta["fingerprint_config"]["grader"], "graded": 8, "correct": correct, "failed": {}}

    regraded = tmp_path / "regraded.jsonl"
    result = invoke("grade", plain, "--grader", grader(0.0), "--grade-truncated", "--output", regraded)
    assert result.exit_code == 0, result.output
    assert f"8 lines graded in {regraded}: accuracy {correct / 8:.3f}" in result.stdout
    assert regraded.read_bytes() == out.read_bytes()

    # analyze --json and compare show the grades.
    summary = json.loads(invoke("analyze", paths(out)[1], "--json").stdout)["grades"]
    assert (summary["graded"], summary["correct"], summary["failed"]) == (8, correct, 0)
    assert summary["accuracy"] == pytest.approx(correct / 8) and summary["pass_at_k"] == {"1": pytest.approx(correct / 8)}
    assert json.loads(invoke("analyze", paths(plain)[1], "--json").stdout)["grades"] is None
    table = invoke("compare", paths(out)[1], paths(plain)[1]).stdout
    assert "accuracy" in table and "pass@1" in table

    # The report marks each sample right or wrong, and can filter by it.
    page = tmp_path / "report.html"
    assert invoke("report", out, "--output", page).exit_code == 0
    html = page.read_text()
    marks = ["right" if line["grade"]["correct"] else "wrong" for line in lines]
    assert [m for m in re.findall(r'"grade":"(\w+)"', html)] == marks and 'id="grade"' in html
    assert "8 of 8" in invoke("analyze", paths(out)[1]).stdout

    # A resumed run with another grader, or none, is refused: the grader is in the fingerprint.
    for other in (["--grader", "exact"], []):
        one_line_error(cli(*args, *other, "--output", out), "another configuration", "grader")


def test_pass_at_k_of_a_run_with_k_responses(graded, tmp_path):
    args, grader, _ = graded
    out = tmp_path / "k.jsonl"
    assert cli(*args, "--num-samples", "3", "--samples-per-prompt", "4", "--grader", grader(0.0), "--output", out).exit_code == 0
    lines = read_lines(out)
    summary = json.loads(invoke("analyze", paths(out)[1], "--json").stdout)["grades"]
    assert set(summary["pass_at_k"]) == {"1", "2", "4"}
    right = [[line["grade"]["correct"] for line in lines if line["sample_idx"] == i] for i in range(3)]
    assert summary["pass_at_k"]["4"] == pytest.approx(np.mean([any(r) for r in right]))
    assert summary["pass_at_k"]["1"] == pytest.approx(np.mean([np.mean(r) for r in right]))


def test_sleeping_grader_and_pathological_reference_end_ungraded_within_the_limit(graded, tmp_path):
    """Bounded by work, not seconds: the sleeping grader marks each start and end, and none of its sleeps ends."""
    args, _, root = graded
    out, marks = tmp_path / "sleep.jsonl", tmp_path / "marks"
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import time\n\ndef slow(response, row):\n    open({str(marks)!r}, 'a').write('start\\n')\n"
                       f"    time.sleep(600)\n    open({str(marks)!r}, 'a').write('end\\n')\n")  # fmt: skip
    result = cli(*args, "--num-samples", "4", "--grader", f"{sleeper}:slow", "--grader-timeout", "0.5", "--output", out)
    assert result.exit_code == 0, result.output
    assert marks.read_text() == "start\n" * 4  # each began, none ran on: every worker was stopped at its limit
    assert [line["grade"] for line in read_lines(out)] == [{"correct": None, "score": None, "extracted": None, "failure": "timeout"}] * 4
    assert json.loads(open(paths(out)[2]).read())["sessions"][-1]["grades"]["failed"] == {"timeout": 4}

    # sympy would compute 9^(9^(9^9)) for ever: those lines end ungraded at the limit, the others graded.
    tower, right = r"So it is \boxed{9^{9^{9^{9}}}}", r"So it is \boxed{\frac{1}{2}}"
    chat = [{"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}], "original_answer": "0.5"}
            for reply in (tower, right, tower, right)]  # fmt: skip
    graded_file = tmp_path / "tower.graded.jsonl"
    result = invoke("grade", write_jsonl(root / "tower.jsonl", chat), "--grader-timeout", "1", "--output", graded_file)
    assert result.exit_code == 0, result.output
    assert [line["grade"].get("failure") or line["grade"]["correct"] for line in read_lines(graded_file)] == ["timeout", True] * 2
    assert "accuracy 1.000 (2 of 2 right); ungraded: 2 timeout" in result.stdout


def test_kill_9_and_resume_with_grading_is_byte_identical(spread_model_dirs, graded, tmp_path):
    """Grades lag the decode (each takes 50 ms): samples wait for theirs, commit in order, and a run
    killed at random moments and resumed writes the bytes of an uninterrupted one."""
    _, grader, root = graded
    theta, target = spread_model_dirs
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"What is {i} times {i}?", "answer": str(i * i)} for i in range(24)])
    args = ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", str(rows),
            "--max-new-tokens", "120", "--batch-size", "2", "--device", "cpu", "--grader", grader(0.05)]  # fmt: skip
    reference = tmp_path / "ref.jsonl"
    assert spawn(args, reference).wait(timeout=300) == 0
    rng = np.random.default_rng(33)
    out = tmp_path / "k.jsonl"
    interrupted = kill_at_random_moments(lambda: spawn(args, out), out, rng, max_delay=0.3)
    assert interrupted >= 2
    proc = spawn(args, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert file_bytes(out) == file_bytes(reference)
    assert all("grade" in line for line in read_lines(out))


def test_export_keep_correct_rows_and_weights_by_hand(graded, tmp_path):
    args, grader, _ = graded
    out = tmp_path / "run.jsonl"
    assert cli(*args, "--grader", grader(0.0), "--output", out).exit_code == 0
    lines, side = read_lines(out), read_lines(paths(out)[1])
    kept = [(m, s) for m, s in zip(lines, side) if m["grade"]["correct"]]
    dropped_wrong = sum(not m["grade"]["correct"] for m in lines)
    assert kept and dropped_wrong
    result = invoke("export", out, "--output", tmp_path / "kept.parquet", "--keep", "correct", "--gamma", "1", "--include-truncated")
    assert result.exit_code == 0, result.output
    assert f"{len(kept)} samples" in result.stdout and f"left out {dropped_wrong} wrong" in result.stdout
    table = pq.read_table(tmp_path / "kept.parquet")
    assert table.column("sample_idx").to_pylist() == [m["sample_idx"] for m, _ in kept]
    # w = exp(log w) self-normalised to mean 1 over what is kept: log w = logp_theta_sum - logp_q_sum.
    log_w = np.array([s["logp_theta_sum"] - s["logp_q_sum"] for _, s in kept])
    assert table.column("weight").to_pylist() == pytest.approx(np.exp(log_w - logsumexp(log_w)) * len(kept), rel=1e-9)
    metadata = json.loads(table.schema.metadata[b"qstar"])
    assert metadata["keep"] == "correct" and metadata["dropped"] == {"wrong": dropped_wrong} and metadata["exported"] == len(kept)


def write_grader_file(root, text):
    path = root / "bad_grader.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--grader", "missing.py:grade"], ["grader file not found: missing.py"]),
        (["--grader", "FILE:nothing"], ["defines no function nothing"]),
        (["--grader", "FILE:one"], ["must take (response, row)"]),
        (["--grader", "maths"], ["unknown grader 'maths'"]),
        (["--grader", "math", "--answer-field", "solution"], ["column 'solution'", "columns there are: answer, id"]),
        (["--grader", "exact", "--grader-timeout", "0"], ["--grader-timeout must be positive"]),
        (["--grader", "math", "MATH_VERIFY_ABSENT"], ["needs HF math-verify, which is not installed"]),
    ],
)
def test_bad_grading_input_is_one_line_before_the_models_load(graded, tmp_path, monkeypatch, flags, fragments):
    args, _, _ = graded
    file = write_grader_file(tmp_path, "def one(response):\n    return True\n")
    flags = [f.replace("FILE", file) for f in flags]
    if "MATH_VERIFY_ABSENT" in flags:
        flags.remove("MATH_VERIFY_ABSENT")
        monkeypatch.setattr("qstar_cli.grading.graders.math_verify_installed", lambda: False)
    result = cli(*args, *flags, "--output", tmp_path / "out.jsonl")
    one_line_error(result, *fragments)
    assert LOADING not in result.stdout and not (tmp_path / "out.jsonl").exists()


def test_keep_correct_on_an_ungraded_run_and_grade_misuse_are_refused(graded, tmp_path):
    args, _, _ = graded
    out = tmp_path / "plain.jsonl"
    assert cli(*args, "--num-samples", "2", "--output", out).exit_code == 0
    one_line_error(invoke("export", out, "--output", tmp_path / "x.parquet", "--keep", "correct"), "is not graded", "qstar grade")
    one_line_error(invoke("export", out, "--output", tmp_path / "x.parquet", "--keep", "right"), "--keep must be one of all, correct")
    one_line_error(invoke("grade", out, "--output", out), "would overwrite the input")
    one_line_error(invoke("grade", tmp_path / "nope.jsonl", "--output", tmp_path / "g.jsonl"), "file to grade not found")
    one_line_error(
        invoke("grade", out, "--answer-field", "solution", "--output", tmp_path / "g.jsonl"),
        "column 'solution'",
        "columns there are: answer, id",
    )
    assert not (tmp_path / "g.jsonl").exists() and not (tmp_path / "x.parquet").exists()
