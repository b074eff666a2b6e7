"""Results out: the main JSONL, the diagnostics sidecar and the run manifest, crash-safe and resumable.

For an output ``OUT.jsonl`` the files are ``OUT.jsonl`` (conversations), ``OUT.diagnostics.jsonl``
(per-sample diagnostics, same order), ``OUT.meta.json`` (configuration, fingerprint, counts,
timings) and ``OUT.jsonl.lock`` (held while a process writes). Samples are appended in batches and
committed (flushed and fsynced) together; a sample is done only when every data file holds its line.
On resume, both files are cut back to their common complete prefix, which also repairs a line torn
by a crash; what a crash cannot explain (a missing sidecar, a file shorter than the manifest's count
of committed samples, an edited line among them) is refused instead, and nothing is cut. Lines are serialised by orjson with a fixed key order, so equal results give equal bytes.
Non-finite floats (``ess_ratio`` when ``ess_t`` is 0) are written as ``null``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from qstar_cli.errors import QstarInputError
from qstar_cli.paths import missing_parents, remove_empty
from qstar_cli.runfiles.format import (
    DIAGNOSTICS_LEVELS,
    FORMAT_VERSION,
    PER_TOKEN_FIELDS,
    SEQUENCE_SUMS,
    SUMMARY_FIELDS,
    LineFacts,
    Manifest,
    OutputPaths,
    describe_sample,
    not_one_run,
    pair_mismatch,
    read_line,
    read_manifest,
)
from qstar_cli.runfiles.output import OutputLock, atomic_output

if TYPE_CHECKING:
    from qstar_cli.engine.samples import SampleResult
    from qstar_cli.generate.adapters import Prompt

__all__ = ["DIAGNOSTICS_LEVELS", "SUMMARY_FIELDS", "CheckpointedWriter", "OutputPaths", "ResumeError", "RunFilesDamaged"]

_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


class ResumeError(QstarInputError):
    """The existing output cannot be resumed with this configuration, or another process holds it."""


class RunFilesDamaged(ResumeError):
    """The run's files disagree in a way a crash cannot explain: resuming would cut committed samples."""


_RESTORE = "restore the run's own files to resume, or move them away (or add --overwrite) to start afresh"
_UNREAD = object()  # the manifest not read yet


def _committed(meta: dict[str, Any] | None) -> int:
    """Samples the manifest (checked by :meth:`CheckpointedWriter.previous_meta`) says are durable; 0 without one."""
    return meta["counts"]["done"] if meta else 0


def _damage(path: Path, lines: list[_Line], good: int, committed: int, expected: tuple[int, int] | None = None) -> str:
    """Why ``path`` holds only ``good`` of the ``committed`` samples: lines gone, one unreadable, or
    one holding another sample than ``expected``."""
    if good == len(lines):
        return f"{path} holds {good} samples, but the manifest says {committed} are done: lines were deleted or the file was replaced; {_RESTORE}"
    key = lines[good].key
    if key is None:
        return f"{path} line {good + 1} is damaged (not a sample record) within the {committed} samples done; {_RESTORE}"
    return (
        f"{path} line {good + 1} holds {describe_sample(key)}, where {describe_sample(expected)} belongs: "
        f"the file was edited (a line deleted, moved or added); {_RESTORE}"
    )


