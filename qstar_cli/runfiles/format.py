"""The run-file format, in one place: the files of a run and their suffixes, the per-token fields of
the sidecar, the diagnostics levels. Pure data: reading it imports neither torch nor datasets.

For an output ``OUT.jsonl`` the files are ``OUT.jsonl`` (conversations, OpenAI chat format),
``OUT.diagnostics.jsonl`` (per-sample diagnostics, same order), ``OUT.meta.json`` (the manifest:
configuration, fingerprint, counts, sessions) and ``OUT.jsonl.lock`` (held while a process writes).

The manifest and every sidecar line say their ``format_version`` (:data:`FORMAT_VERSION`); the
readers take lines and manifests through :func:`read_line`, :func:`sidecar_record` and
:func:`read_manifest`, which read every earlier version and refuse a newer one.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import orjson

import qstar_cli
from qstar_cli.errors import QstarInputError

#: The run-file format this qstar writes: the manifest's ``format_version`` and every sidecar line's
#: (a line travels alone: in a shard, a merge, a copy). 1 is the format of the qstar releases before
#: the field, read where it is absent. Each line keeps the version it was written in: a run begun
#: by an earlier qstar and resumed by this one holds its earlier lines as they were, its new ones
#: in this version, and the manifest says the version of the qstar that wrote it last.
FORMAT_VERSION = 2
MAIN_SUFFIX = ".jsonl"
SIDECAR_SUFFIX = ".diagnostics.jsonl"
META_SUFFIX = ".meta.json"
LOCK_SUFFIX = ".lock"
DIAGNOSTICS_LEVELS = ("full", "summary", "none")
#: The per-token values a round takes from its own forwards: alpha and the drawn token's log-probs
#: under pi_theta, pi_t and the distribution it was drawn from (q, tempered and truncated).
ROUND_FIELDS = ("alpha", "logp_theta", "logp_t", "logp_q")
#: The per-token diagnostics of :func:`qstar_cli.distributions.mixture.token_diagnostics` (same names).
DIAGNOSTIC_FIELDS = ("kl_theta", "kl_t", "ess_theta", "ess_t", "ess_ratio", "entropy_theta", "entropy_t", "entropy_q")
#: Every per-token value of a sample, in the sidecar's order: the round's, then the diagnostics;
#: the sidecar keeps each one's summary statistics.
SUMMARY_FIELDS = ROUND_FIELDS + DIAGNOSTIC_FIELDS
#: Per-token arrays of a sample, in the sidecar's order: the token id, then its values.
PER_TOKEN_FIELDS: tuple[str, ...] = ("token_id", *SUMMARY_FIELDS)
#: Per-token fields whose sums over a response the sidecar keeps (the sequence log-probabilities).
SEQUENCE_SUMS = ("logp_theta", "logp_t", "logp_q")


#: ``--teacher-topk``: the most ids of pi_t's top-K kept per token.
MAX_TEACHER_TOPK = 64
#: How far above 0 a stored float32 log-probability may lie by rounding (a token of probability 1).
LOGPROB_ROUNDING = 1e-5


def check_teacher_topk_k(k: Any, name: str = "teacher_topk") -> int:
    """``k`` if it is a top-K size: an integer from 0 (off) to :data:`MAX_TEACHER_TOPK`; else ValueError saying so of ``name``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TEACHER_TOPK:
        raise ValueError(f"{name} must be an integer from 0 (off) to {MAX_TEACHER_TOPK}, got {k!r}")
    return k


