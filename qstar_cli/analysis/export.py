"""``export`` as a Python API: a run's samples as a pre-tokenized, weighted training set.

>>> from qstar_cli.analysis.export import ExportConfig, export_training_set
>>> summary = export_training_set(ExportConfig(run=Path("OUT.jsonl"), output=Path("train.parquet")))

One row per sample: ``input_ids`` = the exact prompt ids pi_theta saw followed by
the sampled ids (the EOS included when the sample stopped), ``completion_mask`` (0 over the prompt, 1
over the response), ``sample_idx``, ``response_idx``, ``finish_reason``, ``weight``, the per-response-
token ``logp_theta``, ``logp_t`` (the teacher's view of each sampled token, for distillation) and
``logp_q``, and ``messages`` for reading. With ``teacher_topk`` (a run generated with
``--teacher-topk K``): per response token ``teacher_topk_ids`` (pi_t's K most likely ids),
``teacher_topk_logprobs`` (their log-probabilities) and ``teacher_topk_tail`` (the log of the mass
outside them), the columns of :mod:`qstar_cli.training`'s ``topk_kd`` loss. Training on these ids, rather than
on ``messages`` re-rendered with a chat template, trains pi_theta on the prompt format it sampled
under and on the very tokens whose importance weights were computed.

The main file and the sidecar are read line by line in lockstep, twice: once for the sequence
log-weights (n floats), which fix gamma and the self-normalisation, then to write rows in chunks.
Neither file is ever held whole. A pair of lines that cannot be read (a line torn by a crash, or one
file longer than the other) is skipped and counted, like a sample the writer would not count as done.
The output is written through a temporary beside it, renamed when complete (:mod:`qstar_cli.runfiles.output`).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from qstar_cli.analysis.statistics import ESS_FLOOR, REQUIRED_KEYS, SequenceWeights, sequence_log_weight, sequence_weights
from qstar_cli.errors import QstarInputError
from qstar_cli.runfiles.format import (
    LineFacts,
    OutputPaths,
    TeacherTopK,
    not_one_run,
    pair_mismatch,
    read_line,
    read_manifest,
    sidecar_record,
)
from qstar_cli.runfiles.output import atomic_output, check_output

FORMATS = (".parquet", ".jsonl")
#: ``--keep``: every sample, or those graded right (rejection-sampling fine-tuning).
KEEP = ("all", "correct")
#: Rows are written in chunks of about this many tokens (bounds the memory of a chunk).
CHUNK_TOKENS = 1 << 16
#: How often, in bytes read, the progress callback hears from a pass.
PROGRESS_BYTES = 1 << 20
#: The columns a trainer reads by name beside the token ids (:mod:`qstar_cli.training.weighted_sft`).
WEIGHT, LOGP_T, LOGP_Q = "weight", "logp_t", "logp_q"
TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_TAIL = "teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_tail"
#: The training set's columns, in the order :func:`training_row` gives their values.
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("completion_mask", pa.list_(pa.int8())),
        ("sample_idx", pa.int64()),
        ("response_idx", pa.int64()),
        ("finish_reason", pa.string()),
        (WEIGHT, pa.float64()),
        ("logp_theta", pa.list_(pa.float64())),
        (LOGP_T, pa.list_(pa.float64())),
        (LOGP_Q, pa.list_(pa.float64())),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)
#: The columns ``teacher_topk`` adds, in the order :func:`training_row` gives their values.
TEACHER_TOPK_SCHEMA = pa.schema(
    [
        (TEACHER_TOPK_IDS, pa.list_(pa.list_(pa.int32()))),
        (TEACHER_TOPK_LOGPROBS, pa.list_(pa.list_(pa.float32()))),
        (TEACHER_TOPK_TAIL, pa.list_(pa.float32())),
    ]
)

#: ``progress(phase, bytes_done, bytes_total)``; phase is "weights" (first pass) or "writing".
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExportConfig:
    """The settings of ``qstar export``."""

    run: Path  # the main OUT.jsonl; its OUT.diagnostics.jsonl (level full) lies beside it
    output: Path  # FILE.parquet or FILE.jsonl
    include_truncated: bool = False
    ess_floor: float = ESS_FLOOR
    gamma: float | None = None  # fixed tempering exponent; None chooses it at ess_floor
    chunk_tokens: int = CHUNK_TOKENS
    keep: str = "all"  # one of KEEP
    teacher_topk: bool = False  # write pi_t's top-K columns (the run must have been generated with --teacher-topk)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))
        object.__setattr__(self, "output", Path(self.output))
        if self.output.suffix not in FORMATS:
            raise QstarInputError(f"--output must end in {' or '.join(FORMATS)}, got {self.output}")
        if not 0.0 < self.ess_floor <= 1.0:
            raise QstarInputError(f"--ess-floor must lie in (0, 1], got {self.ess_floor}")
        if self.gamma is not None and not 0.0 <= self.gamma <= 1.0:
            raise QstarInputError(f"--gamma must lie in [0, 1], got {self.gamma}")
        if self.keep not in KEEP:
            raise QstarInputError(f"--keep must be one of {', '.join(KEEP)}, got {self.keep!r}")

    @property
    def sidecar(self) -> Path:
        return OutputPaths(self.run).diagnostics


@dataclass
class ExportSummary:
    """What an export wrote and left out."""

    output: Path
    exported: int
    truncated_left_out: int
    skipped_lines: list[int]  # line numbers of samples that one of the two files lacks or has torn
    weights: SequenceWeights
    #: ``(done, samples)`` when the run's manifest says it is not finished (a stopped or running run), else None.
    incomplete: tuple[int, int] | None = None
    #: ``--keep correct``: the samples left out, by grade (wrong, ungraded).
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class _LockstepReader:
    """Reads the main file and the sidecar in lockstep; skipped line numbers are collected."""

    config: ExportConfig
    progress: Progress | None
    skipped: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    topk_k: int | None = None  # the K of the lines' teacher top-K (every line's must be the same)

    def samples(self, phase: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``(main line, sidecar line)`` of every sample to export, in file order."""
        self.skipped, self.truncated, self.dropped = [], 0, Counter()
        main_path, sidecar = self.config.run, self.config.sidecar
        total = main_path.stat().st_size + sidecar.stat().st_size
        done = reported = 0
        with main_path.open("rb") as main_file, sidecar.open("rb") as sidecar_file:
            for number, (main_line, sidecar_line) in enumerate(zip_longest(main_file, sidecar_file), start=1):
                done += len(main_line or b"") + len(sidecar_line or b"")
                if self.progress and done - reported >= PROGRESS_BYTES:
                    self.progress(phase, done, total)
                    reported = done
                main = _load(main_line, ("messages", "sample_idx"), main_path, number)
                record = _load(sidecar_line, REQUIRED_KEYS, sidecar, number)
                if main is None or record is None:
                    self.skipped.append(number)
                    continue
                record = sidecar_record(record)
                if "per_token" not in record or "prompt_ids_theta" not in record:
                    raise needs_level_full(sidecar, "summary")
                if (mismatch := pair_mismatch(LineFacts.of(main), LineFacts.of(record))) is not None:
                    raise QstarInputError(f"{not_one_run(number, main_path, sidecar, mismatch)}; export the run's own files")
                if self.config.teacher_topk:
                    record["teacher_topk"] = top = _teacher_topk(record, sidecar, number)
                    if self.topk_k is not None and top.ids.shape[1] != self.topk_k:
                        raise QstarInputError(
                            f"{sidecar} line {number}: teacher_topk holds {top.ids.shape[1]} ids per token where the lines "
                            f"before hold {self.topk_k}: the sidecar was edited or mixes runs; export the run's own files"
                        )
                    self.topk_k = top.ids.shape[1]
                else:
                    record.pop("teacher_topk", None)
                if record["finish_reason"] == "length" and not self.config.include_truncated:
                    self.truncated += 1
                    continue
                if self.config.keep == "correct" and (grade := kept_grade(main)) is not None:
                    self.dropped[grade] += 1
                    continue
                yield main, record
        if self.progress:
            self.progress(phase, total, total)


