"""What the grades of a run say: accuracy, failures by reason, pass@k, majority vote, and accuracy
beside the sequence weight.

pass@k is the unbiased estimator of Chen et al. (2021): with ``n`` graded responses to a prompt, ``c``
of them right, ``pass@k = 1 - C(n - c, k) / C(n, k)`` (the chance that k of the n drawn without
replacement hold a right one), averaged over the prompts with at least k graded responses, for
k = 1, 2, 4 ... and K, the most responses a prompt has.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

#: What a main-file line contributes: (sample_idx, response_idx, grade).
GradedLine = tuple[int, int, dict[str, Any]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: the chance that k of n responses (c right) drawn without replacement hold a right one."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(largest: int) -> list[int]:
    """1, 2, 4 ... below ``largest``, then ``largest``."""
    ks = [1 << i for i in range(max(largest, 1).bit_length()) if 1 << i < largest]
    return [*ks, largest] if largest >= 1 else []


def read_grades(main: Path) -> list[GradedLine]:
    """The grades of a main file, in file order (lines without a ``grade`` or unreadable are left out)."""
    lines = []
    with Path(main).open("rb") as f:
        for raw in f:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            grade = record.get("grade") if isinstance(record, dict) else None
            if isinstance(grade, dict) and isinstance(record.get("sample_idx"), int):
                lines.append((record["sample_idx"], record.get("response_idx", 0), grade))
    return lines


def _majority_correct(grades: list[dict[str, Any]]) -> bool:
    """Whether the answer most responses give (ties: the one given first) is right; no answer is wrong."""
    answers = [g["extracted"] for g in grades if g["extracted"] is not None]
    if not answers:
        return False
    counts = Counter(answers)
    top = max(counts.values())
    chosen = next(a for a in answers if counts[a] == top)
    return any(g["correct"] is True for g in grades if g["extracted"] == chosen)


def grade_summary(lines: Iterable[GradedLine], log_w: dict[tuple[int, int], float] | None = None) -> dict[str, Any] | None:
    """``analyze``'s ``grades`` object (None without grades): counts, accuracy, failures by reason,
    pass@k, majority-vote accuracy, and (given each sample's log w) accuracy beside the weight."""
    by_prompt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    failures: Counter[str] = Counter()
    weighted: list[tuple[float, bool]] = []
    total = 0
    for sample_idx, response_idx, grade in lines:
        total += 1
        if grade.get("correct") is None:
            failures[str(grade.get("failure", "unknown"))] += 1
            continue
        by_prompt[sample_idx].append(grade)
        if log_w is not None and np.isfinite(log_w.get((sample_idx, response_idx), np.nan)):
            weighted.append((log_w[(sample_idx, response_idx)], grade["correct"] is True))
    if not total:
        return None
    graded = sum(len(g) for g in by_prompt.values())
    correct = sum(g["correct"] is True for gs in by_prompt.values() for g in gs)
    counts = {p: (len(gs), sum(g["correct"] is True for g in gs)) for p, gs in by_prompt.items()}
    largest = max((n for n, _ in counts.values()), default=0)
    pass_k = {}
    for k in k_values(largest):
        values = [pass_at_k(n, c, k) for n, c in counts.values() if n >= k]
        pass_k[str(k)] = float(np.mean(values))
    return {
        "samples": total,
        "graded": graded,
        "correct": correct,
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "accuracy": correct / graded if graded else None,
        "prompts": len(by_prompt),
        "pass_at_k": pass_k,
        "majority_accuracy": float(np.mean([_majority_correct(gs) for gs in by_prompt.values()])) if by_prompt else None,
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
    from qstar_cli.runfiles.format import MAIN_SUFFIX, SIDECAR_SUFFIX

    main = sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX) + MAIN_SUFFIX)
    if not sidecar.name.endswith(SIDECAR_SUFFIX) or not main.is_file():
        return None
    weights = {(int(i), int(r)): float(w) for i, r, w in zip(sample_idx, response_idx, log_w)}
    return grade_summary(read_grades(main), weights)


def grade_mark(grade: dict[str, Any] | None) -> str | None:
    """How the report marks a sample: right, wrong or ungraded (None: the run is not graded)."""
    if not isinstance(grade, dict):
        return None
    return {True: "right", False: "wrong"}.get(grade.get("correct"), "ungraded")