@dataclass(frozen=True)
class TeacherTopK:
    """pi_t's K most likely ids at each emitted token's position, their log-probabilities (pi_t's own,
    untempered, over the shared vocabulary), and the log of the mass outside them.

    In a sidecar line (``teacher_topk``) each array is its little-endian bytes in base64: ids int32,
    log-probabilities float32, ``(8K + 4) * 4/3`` bytes per token (219 at K = 20), where JSON float
    text would take about 20 bytes per number."""

    ids: np.ndarray  # int32 [tokens, K], most likely first
    logprobs: np.ndarray  # float32 [tokens, K]
    tail: np.ndarray  # float32 [tokens]: log(1 - sum(exp(logprobs))), -inf when they hold all the mass

    def to_record(self) -> dict[str, Any]:
        def encoded(array: np.ndarray, dtype: str) -> str:
            return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")

        return {
            "k": self.ids.shape[1],
            "ids": encoded(self.ids, "<i4"),
            "logprobs": encoded(self.logprobs, "<f4"),
            "tail": encoded(self.tail, "<f4"),
        }

    @classmethod
    def from_record(cls, record: Any, tokens: int) -> TeacherTopK:
        """Decode a sidecar line's ``teacher_topk`` for a sample of ``tokens`` tokens; ValueError
        saying what is wrong when it is not one (its form, or values no model gives)."""
        fields = {"k": int, "ids": str, "logprobs": str, "tail": str}
        if not isinstance(record, dict):
            raise ValueError(f"teacher_topk is damaged (not an object: {type(record).__name__})")
        for name, kind in fields.items():
            if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
                raise ValueError(f"teacher_topk is damaged ({name} is {record.get(name)!r:.40}, not {kind.__name__})")
        k = record["k"]
        try:
            if not check_teacher_topk_k(k, "k"):
                raise ValueError("k must not be 0 (off) in a line that holds a top-K")
        except ValueError as err:
            raise ValueError(f"teacher_topk is damaged ({err})") from None
        try:
            ids, logprobs, tail = (np.frombuffer(base64.b64decode(record[name], validate=True), dtype) for name, dtype in
                                   (("ids", "<i4"), ("logprobs", "<f4"), ("tail", "<f4")))  # fmt: skip
        except ValueError as err:
            raise ValueError(f"teacher_topk is damaged (not base64: {err})") from None
        if len(ids) != tokens * k or len(logprobs) != tokens * k or len(tail) != tokens:
            raise ValueError(
                f"teacher_topk is damaged ({len(ids)} ids, {len(logprobs)} log-probabilities and {len(tail)} tails, "
                f"not {k} per token and a tail for each of the sample's {tokens} tokens)"
            )
        ids, logprobs = ids.reshape(tokens, k), logprobs.reshape(tokens, k)
        # Log-probabilities are at most 0 (float rounding may pass it by a little) and never NaN.
        if (ids < 0).any() or (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise ValueError("teacher_topk is damaged (a negative or repeated id)")
        if not (logprobs <= LOGPROB_ROUNDING).all() or not (tail <= LOGPROB_ROUNDING).all():
            raise ValueError("teacher_topk is damaged (a log-probability that is NaN or above 0)")
        return cls(ids, logprobs, tail)


def format_version(record: dict[str, Any], where: str) -> int | None:
    """The format version of a manifest or sidecar line (``where`` names it): 1 where it has none,
    None where its ``format_version`` is no version (damage). A newer format than this qstar reads
    is refused in one line asking for a newer qstar."""
    version = record.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return None
    if version > FORMAT_VERSION:
        raise QstarInputError(
            f"{where} is in run-file format {version}, newer than qstar {qstar_cli.__version__} reads "
            f"(format {FORMAT_VERSION} and earlier): upgrade qstar to read it"
        )
    return version


def read_line(raw: bytes | None, path: Path, number: int) -> dict[str, Any] | None:
    """Line ``number`` of the data file ``path`` as a JSON object, or None where there is none (no
    line, a torn or edited one, a damaged ``format_version``); a line of a newer format is refused
    (:func:`format_version`)."""
    try:
        record = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or format_version(record, f"{path} line {number}") is None:
        return None
    return record


def sidecar_record(record: dict[str, Any]) -> dict[str, Any]:
    """A sidecar line of any format version up to :data:`FORMAT_VERSION`, with the fields of this
    version that it lacks filled in as absent, so that every reader reads one shape: ``response_idx``
    0 (a line from before ``--samples-per-prompt``), the statistics of a per-token field ``None``
    and, at level full, its array ``null`` at every token (a field added after the line's writer)."""
    record.setdefault("response_idx", 0)
    for name in SUMMARY_FIELDS:
        for statistic in ("mean", "std", "min", "max"):
            record.setdefault(f"{name}_{statistic}", None)
    for name in SEQUENCE_SUMS:
        record.setdefault(f"{name}_sum", None)
    arrays = record.get("per_token")
    if isinstance(arrays, dict) and isinstance(arrays.get("token_id"), list):
        for name in SUMMARY_FIELDS:
            arrays.setdefault(name, [None] * len(arrays["token_id"]))
    return record


def per_token_fields(level: str) -> tuple[str, ...]:
    """The per-token fields a run at diagnostics ``level`` keeps: all of them for the sidecar's
    ``full`` arrays and ``summary`` statistics, the token ids alone without a sidecar (``none``)."""
    return PER_TOKEN_FIELDS if level != "none" else PER_TOKEN_FIELDS[:1]


def sample_id(record: dict[str, Any]) -> tuple[int, int]:
    """``(sample_idx, response_idx)`` of a main-file or sidecar line (``response_idx`` 0 when absent)."""
    return record["sample_idx"], record.get("response_idx", 0)


def describe_sample(key: tuple[int, int]) -> str:
    return f"sample {key[0]} response {key[1]}"


@dataclass(frozen=True)
class LineFacts:
    """What a main-file or sidecar line says of its sample, compared between the two files."""

    key: tuple[int, int]  # (sample_idx, response_idx): sample_id
    finish_reason: Any
    num_tokens: Any = None  # a sidecar's token count
    token_ids: int | None = None  # how many token ids a sidecar line at level full holds

    @classmethod
    def of(cls, record: dict[str, Any]) -> LineFacts:
        per_token = record.get("per_token")
        token_ids = per_token.get("token_id") if isinstance(per_token, dict) else None
        return cls(sample_id(record), record.get("finish_reason"), record.get("num_tokens"),
                   len(token_ids) if isinstance(token_ids, list) else None)  # fmt: skip


def pair_mismatch(main: LineFacts, sidecar: LineFacts) -> str | None:
    """What tells that a main-file line and a sidecar line are not one sample of one run (None: they
    agree): their sample and response index, their finish reason, and the sidecar's token count
    against its token ids. ``generate`` checks this before it resumes; ``export``, ``analyze
    --export-weights`` and ``report`` before they pair the two files."""
    if main.key != sidecar.key:
        return f"{describe_sample(main.key)} against {describe_sample(sidecar.key)}"
    if main.finish_reason != sidecar.finish_reason:
        return f"{describe_sample(main.key)} finished by {main.finish_reason} against {sidecar.finish_reason}"
    if sidecar.token_ids is not None and sidecar.token_ids != sidecar.num_tokens:
        return f"{describe_sample(main.key)} counts {sidecar.num_tokens} tokens but holds {sidecar.token_ids} token ids"
    return None


def not_one_run(line: int, main: Path, sidecar: Path, mismatch: str) -> str:
    """Why a main file and a sidecar are not the files of one run (a refusal's first part)."""
    return f"line {line} of {main} and {sidecar} disagree ({mismatch}): one was edited or comes from another run"


def check_one_run(main: Path, sidecar: Path, advice: str) -> None:
    """Refuse (one line ending in ``advice``) a main file and sidecar whose lines are not the samples
    of one run (:func:`pair_mismatch`), or a line of a newer format; torn or unreadable lines, which a
    crash leaves, are passed over. Both files are streamed."""
    with main.open("rb") as main_file, sidecar.open("rb") as sidecar_file:
        for number, (main_line, sidecar_line) in enumerate(zip(main_file, sidecar_file), start=1):
            try:
                facts = LineFacts.of(read_line(main_line, main, number)), LineFacts.of(read_line(sidecar_line, sidecar, number))
            except (AttributeError, KeyError, TypeError):  # None, or a line without its sample
                continue
            if (mismatch := pair_mismatch(*facts)) is not None:
                raise QstarInputError(f"{not_one_run(number, main, sidecar, mismatch)}; {advice}")


@dataclass(frozen=True)
class OutputPaths:
    """The files of one run, named after the main JSONL path."""

    main: Path

    @classmethod
    def of(cls, path: Path) -> OutputPaths:
        """The run whose sidecar, manifest or lock ``path`` is named as; any other file is a main file of its own."""
        for suffix, main in ((SIDECAR_SUFFIX, MAIN_SUFFIX), (META_SUFFIX, MAIN_SUFFIX), (LOCK_SUFFIX, "")):
            if path.name.endswith(suffix) and path.name != suffix:
                return cls(path.with_name(path.name.removesuffix(suffix) + main))
        return cls(path)

    @property
    def stem(self) -> Path:
        return self.main.with_suffix("") if self.main.suffix == MAIN_SUFFIX else self.main

    @property
    def diagnostics(self) -> Path:
        return self.stem.with_name(self.stem.name + SIDECAR_SUFFIX)

    @property
    def meta(self) -> Path:
        return self.stem.with_name(self.stem.name + META_SUFFIX)

    @property
    def lock(self) -> Path:
        return self.main.with_name(self.main.name + LOCK_SUFFIX)

    def shard(self, index: int, count: int) -> OutputPaths:
        """The files of shard ``index`` of ``count``: ``run-00001-of-00003.jsonl`` for ``run.jsonl``."""
        suffix = MAIN_SUFFIX if self.main.suffix == MAIN_SUFFIX else ""
        return OutputPaths(self.stem.with_name(f"{self.stem.name}-{index:05d}-of-{count:05d}{suffix}"))


class Counts(TypedDict):
    rows: int  # dataset rows taken
    samples: int  # samples the schedule has
    done: int  # samples committed (durable in every data file)
    skipped: dict[str, int]  # rows skipped, by reason


class Manifest(TypedDict, total=False):
    """``OUT.meta.json``: what ``generate`` (and ``merge``) write, and every reader reads through
    :func:`read_manifest`."""

    format_version: int  # absent (1) in the manifests of the qstar releases before it
    qstar_version: str
    status: str  # running, complete, interrupted or failed
    fingerprint: str
    fingerprint_config: dict[str, Any]  # the settings and content a resumed run must share
    config: dict[str, Any]  # every setting, as given
    device: str
    dtype: str
    versions: dict[str, str]
    weights_sha256: dict[str, dict[str, str]]  # local model files' digests, by setting
    counts: Counts
    sessions: list[dict[str, Any]]
    shard: dict[str, Any]  # a shard's index, count, schedule_samples and split
    slot_plan: dict[str, Any]  # --batch-size auto: how the slots were sized (memory.SlotPlan's fields)
    compile_seconds: float  # --compile: how long this session's warm-up compiled
    merged: str  # a merged run: when
    shards: list[dict[str, Any]]  # a merged run: each shard's manifest


_TYPES: dict[str, type] = {
    "qstar_version": str, "status": str, "fingerprint": str, "fingerprint_config": dict, "config": dict, "device": str,
    "dtype": str, "versions": dict, "counts": dict, "sessions": list, "shard": dict,
}  # fmt: skip
_COUNT_TYPES: dict[str, type] = {"rows": int, "samples": int, "done": int, "skipped": dict}


def read_manifest(path: Path, required: tuple[str, ...], hint: str, error: type[QstarInputError] = QstarInputError) -> Manifest:
    """The manifest at ``path``, refused with ``error`` in one line (ending in ``hint``) when it cannot be
    read, is not JSON, or lacks one of the ``required`` fields with its type (``counts`` also checks
    that each count is a count: an integer, not a boolean, not negative); one of a newer format than
    this qstar reads is refused asking for a newer qstar (:func:`format_version`)."""
    try:
        meta = orjson.loads(path.read_bytes())
    except OSError as err:
        raise error(f"cannot read the manifest {path}: {err.strerror}") from err
    except orjson.JSONDecodeError as err:
        raise error(f"the manifest {path} is damaged (not valid JSON: {err}); {hint}") from err
    if not isinstance(meta, dict):
        raise error(f"the manifest {path} is damaged (not a JSON object); {hint}")
    if format_version(meta, f"the manifest {path}") is None:
        raise error(f"the manifest {path} is damaged (format_version is {meta['format_version']!r:.40}, not a version); {hint}")
    checks = [(name, meta.get(name), _TYPES[name]) for name in required]
    if "counts" in required and isinstance(meta.get("counts"), dict):
        checks += [(f"counts.{name}", meta["counts"].get(name), kind) for name, kind in _COUNT_TYPES.items()]
    for name, value, kind in checks:
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise error(
                f"the manifest {path} is damaged ({name} is {value!r:.40}, not {'a count' if kind is int else kind.__name__}); {hint}"
            )
    return meta