def needs_level_full(what: Path | str, level: str) -> QstarInputError:
    """The refusal of a sidecar or run at diagnostics ``level`` (summary or none), which keeps no token ids."""
    return QstarInputError(
        f"{what} was written at diagnostics level {level}, which keeps no token ids; export needs level full: generate with --diagnostics full"
    )


def missing_sidecar(run: Path) -> QstarInputError:
    """Why ``run`` has no sidecar beside it, from its manifest: a run at another level, a sidecar gone,
    or no run at all (a copy, such as one that ``qstar grade --output`` wrote)."""
    paths = OutputPaths(run)
    if not paths.meta.is_file():
        return QstarInputError(
            f"{run} is not a run's main file: neither its sidecar {paths.diagnostics.name} nor its manifest {paths.meta.name} lies "
            "beside it; export the run's own OUT.jsonl (to export new grades, write them into the run: qstar grade OUT.jsonl --in-place)"
        )
    meta = read_manifest(paths.meta, ("config",), "qstar generate writes it beside the run")
    level = meta["config"].get("diagnostics", "full")
    if level != "full":
        return needs_level_full(f"the run {run}", level)
    return QstarInputError(f"the sidecar {paths.diagnostics} of {run} is missing (the run wrote it at level full); restore it to export")


def _load(line: bytes | None, keys: tuple[str, ...], path: Path, number: int) -> dict[str, Any] | None:
    """Line ``number`` of ``path`` as a dict holding ``keys``, or None (absent, torn or not a sample);
    a line of a newer format than this qstar reads is refused."""
    record = read_line(line, path, number)
    return record if record is not None and all(k in record for k in keys) else None