def main_record(prompt: Prompt, result: SampleResult, grade: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the main file: the conversation with the sampled answer, in OpenAI chat format;
    a graded run's ``grade`` last."""
    messages = [*prompt.messages, {"role": "assistant", "content": result.text}]
    return {
        "messages": messages,
        "sample_idx": result.sample_idx,
        "response_idx": result.response_idx,
        "finish_reason": result.finish_reason,
        **prompt.metadata,
        **({"grade": grade} if grade is not None else {}),
    }


def diagnostics_record(result: SampleResult, level: str) -> dict[str, Any]:
    """One line of the sidecar: its format version, statistics and sequence sums, plus the exact ids and
    arrays at ``full``."""
    arrays = {name: np.asarray(result.per_token[name], dtype=np.float64) for name in SUMMARY_FIELDS}
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "sample_idx": result.sample_idx,
        "response_idx": result.response_idx,
        "num_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
    }
    if result.draft_lengths is not None:  # speculative: the rounds, which a resumed run replays
        record["draft_lengths"] = result.draft_lengths
        record["round_tokens"] = result.round_tokens
    for name, values in arrays.items():
        record[f"{name}_mean"] = float(values.mean())
        record[f"{name}_std"] = float(values.std())
        record[f"{name}_min"] = float(values.min())
        record[f"{name}_max"] = float(values.max())
    for name in SEQUENCE_SUMS:
        record[f"{name}_sum"] = float(arrays[name].sum())
    if level == "full":
        record["prompt_ids_theta"] = result.prompt_ids_theta
        record["prompt_ids_t"] = result.prompt_ids_t
        record["per_token"] = {name: result.per_token[name] for name in PER_TOKEN_FIELDS}
        if result.teacher_topk is not None:
            record["teacher_topk"] = result.teacher_topk.to_record()
    return record


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a configuration dictionary."""
    return hashlib.sha256(orjson.dumps(config, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def config_differences(
    old: dict[str, Any], new: dict[str, Any], descriptions: dict[str, str] | None = None, either: bool = False
) -> list[str]:
    """For each key of ``new`` (with ``either``, of either side) whose value differs in the other: its
    description if it has one, else ``key (old -> new)``."""
    descriptions = descriptions or {}

    def shown(value: Any) -> str:  # a nested value (a model's files) is named, not dumped
        return "..." if isinstance(value, (dict, list)) else repr(value)

    keys = set(new) | set(old) if either else set(new)
    return [descriptions.get(k, f"{k} ({shown(old.get(k))} -> {shown(new.get(k))})") for k in sorted(keys) if old.get(k) != new.get(k)]


def prompt_digest(ids_theta: list[int], ids_t: list[int]) -> str:
    """A digest of the prompt ids both models saw, compared between a sidecar line and the schedule."""
    return hashlib.sha256(orjson.dumps([ids_theta, ids_t])).hexdigest()


@dataclass
class _Line:
    """What resuming reads of one line: where it ends, what it says of its sample (None: unreadable),
    its rounds, its diagnostics level and the digest of its prompt ids (sidecar lines)."""

    end: int
    facts: LineFacts | None
    rounds: tuple[list[int], list[int]] | None = None
    level: str | None = None  # a sidecar line's: full (token ids and prompt ids) or summary
    prompt: str | None = None  # prompt_digest of a full sidecar line

    @property
    def key(self) -> tuple[int, int] | None:
        return self.facts.key if self.facts is not None else None

    @property
    def speculative(self) -> bool:
        return self.rounds is not None


def _read_line(end: int, raw: bytes, path: Path, number: int) -> _Line:
    record = read_line(raw, path, number)  # a line of any earlier format version; a newer one is refused
    if record is None or not isinstance(record.get("sample_idx"), int):
        return _Line(end, None)
    rounds = record.get("draft_lengths"), record.get("round_tokens")
    full = isinstance(record.get("per_token"), dict) and isinstance(record.get("prompt_ids_theta"), list)
    return _Line(
        end,
        LineFacts.of(record),
        rounds if isinstance(rounds[0], list) and isinstance(rounds[1], list) else None,
        ("full" if full else "summary") if "num_tokens" in record else None,
        prompt_digest(record["prompt_ids_theta"], record.get("prompt_ids_t")) if full else None,
    )


def _read_lines(path: Path) -> list[_Line]:
    """Every complete line of a data file (streamed; the file may be large); a torn last line is left out."""
    lines, offset = [], 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break
            lines.append(_read_line(offset, raw, path, number))
    return lines


def _first_mismatch(lines: list[_Line], expected: list[tuple[int, int]]) -> int:
    """How many leading lines are the expected samples, readable."""
    for i, line in enumerate(lines):
        if i >= len(expected) or line.key != expected[i]:
            return i
    return len(lines)


class CheckpointedWriter:
    """Appends samples to the main file and the sidecar; resumes, repairs and locks.

    >>> with CheckpointedWriter(Path("out.jsonl"), "full") as writer:
    ...     writer.check_config(settings)
    ...     done = writer.resume(expected_samples)
    ...     writer.write(prompt, result); writer.commit()
    """

    def __init__(self, output: Path, diagnostics: str = "full"):
        if diagnostics not in DIAGNOSTICS_LEVELS:
            raise QstarInputError(f"unknown diagnostics level {diagnostics!r}; choose {', '.join(DIAGNOSTICS_LEVELS)}")
        self.paths = OutputPaths(Path(output))
        self.level = diagnostics
        self._lock = OutputLock(self.paths.main)
        self._files: list = []
        self._lines: dict[Path, list[_Line] | None] | None = None  # each data file's lines, once read
        self._replay: list[_Line] | None = None
        self._created: list[Path] = []  # directories made for the output, removed again if left empty
        self._manifest: Manifest | None | object = _UNREAD  # the manifest in these files, once read

    @property
    def data_files(self) -> list[Path]:
        return [self.paths.main] + ([self.paths.diagnostics] if self.level != "none" else [])

    def __enter__(self) -> CheckpointedWriter:
        try:
            self._created = missing_parents(self.paths.main)
            self.paths.main.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(
                f"another qstar process is writing {self.paths.main} (lock {self.paths.lock}); wait for it or choose another --output"
            )
        except OSError as err:
            raise ResumeError(f"cannot write beside {self.paths.main}: {err.strerror}") from err
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            # What a close still has to flush was never committed: after a failed write (a full
            # disk) it is lost by design, and the failure already reported.
            with contextlib.suppress(OSError):
                f.close()
        self._files = []
        self._lock.release()
        remove_empty(self._created)

    @property
    def run_files(self) -> list[Path]:
        return [self.paths.main, self.paths.diagnostics, self.paths.meta]

    def previous_meta(self) -> Manifest | None:
        """The manifest of the run in these files, if there is one; a damaged one is refused.

        It is read once (the lock keeps other qstar processes from changing it), and the writer's copy
        follows what it does to the file: None after :meth:`start_afresh`, the manifest written by
        :meth:`write_meta` after that."""
        if self._manifest is _UNREAD:
            hint = "restore it, or add --overwrite to start afresh"
            exists = self.paths.meta.exists()
            self._manifest = read_manifest(self.paths.meta, ("fingerprint_config", "counts"), hint, ResumeError) if exists else None
        return self._manifest

    def check_config(
        self,
        config: dict[str, Any],
        overwrite: bool = False,
        descriptions: dict[str, str] | None = None,
        optional: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The previous run's manifest, after checking that ``config`` may continue it; changes nothing.

        Every key of ``config`` must have the same value in the manifest's ``fingerprint_config``; a
        mismatch is refused naming the keys (or their ``descriptions``). ``optional`` keys are
        fingerprinted only when set: either side may lack one, meaning its value there. With ``overwrite`` there is
        nothing to continue: ``None``, and :meth:`start_afresh` deletes the old files once the run
        is ready to start.
        """
        if overwrite:
            return None
        meta = self.previous_meta()
        if meta is None:
            if any(p.exists() and p.stat().st_size for p in self.run_files):
                raise ResumeError(
                    f"{self.paths.main} or its sidecar exists without a manifest {self.paths.meta.name}; "
                    "add --overwrite to replace it or choose another --output"
                )
            return None
        optional = optional or {}
        old = {**optional, **meta["fingerprint_config"]}
        config = {**optional, **config}
        missing = sorted(k for k in config if k not in old)
        if missing:
            raise ResumeError(
                f"{self.paths.main} was made by an older qstar whose manifest lacks {', '.join(missing)}; add --overwrite to start afresh"
            )
        changed = config_differences(old, config, descriptions)
        if changed:
            raise ResumeError(
                f"{self.paths.main} was made with another configuration: {', '.join(changed)}; "
                "run with the same settings to resume, or add --overwrite to start afresh"
            )
        return meta

    def start_afresh(self) -> None:
        """Delete the previous run's files (``--overwrite``)."""
        for path in self.run_files:
            path.unlink(missing_ok=True)
        self._lines = None
        self._manifest = None

    def resume(self, expected: list[tuple[int, int]], prompt_ids: list[tuple[list[int], list[int]]] | None = None) -> int:
        """Repair the data files, open them for appending and return how many samples are already done.

        ``expected`` is the run's ``(sample_idx, response_idx)`` order and ``prompt_ids`` (when given)
        each sample's prompt ids for both models. The manifest's ``counts.done`` is what the last
        commit made durable, and those samples are kept, each line checked against the schedule:
        its sample, and at level full its prompt ids. A file that holds fewer of them (a deleted or
        edited line, a missing sidecar, another run's lines) cannot be explained by a crash, and is
        refused, changing nothing. Lines past the count (what a crash may have torn, or left in one
        file only, or copied in) were never committed: they are cut, and sampled again.
        """
        done = self._repair(expected, prompt_ids)
        self._files = [path.open("ab") for path in self.data_files]
        return done

    def check_files(self, speculative: bool = False) -> None:
        """Refuse, before the models load, files that a crash cannot explain: a data file missing
        while another holds samples; fewer complete, readable lines than the manifest's committed
        samples; committed lines out of schedule order, of another diagnostics level or another kind
        of run (``speculative``: with draft rounds), or main-file and sidecar lines that tell of other
        samples. Each file is read once, for this and :meth:`resume`; nothing is changed."""
        committed = _committed(self.previous_meta())
        self._lines = {path: _read_lines(path) if path.exists() else None for path in self.data_files}
        held = {path: len(path_lines or ()) for path, path_lines in self._lines.items()}
        for path, path_lines in self._lines.items():
            if path_lines is None and (committed or any(held.values())):
                others = ", ".join(f"{p} holds {n} samples" for p, n in held.items() if n)
                raise RunFilesDamaged(
                    f"{path} is missing, but {others or f'the manifest says {committed} samples are done'}; "
                    f"restore it to resume, or move {self.paths.main.name} and its files away (or add --overwrite) to start afresh"
                )
            readable = next((i for i, line in enumerate(path_lines or ()) if line.key is None), held[path])
            if readable < committed:
                raise RunFilesDamaged(_damage(path, path_lines, readable, committed))
            # The schedule is in (sample_idx, response_idx) order: a line out of it was moved or edited.
            moved = next((i for i in range(1, committed) if path_lines[i].key <= path_lines[i - 1].key), None)
            if moved is not None:
                raise RunFilesDamaged(
                    f"{path} line {moved + 1} holds {describe_sample(path_lines[moved].key)} after "
                    f"{describe_sample(path_lines[moved - 1].key)}: lines were moved or edited; {_RESTORE}"
                )
        if self.level == "none" or not committed:
            return
        side = self._lines[self.paths.diagnostics][:committed]
        for i, line in enumerate(side):  # each committed line as this run writes it
            if line.level != self.level:
                raise RunFilesDamaged(
                    f"{self.paths.diagnostics} line {i + 1} is a sidecar line of level {line.level or 'unknown'}, but this run "
                    f"writes level {self.level}: the file comes from another run; {_RESTORE}"
                )
            if line.speculative and not speculative or speculative and line.speculative != side[0].speculative:
                raise RunFilesDamaged(
                    f"{self.paths.diagnostics} line {i + 1} {'holds' if line.speculative else 'lacks'} the draft rounds of "
                    f"speculative sampling, which this run {'does not use' if line.speculative else 'uses'}: the file comes "
                    f"from another run; {_RESTORE}"
                )
        for i, (main, line) in enumerate(zip(self._lines[self.paths.main][:committed], side)):
            if (mismatch := pair_mismatch(main.facts, line.facts)) is not None:
                raise RunFilesDamaged(f"{not_one_run(i + 1, self.paths.main, self.paths.diagnostics, mismatch)}; {_RESTORE}")

    def _repair(self, expected: list[tuple[int, int]], prompt_ids: list[tuple[list[int], list[int]]] | None) -> int:
        if self._lines is None:
            self.check_files()
        committed = _committed(self.previous_meta())
        if committed > len(expected):
            raise ResumeError(
                f"{self.paths.main} holds {committed} samples but this run has only {len(expected)}; add --overwrite to start afresh"
            )
        for path, path_lines in self._lines.items():  # every file is checked before any is cut
            good = _first_mismatch(path_lines or [], expected)
            if good < committed:
                raise RunFilesDamaged(_damage(path, path_lines, good, committed, expected[good]))
        side = self._lines.get(self.paths.diagnostics) if self.level != "none" else None
        if self.level == "full" and prompt_ids is not None and committed:
            for i, line in enumerate(side[:committed]):
                if line.prompt != prompt_digest(*prompt_ids[i]):
                    raise RunFilesDamaged(
                        f"{self.paths.diagnostics} line {i + 1} ({describe_sample(line.key)}) holds other prompt ids than this "
                        f"run's schedule gives it: the line comes from another run; {_RESTORE}"
                    )
        for path, path_lines in self._lines.items():  # cut what no commit made durable, torn lines included
            if path_lines is not None:
                with path.open("r+b") as f:
                    f.truncate(path_lines[committed - 1].end if committed else 0)
        self._replay = None if side is None else side[:committed]
        return committed

    def sample_lengths(self, done: int) -> list[int] | None:
        """Tokens of each of the first ``done`` samples (from the sidecar read by :meth:`resume`), or
        None without a sidecar."""
        if self._replay is None:
            return None
        return [line.facts.num_tokens for line in self._replay[:done]]

    def sample_rounds(self, done: int) -> list[tuple[list[int], list[int]] | None]:
        """Drafts and tokens per round of each of the first ``done`` samples of a speculative run
        (None for a sample written without them)."""
        return [line.rounds for line in (self._replay or [])[:done]]

    def write(self, prompt: Prompt, result: SampleResult, grade: dict[str, Any] | None = None) -> None:
        """Append one sample, with its grade in a graded run (not durable until :meth:`commit`)."""
        records = [main_record(prompt, result, grade)]
        if self.level != "none":
            records.append(diagnostics_record(result, self.level))
        for f, record in zip(self._files, records):
            f.write(orjson.dumps(record, option=_DUMP_OPTIONS, default=str))

    def commit(self) -> None:
        """Make every written sample durable."""
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace the manifest atomically (a crash leaves the old one or the new one, never half);
        ``meta`` is then the writer's copy of it (:meth:`previous_meta`)."""
        with atomic_output(self.paths.meta, locked=True, sync=False) as out:
            out.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE, default=str))
        self._manifest = meta
