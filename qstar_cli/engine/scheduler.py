"""The schedule: which request runs in which slot, and when (docs/resume-and-files.md).

A :class:`SlotScheduler` admits requests into ``slots`` slots and keeps the running rows packed in
the leading slots; the model loop (:class:`~qstar_cli.engine.sampler.DualModelSampler.stream`) prefills
what it admits, runs rounds, and moves caches as it says. Nothing here reads a clock or a tensor:
the schedule is a function of the requests and the sampled rounds alone, so a run that replays its
written samples (:class:`Row` with no result) sees exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qstar_cli.engine.samples import RowRound, SampleRequest, SampleResult, StreamStats

SCHEDULERS: tuple[str, ...] = ("continuous", "static")


def refill_size(slots: int) -> int:
    """Free slots that trigger a refill: 1 up to 8 slots, then an eighth of them (prefill stays batched)."""
    return max(1, slots // 8)


class SlotScheduler:
    """Admission, refills and packing of ``slots`` slots over a lazy stream of requests.

    Refill policy (``continuous``): once at least :func:`refill_size` slots are free (or no row
    runs), the next requests are admitted together. ``static`` refills only when every slot is free
    (batches of ``slots`` consecutive requests that shrink as rows finish). A prompt's responses
    are admitted together, at most ``slots`` at a time. A request is admitted only while it lies
    fewer than ``max_waiting`` positions after the oldest unfinished one, which bounds the finished
    samples a caller holds back to write them in order. ``admit(position, request)`` makes its row.
    """

    def __init__(
        self,
        requests: Iterable[SampleRequest],
        slots: int,
        scheduler: str,
        max_waiting: int,
        admit: Callable[[int, SampleRequest], Row],
    ):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots, self.max_waiting, self.admit = slots, max_waiting, admit
        self.refill = slots if scheduler == "static" else refill_size(slots)
        self.pending = Lookahead(enumerate(requests))
        #: The running rows; row i is in slot i.
        self.rows: list[Row] = []

    def next_group(self) -> list[Row]:
        """The requests to admit now, as rows (to be prefilled into the slots after ``rows``)."""
        free = self.slots - len(self.rows)
        pending = self.pending
        group: list[Row] = []
        if not pending or (free < self.refill and self.rows):
            return group
        oldest = min((r.position for r in self.rows), default=pending.peek()[0])
        while pending and pending.peek()[0] < oldest + self.max_waiting:
            same = 1
            while same < self.slots and (nxt := pending.peek(same)) and nxt[1].shares_prompt(pending.peek()[1]):
                same += 1
            if same > free - len(group):
                break
            group.extend(self.admit(*next(pending)) for _ in range(same))
        return group

    def replayed_only(self) -> bool:
        return all(r.result is None for r in self.rows)

    def jump(self) -> list[int]:
        """With replayed rows alone, nothing needs computing: advance them to the next finish."""
        rounds = min(r.rounds_left for r in self.rows)
        for row in self.rows:
            row.replay(rounds)
        return [i for i, r in enumerate(self.rows) if r.done]

    def remove(self, finished: list[int]) -> list[tuple[int, int, Row]]:
        """Swap-remove the finished rows so that the running ones stay packed in the leading slots;
        the ``(src, dst, row)`` moves whose caches must follow."""
        order = list(range(len(self.rows)))
        for i in sorted(finished, reverse=True):
            last = order.pop()
            if i < len(order):
                order[i] = last
        moves = [(src, dst, self.rows[src]) for dst, src in enumerate(order) if src != dst]
        self.rows = [self.rows[i] for i in order]
        return moves


@dataclass
class Row:
    """A request in a slot: its stream position, token budget, result so far (None when replayed)."""

    position: int
    request: SampleRequest
    budget: int
    result: SampleResult | None
    script: tuple[list[int], list[int]] | None = None  # a replayed row's drafts and tokens per round
    produced: int = 0  # tokens emitted
    rounds: int = 0
    tested: int = 0  # drafts put to the acceptance test
    accepted: int = 0
    last_token: int = 0  # the last token emitted (fed in the next round)
    reported: int = 0  # tokens already counted by ``on_step``

    @property
    def prompt_lengths(self) -> tuple[int, int]:
        return len(self.request.prompt_ids_theta), len(self.request.prompt_ids_t)

    def prompt_ids(self, side: int) -> list[int]:
        return self.request.prompt_ids_t if side else self.request.prompt_ids_theta

    def cached(self, side: int) -> int:
        """Tokens in the row's cache of a model of this side: all but the pending one."""
        return self.prompt_lengths[side] - 1 + self.produced

    def pending(self, side: int) -> int:
        """The token the next round feeds first: the last emitted, or the prompt's last."""
        return self.last_token if self.produced else self.prompt_ids(side)[-1]

    @property
    def rounds_left(self) -> int:
        """A replayed row's rounds to go."""
        return self.request.replay_tokens - self.produced if self.script is None else len(self.script[1]) - self.rounds

    @property
    def done(self) -> bool:
        """Finished: an EOS, or the token budget; a replayed row, where it finished when written."""
        if self.result is None:
            return self.produced == self.request.replay_tokens
        return self.result.finish_reason == "stop" or self.produced == self.budget

    def replay_draft_len(self) -> int:
        return 0 if self.script is None else self.script[0][self.rounds]

    def replay(self, rounds: int) -> None:
        """Advance a replayed row by ``rounds`` rounds, as it went in the run that wrote it (its
        acceptance counts too, which ``--draft-k auto`` reads)."""
        if self.script is None:
            self.produced += rounds
        else:
            for draft_len, tokens in zip(*(part[self.rounds : self.rounds + rounds] for part in self.script)):
                self.produced += tokens
                self.accepted += tokens - 1
                self.tested += min(tokens, draft_len)
        self.rounds += rounds

    def apply(self, got: RowRound, eos: set[int], stats: StreamStats) -> None:
        """Append a round's emitted tokens (the accepted drafts and one more, cut after an EOS)."""
        result, draft_len, accepted = self.result, got.draft_len, got.accepted
        emitted = 0
        for token_values in got.tokens:
            token = self.last_token = int(token_values[0])
            result.token_ids.append(token)
            for values, value in zip(result.per_token.values(), [token, *token_values[1:]]):  # token_id first
                values.append(value)
            emitted += 1
            if token in eos:
                result.finish_reason = "stop"
                break
        self.produced += emitted
        self.rounds += 1
        if emitted < accepted + 1:  # an EOS among the accepted drafts: the drafts after it do not count
            accepted = tested = emitted
        else:
            tested = min(accepted + 1, draft_len)  # drafts after a rejection were never tested
        self.tested += tested
        self.accepted += accepted
        stats.tokens += emitted
        stats.row_rounds += 1
        stats.drafted += draft_len
        stats.tested += tested
        stats.accepted += accepted
        if result.draft_lengths is not None:
            result.draft_lengths.append(draft_len)
            result.round_tokens.append(emitted)


class Lookahead:
    """An iterator that can look ahead: ``peek(i)`` is the i-th next item (None past the end)."""

    def __init__(self, iterable):
        self._it = iter(iterable)
        self._ahead: deque = deque()

    def peek(self, i: int = 0):
        while len(self._ahead) <= i and (item := next(self._it, None)) is not None:
            self._ahead.append(item)
        return self._ahead[i] if i < len(self._ahead) else None

    def __bool__(self) -> bool:
        return self.peek() is not None

    def __next__(self):
        self.peek()
        return self._ahead.popleft()