def kept_grade(main: dict[str, Any]) -> str | None:
    """None for a sample graded right; else why ``--keep correct`` drops it: wrong, or ungraded."""
    correct = (main.get("grade") or {}).get("correct")
    return None if correct is True else "wrong" if correct is False else "ungraded"


def check_graded(run: Path) -> None:
    """``--keep correct`` needs grades: refuse a run whose first sample has none."""
    with run.open("rb") as f:
        first = _load(f.readline(), ("messages", "sample_idx"), run, 1)
    if first is not None and "grade" not in first:
        raise QstarInputError(
            f"--keep correct keeps the responses graded right, but {run} is not graded; "
            f"grade it in place first (qstar grade {run} --in-place --grader math) or generate with --grader"
        )


def _teacher_topk(record: dict[str, Any], sidecar: Path, number: int) -> TeacherTopK:
    """A sidecar line's decoded teacher top-K, or a one-line refusal naming the line."""
    if "teacher_topk" not in record:
        raise QstarInputError(
            f"{sidecar} line {number} holds no teacher top-K: the run was generated without --teacher-topk; "
            "generate with --teacher-topk K, or export without --teacher-topk"
        )
    try:
        return TeacherTopK.from_record(record["teacher_topk"], len(record["per_token"]["token_id"]))
    except ValueError as err:
        raise QstarInputError(f"{sidecar} line {number}: {err}; export the run's own files") from None


