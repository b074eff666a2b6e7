"""``qstar grade``: grade any chat JSONL after the fact (a run made without a grader, a merged run,
another tool's output), into a new file or into the run itself.

Each line must hold OpenAI ``messages`` whose last assistant message is the response; the reference
is the line's ``original_<answer field>``, as qstar writes the dataset's columns, and its
``finish_reason`` (where it has one) tells a truncated response. Lines are streamed through the
worker pool (a window of them in flight) and written in their order, each as it was (its keys and
values, in their order) with ``grade`` set, through a temporary that replaces the output only when
every line is written (:func:`~qstar_cli.runfiles.output.atomic_output`): a failure or a kill leaves
no half-graded output.

``in_place`` writes the grades into a run's own main file, under the run's lock (refused while a
``generate`` writes it), and records the grader in its manifest as a run generated with it would
have it: ``analyze``, ``report`` and ``export --keep correct`` then see the new grades, and the run
resumes only with that grader.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from qstar_cli.errors import QstarInputError
from qstar_cli.generate.config import USER_CODE
from qstar_cli.grading.graders import (
    DEFAULT_ANSWER_FIELD,
    DEFAULT_TIMEOUT,
    DEFAULT_WORKERS,
    GRADERS,
    METADATA_PREFIX,
    NO_GRADER,
    GraderSpec,
    grader_choices,
    missing_reference,
    resolve_grader,
    row_of,
)
from qstar_cli.grading.pool import GradingPool
from qstar_cli.paths import file_sha256
from qstar_cli.runfiles.format import OutputPaths, read_manifest
from qstar_cli.runfiles.output import OutputLock, atomic_output, check_output
from qstar_cli.runfiles.writer import fingerprint

#: Lines in flight per worker: enough to keep every worker busy, few enough to stream.
WINDOW_PER_WORKER = 16


@dataclass(frozen=True)
class GradeRequest:
    """The settings of ``qstar grade``: ``file`` graded into ``output``, or into itself with ``in_place``."""

    file: Path
    output: Path | None = None
    grader: str = "math"
    answer_field: str = DEFAULT_ANSWER_FIELD
    timeout: float = DEFAULT_TIMEOUT
    workers: int = DEFAULT_WORKERS
    grade_truncated: bool = False
    in_place: bool = False

    def __post_init__(self) -> None:
        if not self.timeout > 0 or self.workers < 1:
            raise QstarInputError(
                f"--grader-timeout must be positive and --grader-workers at least 1, got {self.timeout} and {self.workers}"
            )
        if self.grader == NO_GRADER:
            raise QstarInputError(f"--grader none grades nothing; choose one of {', '.join(c for c in grader_choices() if c != NO_GRADER)}")
        if (self.output is None) == (not self.in_place):
            raise QstarInputError(
                "give --output GRADED.jsonl (a graded copy) or --in-place (the grades written into the run itself), not both"
                if self.in_place
                else "give --output GRADED.jsonl for a graded copy, or --in-place to write the grades into the run itself"
            )


@dataclass
class GradeFileSummary:
    output: Path
    lines: int
    record: dict[str, Any]  # GradingPool.record(): graded, correct, truncated, failed by reason

    def describe(self) -> str:
        """What ``qstar grade`` prints: lines, accuracy and the ungraded by reason."""
        graded, correct = self.record["graded"], self.record["correct"]
        accuracy = f"{correct / graded:.3f}" if graded else "-"
        truncated = f"; {n} cut off by the token budget graded wrong" if (n := self.record.get("truncated")) else ""
        failed = ", ".join(f"{n} {reason}" for reason, n in self.record["failed"].items())
        return f"{self.lines} lines graded in {self.output}: accuracy {accuracy} ({correct} of {graded} right{truncated})" + (
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


def grade_file(request: GradeRequest, progress: Callable[[str, int, int], None] | None = None) -> GradeFileSummary:
    """Grade every line of ``request.file`` into its output, or into the run itself (see the module's docstring)."""
    source = Path(request.file)
    spec = resolve_grader(request.grader, request.answer_field, request.grade_truncated)
    if not source.is_file():
        raise QstarInputError(f"file to grade not found: {source}")
    if not request.in_place:
        if Path(request.output).resolve() == source.resolve():
            raise QstarInputError(f"--output {request.output} would overwrite the input; to write the grades into a run, use --in-place")
        check_output(Path(request.output), "--output", [source, *([Path(spec.name.rpartition(":")[0])] if spec.custom else [])])
        return _grade_lines(source, Path(request.output), spec, request, progress, locked=False)
    run = OutputPaths(source)
    if not run.meta.is_file():
        raise QstarInputError(
            f"--in-place writes the grades into a run, and {source} is none (no manifest {run.meta.name} beside it); "
            "write a graded copy with --output"
        )
    lock = OutputLock(source)
    lock.acquire(f"a qstar process is writing the run {source} (lock {lock.path}); grade it once that has ended")
    try:
        meta = read_manifest(run.meta, ("fingerprint_config", "config"), "restore it, or grade a copy with --output")
        if "shard" in meta:  # the shards of a run share its fingerprint, which a regrade changes
            raise QstarInputError(f"{source} is a shard of a run: join the shards with qstar merge, then grade the merged run in place")
        summary = _grade_lines(source, source, spec, request, progress, locked=True)
        _record_grader(run.meta, meta, spec, request.timeout, summary.record)
    finally:
        lock.release()
    return summary


def _grade_lines(
    source: Path, output: Path, spec: GraderSpec, request: GradeRequest, progress: Callable | None, locked: bool
) -> GradeFileSummary:
    """Stream the lines of ``source`` through the pool into ``output`` (``locked``: the caller holds its lock)."""
    reference = f"{METADATA_PREFIX}{spec.answer_field}"
    lines = 0
    with GradingPool(spec, request.workers, request.timeout) as pool, atomic_output(output, locked=locked) as out:
        in_flight: deque[tuple[int, dict[str, Any]]] = deque()

        def write_oldest() -> None:
            number, record = in_flight.popleft()
            record["grade"] = pool.take(number)
            out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

        for number, record in _records(source, progress):
            response = response_of(record, number, source)
            if not lines and not spec.custom and GRADERS[spec.name].needs_reference and reference not in record:
                columns = [k.removeprefix(METADATA_PREFIX) for k in record if k.startswith(METADATA_PREFIX)]
                raise missing_reference(spec.answer_field, f"{source} line {number}", columns)
            record.pop("grade", None)  # regraded: the new grade replaces it, last
            finish_reason = record.get("finish_reason")
            pool.submit(number, response, row_of(record), finish_reason if isinstance(finish_reason, str) else None)
            in_flight.append((number, record))
            lines += 1
            if len(in_flight) >= WINDOW_PER_WORKER * request.workers:
                write_oldest()
        while in_flight:
            write_oldest()
        if not lines:
            raise QstarInputError(f"{source} holds no lines to grade")
    return GradeFileSummary(output, lines, pool.record())


def _record_grader(meta_path: Path, meta: dict[str, Any], spec: GraderSpec, timeout: float, record: dict[str, Any]) -> None:
    """The run's manifest with ``spec`` as its grader, as a run generated with it records it (its
    settings and fingerprint: the run resumes only with that grader), and when it was regraded."""
    graded = {"grader": spec.name, "answer_field": spec.answer_field, "grader_timeout": timeout, "grade_truncated": spec.grade_truncated}
    digest = USER_CODE["grader"]
    settings = {k: v for k, v in meta["fingerprint_config"].items() if k != digest}
    content = {digest: file_sha256(Path(spec.name.rpartition(":")[0]))} if spec.custom else {}
    meta["fingerprint_config"] = {**settings, **graded, **content}
    meta["fingerprint"] = fingerprint(meta["fingerprint_config"])
    meta["config"] = {**meta["config"], **graded}
    meta["regraded"] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    with atomic_output(meta_path, locked=True) as out:
        out.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
