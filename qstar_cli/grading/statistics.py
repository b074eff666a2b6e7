"""What the grades of a run say: accuracy, failures by reason, pass@k, majority vote, and accuracy
beside the sequence weight, counted over all the run's samples: graded, ungraded (the grader failed,
with its reason) and not graded (no grade in the line).

pass@k is the unbiased estimator of Chen et al. (2021): with ``n`` graded responses to a prompt, ``c``
of them right, ``pass@k = 1 - C(n - c, k) / C(n, k)`` (the chance that k of the n drawn without
replacement hold a right one), averaged over the prompts whose responses are all graded with at
least k of them, for k = 1, 2, 4 ... and K, the most responses a prompt has. The majority vote is
over the same prompts; it is null where no grade holds an extracted answer (a custom grader that
returns none).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

#: A sample and its grade: (sample_idx, response_idx, grade), the grade None where the line has none.
GradedLine = tuple[int, int, dict[str, Any] | None]


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: the chance that k of n responses (c right) drawn without replacement hold a right one."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(largest: int) -> list[int]:
    """1, 2, 4 ... below ``largest``, then ``largest``."""
    ks = [1 << i for i in range(max(largest, 1).bit_length()) if 1 << i < largest]
    return [*ks, largest] if largest >= 1 else []


def read_grades(main: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The grades of a main file by (sample_idx, response_idx) (lines without a ``grade`` or unreadable are left out)."""
    grades = {}
    with Path(main).open("rb") as f:
        for raw in f:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            grade = record.get("grade") if isinstance(record, dict) else None
            if isinstance(grade, dict) and isinstance(record.get("sample_idx"), int):
                grades[(record["sample_idx"], record.get("response_idx", 0))] = grade
    return grades


def _majority_correct(grades: list[dict[str, Any]]) -> bool:
    """Whether the answer most responses give (ties: the one given first) is right; no answer is wrong."""
    answers = [g["extracted"] for g in grades if g.get("extracted") is not None]
    if not answers:
        return False
    counts = Counter(answers)
    top = max(counts.values())
    chosen = next(a for a in answers if counts[a] == top)
    return any(g["correct"] is True for g in grades if g.get("extracted") == chosen)


def grade_summary(lines: Iterable[GradedLine], log_w: dict[tuple[int, int], float] | None = None) -> dict[str, Any] | None:
    """``analyze``'s ``grades`` object over every sample of ``lines`` (None when none is graded): counts,
    accuracy, failures by reason, pass@k and majority-vote accuracy over the fully graded prompts, and
    (given each sample's log w) accuracy beside the weight."""
    by_prompt: dict[int, list[dict[str, Any] | None]] = defaultdict(list)
    weighted: list[tuple[float, bool]] = []
    for sample_idx, response_idx, grade in lines:
        by_prompt[sample_idx].append(grade)
        if grade is not None and grade.get("correct") is not None and log_w is not None:
            if np.isfinite(log_w.get((sample_idx, response_idx), np.nan)):
                weighted.append((log_w[(sample_idx, response_idx)], grade["correct"] is True))
    grades = [g for gs in by_prompt.values() for g in gs]
    if all(g is None for g in grades):
        return None
    graded = [g for g in grades if g is not None and g.get("correct") is not None]
    failures = Counter(str(g.get("failure", "unknown")) for g in grades if g is not None and g.get("correct") is None)
    correct = sum(g["correct"] is True for g in graded)
    # pass@k and the vote: over the prompts whose responses are all graded.
    complete = [gs for gs in by_prompt.values() if all(g is not None and g.get("correct") is not None for g in gs)]
    largest = max((len(gs) for gs in complete), default=0)
    pass_k = {}
    for k in k_values(largest):
        values = [pass_at_k(len(gs), sum(g["correct"] is True for g in gs), k) for gs in complete if len(gs) >= k]
        pass_k[str(k)] = float(np.mean(values))
    extracted = any(g.get("extracted") is not None for gs in complete for g in gs)
    return {
        "samples": len(grades),
        "graded": len(graded),
        "correct": correct,
        "truncated": sum(g.get("reason") == "truncated" for g in graded),
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "not_graded": sum(g is None for g in grades),
        "accuracy": correct / len(graded) if graded else None,
        "prompts": len(by_prompt),
        "prompts_all_graded": len(complete),
        "pass_at_k": pass_k,
        "majority_accuracy": float(np.mean([_majority_correct(gs) for gs in complete])) if extracted else None,
        "by_weight": _by_weight(weighted),
    }


def _by_weight(weighted: list[tuple[float, bool]]) -> dict[str, Any] | None:
    """Are right answers likelier under pi_theta? The mean log w of right and of wrong responses, and
    the accuracy in each quarter of the responses ordered by log w (lowest first)."""
    if not weighted:
        return None
    log_w = np.array([w for w, _ in weighted])
    right = np.array([c for _, c in weighted])
    order = np.argsort(log_w, kind="stable")
    quarters = [part for part in np.array_split(right[order], 4) if part.size]
    return {
        "log_w_mean_correct": float(log_w[right].mean()) if right.any() else None,
        "log_w_mean_wrong": float(log_w[~right].mean()) if (~right).any() else None,
        "accuracy_by_log_w_quarter": [float(part.mean()) for part in quarters],
    }


def run_grades(sidecar: Path, sample_idx: np.ndarray, response_idx: np.ndarray, log_w: np.ndarray) -> dict[str, Any] | None:
    """The :func:`grade_summary` of the run whose sidecar is ``sidecar`` (its main file beside it; None
    when it is not there or holds no grades), with the sidecar's log w of each sample."""
    from qstar_cli.runfiles.format import SIDECAR_SUFFIX, OutputPaths

    main = OutputPaths.of(sidecar).main
    if not sidecar.name.endswith(SIDECAR_SUFFIX) or not main.is_file():
        return None
    grades = read_grades(main)
    keys = [(int(i), int(r)) for i, r in zip(sample_idx, response_idx)]
    return grade_summary([(*key, grades.get(key)) for key in keys], dict(zip(keys, map(float, log_w))))


def grade_mark(grade: dict[str, Any] | None) -> str | None:
    """How the report marks a sample: right, wrong or ungraded (None: the run is not graded)."""
    if not isinstance(grade, dict):
        return None
    return {True: "right", False: "wrong"}.get(grade.get("correct"), "ungraded")