def training_row(main: dict[str, Any], record: dict[str, Any], weight: float) -> dict[str, Any]:
    """One row of the training set from a sample's main line and sidecar line (with its decoded
    :class:`TeacherTopK` under ``teacher_topk`` when the export writes those columns)."""
    prompt, per_token = record["prompt_ids_theta"], record["per_token"]
    response = per_token["token_id"]
    values = (
        prompt + response, [0] * len(prompt) + [1] * len(response), record["sample_idx"], record.get("response_idx", 0),
        record["finish_reason"], weight, per_token["logp_theta"], per_token["logp_t"], per_token["logp_q"], main["messages"],
    )  # fmt: skip
    row = dict(zip(SCHEMA.names, values, strict=True))
    if (top := record.get("teacher_topk")) is not None:
        row.update(zip(TEACHER_TOPK_SCHEMA.names, (top.ids.tolist(), top.logprobs.tolist(), top.tail.tolist()), strict=True))
    return row


class _ParquetSink:
    def __init__(self, out: BinaryIO, metadata: dict[str, Any], schema: pa.Schema):
        # What was kept and dropped travels in the file's own key-value metadata ("qstar").
        self.schema = schema.with_metadata({"qstar": orjson.dumps(metadata)})
        self.writer = pq.ParquetWriter(out, self.schema)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def __enter__(self) -> _ParquetSink:
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


class _JsonlSink:
    def __init__(self, out: BinaryIO, metadata: dict[str, Any], schema: pa.Schema):  # JSON Lines has no place for metadata or a schema
        self.file = out

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.file.write(b"".join(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows))

    def __enter__(self) -> _JsonlSink:
        return self

    def __exit__(self, *exc) -> None:
        pass


def export_training_set(config: ExportConfig, progress: Progress | None = None) -> ExportSummary:
    """Write ``config.output`` from ``config.run`` and its sidecar; see the module docstring."""
    if not config.run.is_file():
        raise QstarInputError(f"run file not found: {config.run}")
    if not config.sidecar.is_file():
        raise missing_sidecar(config.run)
    check_output(config.output, "--output", [config.run, config.sidecar, OutputPaths(config.run).meta])
    if config.keep == "correct":
        check_graded(config.run)

    reader = _LockstepReader(config, progress)
    log_w = array("d", (sequence_log_weight(record) for _, record in reader.samples("weights")))
    if not log_w:
        reason = (
            f"all {reader.truncated} readable samples hit max_new_tokens; add --include-truncated"
            if reader.truncated
            else "it holds no readable samples"
        )
        if reader.dropped:
            reason = f"no response is graded right ({', '.join(f'{n} {g}' for g, n in sorted(reader.dropped.items()))})"
        raise QstarInputError(f"nothing to export from {config.run}: {reason}")
    weights = sequence_weights(log_w, config.ess_floor, config.gamma)
    dropped = dict(sorted(reader.dropped.items()))
    metadata = {"keep": config.keep, "exported": len(log_w), "dropped": dropped, "truncated_left_out": reader.truncated}

    schema = pa.unify_schemas([SCHEMA, TEACHER_TOPK_SCHEMA]) if config.teacher_topk else SCHEMA
    sink_type = _ParquetSink if config.output.suffix == ".parquet" else _JsonlSink
    with atomic_output(config.output) as out, sink_type(out, metadata, schema) as sink:
        chunk, chunk_tokens = [], 0
        for weight, (main, record) in zip(weights.weights, reader.samples("writing"), strict=True):
            chunk.append(training_row(main, record, float(weight)))
            chunk_tokens += len(chunk[-1]["input_ids"])
            if chunk_tokens >= config.chunk_tokens:
                sink.write(chunk)
                chunk, chunk_tokens = [], 0
        if chunk:
            sink.write(chunk)
    return ExportSummary(config.output, len(log_w), reader.truncated, reader.skipped, weights, _incomplete(config.run), dropped)


def _incomplete(run: Path) -> tuple[int, int] | None:
    """``(done, samples)`` of a run whose manifest says it is unfinished (None when finished or unknown)."""
    try:
        meta = orjson.loads(OutputPaths(run).meta.read_bytes())
        done, samples, status = meta["counts"]["done"], meta["counts"]["samples"], meta["status"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return None if status == "complete" and done == samples else (done, samples)
