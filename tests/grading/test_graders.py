"""Graders as pure functions (no models): equal values in other forms graded right, wrong ones wrong,
failures ungraded with their reason; pass@k against brute-force enumeration; the worker pool's limit."""

import itertools

import numpy as np
import pytest

from qstar_cli.grading.graders import (
    GraderError,
    GraderSpec,
    grade,
    gsm8k_answer,
    last_boxed,
    latex_reference,
    resolve_grader,
)
from qstar_cli.grading.pool import GradingPool
from qstar_cli.grading.statistics import grade_summary, k_values, pass_at_k

MATH, EXACT = GraderSpec("math"), GraderSpec("exact")


@pytest.mark.parametrize(
    "response, reference",
    [
        ("0.5", r"\frac{1}{2}"),  # DeepScaleR's bare LaTeX
        (r"So the area is $\frac{1}{2}$.", "0.5"),
        (r"First 12, then 24, so \boxed{36}", "36"),
        ("The answer is 6.", "6"),
        ("Adding them up gives 42 apples in all. Final answer: 42", "Natalia sold 48/2 = 24 clips.\n48 + 24 = 72\n#### 42"),
        (r"The angle is \boxed{\frac{\pi}{4}}", r"\frac{\pi}{4}"),
        (r"It costs \boxed{1,000} dollars", "1000"),
        (r"I think 2, then \boxed{3}, hmm, maybe 5", "3"),  # boxed before the last expression
    ],
)
def test_math_grades_equal_values_in_other_forms_right(response, reference):
    result = grade(MATH, response, {"answer": reference})
    assert result["correct"] is True and result["score"] == 1.0, result
    assert result["extracted"]


@pytest.mark.parametrize(
    "response, reference",
    [
        ("The answer is 7.", "6"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        ("", "6"),  # empty: wrong, not an error
        ("I do not know.", "6"),  # no answer: wrong
        (r"\boxed{35}", "#### 36"),
    ],
)
def test_math_grades_wrong_answers_wrong(response, reference):
    result = grade(MATH, response, {"answer": reference})
    assert result["correct"] is False and result["score"] == 0.0, result
    assert "failure" not in result


def test_references_as_datasets_hold_them():
    assert gsm8k_answer("3 + 4 = 7\n#### 7") == "7"
    assert latex_reference(r"\frac{\pi}{4}") == r"$\frac{\pi}{4}$"
    assert latex_reference(r"$x$") == "$x$"
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \boxed{3}") == "3"
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed("no box") is None


def test_exact_grader_normalises_text():
    assert grade(EXACT, "The answer is Paris.", {"answer": "paris"})["correct"] is True
    assert grade(EXACT, r"so \boxed{1,024}", {"answer": "1024"}) == {"correct": True, "score": 1.0, "extracted": "1024"}
    assert grade(EXACT, "#### 18", {"answer": "So 18 \n#### 18"})["correct"] is False  # '#### 18' is no stated answer
    assert grade(EXACT, "The answer is London.", {"answer": "Paris"})["correct"] is False
    assert grade(EXACT, "   ", {"answer": "Paris"}) == {"correct": False, "score": 0.0, "extracted": None}


def test_missing_or_unparseable_references_are_ungraded_with_a_reason():
    assert grade(MATH, "6", {"answer": None})["failure"] == "no reference"
    assert grade(EXACT, "6", {})["failure"] == "no reference"
    assert grade(GraderSpec("math", "solution"), "6", {"answer": "6"})["failure"] == "no reference"
    assert grade(MATH, "6", {"answer": r"\text{}"})["failure"] == "reference not parsed"


def write_grader(tmp_path, body, name="grader.py"):
    path = tmp_path / name
    path.write_text("import time\n\n" + body)
    return str(path)


def test_custom_grader_results(tmp_path):
    file = write_grader(tmp_path, "import numpy as np\n\ndef score(response, row):\n    return eval(response)\n")
    spec = resolve_grader(f"{file}:score", None)
    assert grade(spec, "True", {}) == {"correct": True, "score": 1.0, "extracted": None}
    assert grade(spec, "0.25", {}) == {"correct": False, "score": 0.25, "extracted": None}
    assert grade(spec, "1", {})["correct"] is True
    # numpy's scalars count as Python's; a dict may carry the extracted answer, for majority voting.
    assert grade(spec, "np.float32(1.0)", {}) == grade(spec, "np.bool_(True)", {}) == {"correct": True, "score": 1.0, "extracted": None}
    assert grade(spec, "{'correct': False, 'extracted': '7'}", {}) == {"correct": False, "score": 0.0, "extracted": "7"}
    assert grade(spec, "{'score': np.float64(0.5), 'extracted': None}", {}) == {"correct": False, "score": 0.5, "extracted": None}
    for bad in ("1.5", "-0.1", "'yes'", "None", "float('nan')", "{'extracted': 'x'}", "{'correct': True, 'extracted': 7}"):
        assert grade(spec, bad, {})["failure"] == "invalid result", bad
    assert grade(spec, "1 / 0", {})["failure"] == "raised ZeroDivisionError"
    # Nothing a grader raises or calls ends qstar: sys.exit and KeyboardInterrupt are that sample's failure.
    assert grade(spec, "__import__('sys').exit(0)", {})["failure"] == "raised SystemExit"
    assert grade(spec, "exec('raise KeyboardInterrupt')", {})["failure"] == "raised KeyboardInterrupt"


def test_references_that_are_numbers_are_compared_as_their_text():
    assert grade(MATH, "The answer is 4.", {"answer": 4})["correct"] is True
    assert grade(MATH, r"So it is \boxed{\frac{1}{2}}", {"answer": 0.5})["correct"] is True
    assert grade(MATH, "The answer is 4.", {"answer": np.int64(4)})["correct"] is True
    assert grade(EXACT, "The answer is 4.", {"answer": 4})["correct"] is True


def test_bad_graders_are_refused(tmp_path, monkeypatch):
    file = write_grader(tmp_path, "def two(response, row):\n    return True\n\ndef one(response):\n    return True\n")
    with pytest.raises(GraderError, match="grader file not found: nowhere.py"):
        resolve_grader("nowhere.py:two", None)
    with pytest.raises(GraderError, match="defines no function three"):
        resolve_grader(f"{file}:three", None)
    with pytest.raises(GraderError, match=r"must take \(response, row\)"):
        resolve_grader(f"{file}:one", None)
    with pytest.raises(GraderError, match="unknown grader 'maths'"):
        resolve_grader("maths", None)
    monkeypatch.setattr("qstar_cli.grading.graders.math_verify_installed", lambda: False)
    with pytest.raises(GraderError, match="needs HF math-verify, which is not installed"):
        resolve_grader("math", None)


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The share of the k-subsets of the responses that hold a right one."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12), (n, c, k)
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]


