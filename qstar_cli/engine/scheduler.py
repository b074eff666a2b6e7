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

from qstar_cli.engine.roles import Side
from qstar_cli.engine.rows import AdmittedRows, HostRows
from qstar_cli.engine.samples import SampleRequest, SampleResult

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
        #: The running rows; row i is in slot i, and its counts are ``host``'s entry i.
        self.rows: list[Row] = []
        self.host = HostRows(slots)

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

    def place(self, group: list[Row]) -> AdmittedRows:
        """Put ``group`` (prefilled) into the slots after the running rows; the device's state for
        them (:meth:`~qstar_cli.engine.rows.HostRows.place`)."""
        table = self.host.place(len(self.rows), group)
        self.rows.extend(group)
        return table

    def replayed_only(self) -> bool:
        return not self.host.new[: len(self.rows)].any()

    def jump(self) -> list[int]:
        """With replayed rows alone, nothing needs computing: advance them to the next finish."""
        return self.host.jump(len(self.rows))

    def remove(self, finished: list[int]) -> tuple[list[int], list[int]]:
        """Swap-remove the finished rows so that the running ones stay packed in the leading slots;
        the slots moved (``src``, ``dst``), whose caches must follow (the host's counts already have)."""
        order = list(range(len(self.rows)))
        for i in sorted(finished, reverse=True):
            last = order.pop()
            if i < len(order):
                order[i] = last
        moves = [(src, dst) for dst, src in enumerate(order) if src != dst]
        self.rows = [self.rows[i] for i in order]
        src, dst = [m[0] for m in moves], [m[1] for m in moves]
        if moves:
            self.host.move(src, dst)
        return src, dst


@dataclass
class Row:
    """A request in a slot: its stream position, token budget, result (None when replayed) and, for a
    replayed speculative row, its drafts and tokens per round; its counts are the schedule's
    :class:`~qstar_cli.engine.rows.HostRows`."""

    position: int
    request: SampleRequest
    budget: int
    result: SampleResult | None
    script: tuple[list[int], list[int]] | None = None

    @property
    def prompt_lengths(self) -> tuple[int, int]:
        """Per :class:`~qstar_cli.engine.roles.Side`."""
        return len(self.request.prompt_ids_theta), len(self.request.prompt_ids_t)

    def prompt_ids(self, side: Side) -> list[int]:
        return (self.request.prompt_ids_theta, self.request.prompt_ids_t)[side]


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
