"""The run-file format, in one place: the files of a run and their suffixes, the per-token fields of
the sidecar, the diagnostics levels. Pure data: reading it imports neither torch nor datasets.

For an output ``OUT.jsonl`` the files are ``OUT.jsonl`` (conversations, OpenAI chat format),
``OUT.diagnostics.jsonl`` (per-sample diagnostics, same order), ``OUT.meta.json`` (the manifest:
configuration, fingerprint, counts, sessions) and ``OUT.jsonl.lock`` (held while a process writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAIN_SUFFIX = ".jsonl"
SIDECAR_SUFFIX = ".diagnostics.jsonl"
META_SUFFIX = ".meta.json"
LOCK_SUFFIX = ".lock"
DIAGNOSTICS_LEVELS = ("full", "summary", "none")
#: Per-token arrays of a sample, in the sidecar's order: the token, alpha, the three log-probs, and
#: the diagnostics of :func:`qstar_cli.distributions.mixture.token_diagnostics` (same names).
PER_TOKEN_FIELDS: tuple[str, ...] = (
    "token_id", "alpha", "logp_theta", "logp_t", "logp_q",
    "kl_theta", "kl_t", "ess_theta", "ess_t", "ess_ratio", "entropy_theta", "entropy_t", "entropy_q",
)  # fmt: skip
#: Per-token fields summarised in the sidecar (every one but the token id).
SUMMARY_FIELDS = PER_TOKEN_FIELDS[1:]
#: Per-token fields whose sums over a response the sidecar keeps (the sequence log-probabilities).
SEQUENCE_SUMS = ("logp_theta", "logp_t", "logp_q")


@dataclass(frozen=True)
class OutputPaths:
    """The files of one run, named after the main JSONL path."""

    main: Path

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