def test_grade_summary_by_hand():
    right = {"correct": True, "score": 1.0, "extracted": "6"}
    wrong = {"correct": False, "score": 0.0, "extracted": "7"}
    none = {"correct": False, "score": 0.0, "extracted": None}
    timeout = {"correct": None, "score": None, "extracted": None, "failure": "timeout"}
    lines = [
        (0, 0, right), (0, 1, wrong), (0, 2, wrong), (0, 3, right),  # 2 of 4 right; vote tied 6 vs 7: 6 came first, right
        (1, 0, wrong), (1, 1, wrong), (1, 2, none), (1, 3, timeout),  # one ungraded: out of pass@k and the vote
        (2, 0, wrong), (2, 1, right), (2, 2, wrong), (2, 3, none),  # 1 of 4 right; vote 7, wrong
        (3, 0, None),  # not graded (no grade in the line): out of pass@k and the vote
    ]  # fmt: skip
    log_w = {(i, r): float(4 * i + r) for i, r, _ in lines}
    summary = grade_summary(lines, log_w)
    counts = (summary["samples"], summary["graded"], summary["correct"], summary["failed"], summary["not_graded"])
    assert counts == (13, 11, 3, 1, 1) and summary["failures"] == {"timeout": 1} and summary["accuracy"] == pytest.approx(3 / 11)
    assert (summary["prompts"], summary["prompts_all_graded"]) == (4, 2)
    for k in (1, 2, 4):
        expected = [brute_force_pass_at_k([True] * c + [False] * (4 - c), k) for c in (2, 1)]
        assert summary["pass_at_k"][str(k)] == pytest.approx(sum(expected) / 2)
    assert summary["majority_accuracy"] == 0.5
    by_weight = summary["by_weight"]
    assert by_weight["log_w_mean_correct"] == pytest.approx((0 + 3 + 9) / 3)
    # log w of the 11 graded (0-6, 8-11), in quarters of 3, 3, 3 and 2: (0 1 2) (3 4 5) (6 8 9) (10 11)
    assert by_weight["accuracy_by_log_w_quarter"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert grade_summary([]) is None and grade_summary([(0, 0, None)]) is None
    # A grader that extracts no answer (a custom one) leaves no vote to take: null, not 0.
    custom = [(i, r, {"correct": r == 0, "score": float(r == 0), "extracted": None}) for i in range(2) for r in range(2)]
    assert grade_summary(custom)["majority_accuracy"] is None and grade_summary(custom)["pass_at_k"]["2"] == 1.0


def test_pool_bounds_a_pathological_expression_and_a_sleeping_grader(tmp_path):
    """A hang ends ungraded at its limit, its worker replaced: the samples after it are graded. Bounded
    by work, not seconds: the sleeping grader marks each start and end, and none of its 600 s sleeps ends."""
    with GradingPool(MATH, workers=1, timeout=1.0) as pool:
        pool.submit(0, r"\boxed{9^{9^{9^{9}}}}", {"answer": "1"})  # sympy would compute this for ever
        pool.submit(1, r"\boxed{36}", {"answer": "36"})
        assert pool.take(0)["failure"] == "timeout"
        assert pool.take(1)["correct"] is True
    marks = tmp_path / "marks"
    body = f"def slow(response, row):\n    open({str(marks)!r}, 'a').write('start\\n')\n    time.sleep(600)\n    open({str(marks)!r}, 'a').write('end\\n')\n"
    sleeper = write_grader(tmp_path, body)
    with GradingPool(resolve_grader(f"{sleeper}:slow", None), workers=2, timeout=0.5) as pool:
        for key in range(4):
            pool.submit(key, "x", {})
        assert [pool.take(key)["failure"] for key in range(4)] == ["timeout"] * 4
        assert pool.record()["failed"] == {"timeout": 4}
    assert marks.read_text() == "start\n" * 4  # each began, none ran on: every worker was stopped at its limit
