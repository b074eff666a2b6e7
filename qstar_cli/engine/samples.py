"""What a sample is, in and out of the sampler: the request, the result, and a stream's counts.

Plain data, shared by the model loop (:mod:`qstar_cli.engine.sampler`), the schedule
(:mod:`qstar_cli.engine.scheduler`), the files (:mod:`qstar_cli.runfiles.writer`) and the engines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qstar_cli.runfiles.format import PER_TOKEN_FIELDS, TeacherTopK

__all__ = ["PER_TOKEN_FIELDS", "SampleRequest", "SampleResult", "StreamStats"]


@dataclass
class SampleRequest:
    """One response to generate: the prompt ids each model sees, keyed by ``sample_idx`` and ``response_idx``.

    Requests of one ``sample_idx`` (the K responses to one prompt) must come one after another and
    share their prompt ids: they are admitted together and the prompt is prefilled once.
    ``replay_tokens`` marks a sample already written by an earlier run: it holds its slot for exactly
    that many tokens (its outputs are not computed where no other row needs them, and not yielded),
    so that the samples after it see the batches they saw in the uninterrupted run. A speculative
    run's sample also needs ``replay_rounds``: its drafts and tokens per round (the sidecar's
    ``draft_lengths`` and ``round_tokens``); without them a row replays one token per round.
    """

    sample_idx: int
    prompt_ids_theta: list[int]
    prompt_ids_t: list[int]
    replay_tokens: int | None = None
    response_idx: int = 0
    replay_rounds: tuple[list[int], list[int]] | None = None

    def shares_prompt(self, other: SampleRequest) -> bool:
        """Another response to the same prompt (same row, same prompt ids): one prefill serves both."""
        return (
            self.sample_idx == other.sample_idx
            and self.prompt_ids_theta == other.prompt_ids_theta
            and self.prompt_ids_t == other.prompt_ids_t
        )


@dataclass
class SampleResult:
    """One generated response with everything needed to train on it and audit it."""

    sample_idx: int
    text: str
    token_ids: list[int]
    prompt_ids_theta: list[int]
    prompt_ids_t: list[int]
    finish_reason: str  # "stop" (an EOS was sampled; it is the last token) or "length"
    per_token: dict[str, list[float]] = field(default_factory=dict)
    response_idx: int = 0  # which of the row's responses (``--samples-per-prompt``)
    #: Speculative sampling only: drafts made and tokens emitted in each round (None otherwise).
    draft_lengths: list[int] | None = None
    round_tokens: list[int] | None = None
    #: ``teacher_topk`` > 0 only: pi_t's top-K at each emitted token (None otherwise).
    teacher_topk: TeacherTopK | None = None


@dataclass
class StreamStats:
    """What :meth:`DualModelSampler.stream` did: rounds computed, slot occupancy, tokens, prefills, drafts."""

    rounds: int = 0  # rounds computed (a stretch of replayed samples alone is skipped)
    tokens: int = 0  # tokens of new (not replayed) samples
    prefills: int = 0  # prefill forwards, per model
    prompts_prefilled: int = 0  # prompts those forwards ran over (each prompt's responses share one)
    row_rounds: int = 0  # rounds of new samples, summed over rows: each is one verifying forward of the row
    drafted: int = 0  # drafts those rounds proposed
    tested: int = 0  # drafts put to the acceptance test (those up to a round's first rejection)
    accepted: int = 0  # drafts accepted

    def count_round(self, outcome) -> None:
        """Count a computed round (a :class:`~qstar_cli.engine.rows.RoundOutcome`): its new rows' work."""
        self.rounds += 1
        self.tokens += outcome.new_tokens
        self.row_rounds += outcome.row_rounds
        self.drafted += outcome.drafted
        self.tested += outcome.tested
        self.accepted += outcome.accepted

    def add(self, other: StreamStats) -> None:
        """Count ``other``'s work too (the streams of several replicas)."""
        for name, value in dataclasses.asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def utilisation(self, slots: int) -> float:
        """Rows running per round / slots (new samples' rounds; 1 when every slot always ran)."""
        return self.row_rounds / (self.rounds * slots) if self.rounds else 0.0

    def speculative(self) -> dict[str, float]:
        """Acceptance rate (per draft tested: an estimate of 1 - TV(p, q)), mean drafts accepted per
        round, and forwards per token of a speculative run."""
        return {
            "acceptance_rate": round(self.accepted / self.tested, 4) if self.tested else 0.0,
            "mean_accepted_length": round(self.accepted / self.row_rounds, 4) if self.row_rounds else 0.0,
            "verify_forwards_per_token": round(self.row_rounds / self.tokens, 4) if self.tokens else 0.0,
            "draft_forwards_per_token": round((self.drafted + self.row_rounds) / self.tokens, 4) if self.tokens else 0.0,
        }
