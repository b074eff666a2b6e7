"""Results out: the main JSONL, the diagnostics sidecar and the run manifest, crash-safe and resumable.

For an output ``OUT.jsonl`` the files are ``OUT.jsonl`` (conversations), ``OUT.diagnostics.jsonl``
(per-sample diagnostics, same order), ``OUT.meta.json`` (configuration, fingerprint, counts,
timings) and ``OUT.jsonl.lock`` (held while a process writes). Samples are appended in batches and
committed (flushed and fsynced) together; a sample is done only when every data file holds its line.
On resume, both files are cut back to their common complete prefix, which also repairs a line torn
by a crash. Lines are serialised by orjson with a fixed key order, so equal results give equal bytes.
Non-finite floats (``ess_ratio`` when ``ess_t`` is 0) are written as ``null``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import orjson

from qstar_cli.adapters import Prompt
from qstar_cli.errors import QstarInputError
from qstar_cli.samples import PER_TOKEN_FIELDS, SampleResult

DIAGNOSTICS_LEVELS = ("full", "summary", "none")
#: Per-token fields summarised in the sidecar (every one but the token id).
SUMMARY_FIELDS = PER_TOKEN_FIELDS[1:]
SEQUENCE_SUMS = ("logp_theta", "logp_t", "logp_q")
_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
_NUM_TOKENS = re.compile(rb'"num_tokens":(\d+)')
_ROUNDS = re.compile(rb'"draft_lengths":\[([\d,]*)\],"round_tokens":\[([\d,]*)\]')


class ResumeError(QstarInputError):
    """The existing output cannot be resumed with this configuration, or another process holds it."""


@dataclass(frozen=True)
class OutputPaths:
    """The files of one run, named after the main JSONL path."""

    main: Path

    @property
    def stem(self) -> Path:
        return self.main.with_suffix("") if self.main.suffix == ".jsonl" else self.main

    @property
    def diagnostics(self) -> Path:
        return self.stem.with_name(self.stem.name + ".diagnostics.jsonl")

    @property
    def meta(self) -> Path:
        return self.stem.with_name(self.stem.name + ".meta.json")

    @property
    def lock(self) -> Path:
        return self.main.with_name(self.main.name + ".lock")

    def shard(self, index: int, count: int) -> OutputPaths:
        """The files of shard ``index`` of ``count``: ``run-00001-of-00003.jsonl`` for ``run.jsonl``."""
        suffix = ".jsonl" if self.main.suffix == ".jsonl" else ""
        return OutputPaths(self.stem.with_name(f"{self.stem.name}-{index:05d}-of-{count:05d}{suffix}"))


def main_record(prompt: Prompt, result: SampleResult) -> dict[str, Any]:
    """One line of the main file: the conversation with the sampled answer, in OpenAI chat format."""
    messages = [*prompt.messages, {"role": "assistant", "content": result.text}]
    return {
        "messages": messages,
        "sample_idx": result.sample_idx,
        "response_idx": result.response_idx,
        "finish_reason": result.finish_reason,
        **prompt.metadata,
    }


def diagnostics_record(result: SampleResult, level: str) -> dict[str, Any]:
    """One line of the sidecar: statistics and sequence sums, plus the exact ids and arrays at ``full``."""
    arrays = {name: np.asarray(result.per_token[name], dtype=np.float64) for name in SUMMARY_FIELDS}
    record: dict[str, Any] = {
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
    return record


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a configuration dictionary."""
    return hashlib.sha256(orjson.dumps(config, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any], descriptions: dict[str, str] | None = None) -> list[str]:
    """For each key of ``new`` whose value differs in ``old``: its description if it has one, else ``key (old -> new)``."""
    descriptions = descriptions or {}
    return [descriptions.get(k, f"{k} ({old.get(k)!r} -> {new.get(k)!r})") for k in sorted(new) if old.get(k) != new[k]]


def _line_ends(path: Path) -> list[int]:
    """Byte offset just past each newline of a file (streamed; the file may be large)."""
    ends, offset = [], 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            start = 0
            while (i := chunk.find(b"\n", start)) != -1:
                ends.append(offset + i + 1)
                start = i + 1
            offset += len(chunk)
    return ends


