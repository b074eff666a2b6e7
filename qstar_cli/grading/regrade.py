"""``qstar grade``: grade any chat JSONL after the fact (a run made without a grader, a merged run,
another tool's output).

Each line must hold OpenAI ``messages`` whose last assistant message is the response; the reference
is the line's ``original_<answer field>``, as qstar writes the dataset's columns. Lines are streamed
through the worker pool (a window of them in flight) and written in their order, each as it was
(its keys and values, in their order) with ``grade`` set, to a temporary file that replaces
``--output`` only when every line is written: the input is never rewritten, and a failure leaves no
half-graded output.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from qstar_cli.errors import QstarInputError
from qstar_cli.grading.graders import DEFAULT_ANSWER_FIELD, DEFAULT_TIMEOUT, DEFAULT_WORKERS, METADATA_PREFIX, resolve_grader, row_of
from qstar_cli.grading.pool import GradingPool
from qstar_cli.paths import check_output_file, check_writable

#: Lines in flight per worker: enough to keep every worker busy, few enough to stream.
WINDOW_PER_WORKER = 16


@dataclass
class GradeFileSummary:
    output: Path
    lines: int
    record: dict[str, Any]  # GradingPool.record(): graded, correct, failed by reason

    def describe(self) -> str:
        """What ``qstar grade`` prints: lines, accuracy and the ungraded by reason."""
        graded, correct = self.record["graded"], self.record["correct"]
        accuracy = f"{correct / graded:.3f}" if graded else "-"
        failed = ", ".join(f"{n} {reason}" for reason, n in self.record["failed"].items())
        return f"{self.lines} lines graded in {self.output}: accuracy {accuracy} ({correct} of {graded} right)" + (
            f"; ungraded: {failed}" if failed else ""
        )


def response_of(record: dict[str, Any], number: int, source: Path) -> str:
    """The last assistant message's content of a chat line."""
    messages = record.get("messages") if isinstance(record, dict) else None
    replies = (
        [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"] if isinstance(messages, list) else []
    )
    if not replies or not isinstance(replies[-1], str):
        raise QstarInputError(f"{source} line {number} holds no OpenAI messages with an assistant reply to grade")
    return replies[-1]


def _records(source: Path, progress: Callable[[str, int, int], None] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    total = source.stat().st_size
    done = 0
    with source.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            done += len(raw)
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise QstarInputError(f"{source} line {number} is not JSON") from None
            if progress is not None:
                progress("grading", done, total)
            yield number, record


def grade_file(
    source: Path,
    output: Path,
    grader: str,
    answer_field: str = DEFAULT_ANSWER_FIELD,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    progress: Callable[[str, int, int], None] | None = None,
) -> GradeFileSummary:
    """Grade every line of ``source`` into ``output`` with ``grader`` (see the module's docstring)."""
    if not timeout > 0 or workers < 1:
        raise QstarInputError(f"--grader-timeout must be positive and --grader-workers at least 1, got {timeout} and {workers}")
    if grader == "none":
        raise QstarInputError("--grader none grades nothing; choose math, exact or FILE.py:FUNCTION")
    spec = resolve_grader(grader, answer_field)
    if not source.is_file():
        raise QstarInputError(f"file to grade not found: {source}")
    check_output_file(output, "--output", [source.resolve()])
    check_writable(output, "--output")
    reference = f"{METADATA_PREFIX}{spec.answer_field}"
    tmp = output.with_name(output.name + ".tmp")
    lines = 0
    with GradingPool(spec, workers, timeout) as pool, tmp.open("wb") as out:
        try:
            in_flight: deque[tuple[int, dict[str, Any]]] = deque()

            def write_oldest() -> None:
                number, record = in_flight.popleft()
                record["grade"] = pool.take(number)
                out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

            for number, record in _records(source, progress):
                response = response_of(record, number, source)
                if not lines and not spec.custom and reference not in record:
                    columns = sorted(k.removeprefix(METADATA_PREFIX) for k in record if k.startswith(METADATA_PREFIX))
                    raise QstarInputError(
                        f"{source} line {number} has no {reference} to grade against; the columns it keeps are: "
                        f"{', '.join(columns) or '(none)'}; name one with --answer-field"
                    )
                record.pop("grade", None)  # regraded: the new grade replaces it, last
                pool.submit(number, response, row_of(record))
                in_flight.append((number, record))
                lines += 1
                if len(in_flight) >= WINDOW_PER_WORKER * workers:
                    write_oldest()
            while in_flight:
                write_oldest()
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    if not lines:
        tmp.unlink()
        raise QstarInputError(f"{source} holds no lines to grade")
    os.replace(tmp, output)
    return GradeFileSummary(output, lines, pool.record())