def _line_at(path: Path, ends: list[int], index: int) -> dict[str, Any]:
    """Line ``index`` of a file as an object (empty if it is not one: a damaged line)."""
    start = ends[index - 1] if index else 0
    with path.open("rb") as f:
        f.seek(start)
        try:
            record = orjson.loads(f.read(ends[index] - start))
        except orjson.JSONDecodeError:
            return {}
    return record if isinstance(record, dict) else {}


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
        self._lock = filelock.FileLock(self.paths.lock, timeout=0)
        self._files: list = []

    @property
    def data_files(self) -> list[Path]:
        return [self.paths.main] + ([self.paths.diagnostics] if self.level != "none" else [])

    def __enter__(self) -> CheckpointedWriter:
        try:
            self.paths.main.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except filelock.Timeout as err:
            raise ResumeError(
                f"another qstar process is writing {self.paths.main} (lock {self.paths.lock}); wait for it or choose another --output"
            ) from err
        except OSError as err:
            raise ResumeError(f"cannot write beside {self.paths.main}: {err.strerror}") from err
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        if self._lock.is_locked:
            self._lock.release()

    @property
    def run_files(self) -> list[Path]:
        return [self.paths.main, self.paths.diagnostics, self.paths.meta]

    def previous_meta(self) -> dict[str, Any] | None:
        """The manifest of the run in these files, if there is one; a damaged one is refused."""
        if not self.paths.meta.exists():
            return None
        try:
            meta = orjson.loads(self.paths.meta.read_bytes())
        except orjson.JSONDecodeError as err:
            raise ResumeError(f"the manifest {self.paths.meta} is damaged ({err}); restore it, or add --overwrite to start afresh") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint_config"), dict):
            raise ResumeError(f"the manifest {self.paths.meta} is damaged (no fingerprint_config); restore it, or add --overwrite to start afresh")
        return meta

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
                f"{self.paths.main} was made by an older qstar whose manifest lacks {', '.join(missing)}; "
                "add --overwrite to start afresh"
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

    def resume(self, expected_samples: list[tuple[int, int]]) -> int:
        """Open the data files for appending and return how many samples are already done.

        The kept lines are checked against ``expected_samples``, the run's ``(sample_idx,
        response_idx)`` order.
        """
        done = self._repair(expected_samples)
        self._files = [path.open("ab") for path in self.data_files]
        return done

    def _repair(self, expected_samples: list[tuple[int, int]]) -> int:
        """Cut every data file back to the samples all of them hold, checking they are the expected ones."""
        existing = [path for path in self.data_files if path.exists()]
        if not existing:
            return 0
        ends = {path: _line_ends(path) for path in existing}
        done = min(len(e) for e in ends.values()) if len(existing) == len(self.data_files) else 0
        if done > len(expected_samples):
            raise ResumeError(
                f"{self.paths.main} holds {done} samples but this run has only {len(expected_samples)}; "
                "add --overwrite to start afresh"
            )
        for path, path_ends in ends.items():  # every file is checked before any is cut
            if done:
                line = _line_at(path, path_ends, done - 1)
                if (line.get("sample_idx"), line.get("response_idx", 0)) != expected_samples[done - 1]:
                    row, response = expected_samples[done - 1]
                    raise ResumeError(
                        f"{path} line {done} is not sample {row} response {response}: the dataset changed; "
                        "add --overwrite to start afresh"
                    )
        for path, path_ends in ends.items():
            with path.open("r+b") as f:
                f.truncate(path_ends[done - 1] if done else 0)
        return done

    def sample_lengths(self, done: int) -> list[int] | None:
        """Tokens of each of the first ``done`` samples (from the sidecar), or None without a sidecar."""
        if self.level == "none":
            return None
        lengths: list[int] = []
        if not done:
            return lengths
        with self.paths.diagnostics.open("rb") as f:
            for line, _ in zip(f, range(done)):
                # The key order is fixed: num_tokens sits near the start of the line.
                lengths.append(int(_NUM_TOKENS.search(line, 0, 200).group(1)))
        return lengths

    def sample_rounds(self, done: int) -> list[tuple[list[int], list[int]] | None]:
        """Drafts and tokens per round of each of the first ``done`` samples of a speculative run
        (None for a sample written without them)."""
        rounds: list[tuple[list[int], list[int]] | None] = []
        if not done:
            return rounds
        with self.paths.diagnostics.open("rb") as f:
            for line, _ in zip(f, range(done)):
                found = _ROUNDS.search(line)
                rounds.append(None if found is None else tuple(orjson.loads(b"[" + g + b"]") for g in found.groups()))
        return rounds

    def write(self, prompt: Prompt, result: SampleResult) -> None:
        """Append one sample (not durable until :meth:`commit`)."""
        records = [main_record(prompt, result)]
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
        """Replace the manifest atomically (a crash leaves the old one or the new one, never half)."""
        tmp = self.paths.meta.with_name(self.paths.meta.name + ".tmp")
        tmp.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE, default=str))
        os.replace(tmp, self.paths.meta)
