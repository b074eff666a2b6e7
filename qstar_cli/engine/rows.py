"""The running rows' state as arrays, one entry per slot: on the device what a round reads and
updates in place, on the host what the schedule reads; one small block crosses per round.

A round forms its inputs on the device from :class:`DeviceRows` (each row's pending token, the
positions of its queries) and, once the tokens are drawn, updates it there: :func:`emitted_tokens`
cuts a row's tokens after an EOS, and its tokens produced, cached lengths and pending token advance by what it
emitted. The host receives one int32 block per round (:meth:`DeviceRows.advance`: the token ids,
the accepted and emitted counts, the finished, stopped and NaN flags) and updates the counts the
schedule and the draft policy read, :class:`HostRows`, for all rows at once. Python touches a row
alone when it is admitted or finishes.

With diagnostics, each emitted token's per-token values go into ``DeviceRows.values``, ``[slots,
columns, fields]``, moved with its row like its KV columns; a finished row's values come to the host
in one copy (:func:`copy_to_host`: pinned memory, non-blocking on CUDA), which is read after the
next round's transfer has waited for the device anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qstar_cli.distributions.sampling import counter_key
from qstar_cli.runfiles.format import PER_TOKEN_FIELDS, SUMMARY_FIELDS, TeacherTopK

#: Columns of the block :meth:`DeviceRows.advance` returns after the ``k + 1`` token ids.
OUTCOME = ("accepted", "emitted", "finished", "stopped", "nan_theta", "nan_t")


def emitted_tokens(token_ids: Tensor, accepted: Tensor, eos: Tensor, counts_eos: Tensor) -> tuple[Tensor, Tensor]:
    """``(emitted, stopped)`` per row: a round's tokens ``[n, k + 1]`` are its accepted drafts and one
    more (``accepted + 1``), cut after the first EOS where ``counts_eos`` (a new row's; a replayed row
    ends where it ended when written), which then stops the row."""
    offsets = torch.arange(token_ids.shape[1], device=token_ids.device)
    is_eos = torch.isin(token_ids, eos) & (offsets <= accepted.unsqueeze(-1)) & counts_eos.unsqueeze(-1)
    stopped = is_eos.any(-1)
    return torch.where(stopped, is_eos.long().argmax(-1) + 1, accepted + 1), stopped


#: The rows of :attr:`DeviceRows.table`: each field's name and how many rows it takes (a per-side
#: field one per :class:`~qstar_cli.engine.roles.Side`). Declared once: the views and what
#: :meth:`DeviceRows.admit` writes follow from it.
DEVICE_FIELDS = {"counter_key": 1, "produced": 1, "limit": 1, "new": 1, "cached": 2, "pending": 2}


@dataclass
class AdmittedRows:
    """The device state of rows entering the slots (:meth:`HostRows.place`), host arrays per row,
    one per :data:`DEVICE_FIELDS` field but ``produced`` (0: none of their tokens is emitted yet)."""

    counter_key: np.ndarray  # the key of the rows' counter-based draws (:func:`counter_key`)
    limit: np.ndarray  # the token budget, or the length a replayed row was written with
    new: np.ndarray  # 1: sampled now; 0: replayed
    cached: np.ndarray  # [2, rows]: tokens cached per side (the prompt but its last token)
    pending: np.ndarray  # [2, rows]: the pending token per side (the prompt's last)


class DeviceRows:
    """What the rounds read and update in place, per slot. Side-indexed fields have one row per
    side (:class:`~qstar_cli.engine.roles.Side`). With ``fields`` per-token values, ``values``
    ``[slots, columns, fields]`` holds each emitted token's (:data:`SUMMARY_FIELDS` order), then
    with ``teacher_topk`` K the log-probabilities of pi_t's top K and of the mass outside them,
    whose ids are ``topk_ids`` ``[slots, columns, K]`` (int32)."""

    def __init__(self, slots: int, device: torch.device, eos: set[int], fields: int, teacher_topk: int = 0):
        # One table, so that admitting or moving rows is one copy; each field of DEVICE_FIELDS is a
        # named view of its rows (per-side fields [2, slots], the others [slots]).
        self.table = torch.zeros(sum(DEVICE_FIELDS.values()), slots, dtype=torch.long, device=device)
        ends = np.cumsum([0, *DEVICE_FIELDS.values()])
        self.rows_of = {name: slice(int(a), int(b)) for name, a, b in zip(DEVICE_FIELDS, ends, ends[1:])}
        self.counter_key = self._view("counter_key")  # the key of the rows' draws
        self.produced = self._view("produced")  # tokens emitted so far: the counter's token index
        self.limit = self._view("limit")  # the token budget, or the length a replayed row was written with
        self.new = self._view("new")  # 1: sampled now; 0: replayed
        self.cached = self._view("cached")  # per side: tokens in the KV cache
        self.pending = self._view("pending")  # per side: the token the next round feeds
        self.eos = to_device(np.array(sorted(eos), np.int64), device)
        self.fields, self.teacher_topk = fields, teacher_topk
        topk_columns = teacher_topk + 1 if teacher_topk else 0
        self.values = torch.zeros(slots, 0, fields + topk_columns, device=device) if fields else None
        self.topk_ids = torch.zeros(slots, 0, teacher_topk, dtype=torch.int32, device=device) if teacher_topk else None

    def _view(self, name: str) -> Tensor:
        """A field's rows of the table: ``[slots]``, or ``[2, slots]`` for a per-side field."""
        rows = self.rows_of[name]
        return self.table[rows] if DEVICE_FIELDS[name] > 1 else self.table[rows.start]

    def _per_token(self) -> list[Tensor]:
        """The per-token tensors ``[slots, columns, ...]``, which move with their rows."""
        return [t for t in (self.values, self.topk_ids) if t is not None]

    def ensure_columns(self, columns: int) -> None:
        if self.values is not None and columns > self.values.shape[1]:
            self.values, self.topk_ids = (_widened(t, columns) if t is not None else None for t in (self.values, self.topk_ids))

    def admit(self, start: int, rows: AdmittedRows) -> None:
        """Rows ``start ..`` take ``rows``, none of whose tokens are emitted yet (one copy)."""
        table = np.zeros((self.table.shape[0], len(rows.counter_key)), np.int64)
        for name, at in self.rows_of.items():
            if name != "produced":
                table[at] = getattr(rows, name)
        self.table[:, start : start + table.shape[1]] = to_device(table, self.table.device)

    def set_produced(self, host: HostRows, n: int) -> None:
        """The leading rows' tokens emitted and cached from the host (after :meth:`HostRows.jump`)."""
        block = to_device(np.concatenate([host.produced[None, :n], host.cached(n).T]), self.table.device)
        self.produced[:n], self.cached[:, :n] = block[0], block[1:]

    def move(self, src: list[int], dst: list[int]) -> None:
        src_t, dst_t = to_device(np.array([src, dst], np.int64), self.table.device)
        self.table[:, dst_t] = self.table[:, src_t]
        for per_token in self._per_token():
            per_token[dst_t] = per_token[src_t]

    def feed(self, n: int, draft_len: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        """The leading ``n`` rows' pending tokens ``[2, n]`` and the positions of their ``k + 1``
        queries ``[2, n, k + 1]`` (-1 past a row's ``draft_len`` drafts)."""
        offsets = torch.arange(k + 1, device=self.table.device)
        positions = self.cached[:, :n].unsqueeze(-1) + offsets
        if draft_len is not None:
            positions = torch.where(offsets <= draft_len.unsqueeze(-1), positions, -1)
        return self.pending[:, :n], positions

    def advance(self, token_ids: Tensor, accepted: Tensor, forced: Tensor | None, nan: Tensor) -> Tensor:
        """Apply a round's ``token_ids`` ``[n, k + 1]`` and ``accepted`` drafts to the leading rows (a
        replayed row's ``forced`` tokens, where >= 0, as it emitted them when written); the block for
        the host, int32 ``[n, k + 1 + len(OUTCOME)]``."""
        n = len(token_ids)
        emitted, stopped = emitted_tokens(token_ids, accepted, self.eos, self.new[:n].bool())
        if forced is not None:
            emitted = torch.where(forced >= 0, forced, emitted)
        self.produced[:n] += emitted
        self.cached[:, :n] += emitted
        self.pending[:, :n] = token_ids.gather(1, (emitted - 1).unsqueeze(-1)).squeeze(-1)
        finished = stopped | (self.produced[:n] >= self.limit[:n])
        flags = torch.stack([accepted, emitted, finished.long(), stopped.long()], dim=-1)
        return torch.cat([token_ids, flags, nan.long()], dim=1).to(torch.int32)

    def record(self, destinations: Tensor, values: Tensor, topk: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """Write per-token ``values`` ``[tokens, fields]`` and pi_t's top-K (ids, log-probabilities and
        tail, :func:`~qstar_cli.distributions.token_choice.teacher_topk`) at ``destinations``, flat
        indices into ``[slots * columns]`` (:meth:`HostRows.advance`)."""
        if topk is not None:
            ids, logprobs, tail = topk
            values = torch.cat([values, logprobs, tail], dim=-1)
            self.topk_ids.view(-1, self.teacher_topk).index_copy_(0, destinations, ids)
        self.values.view(-1, self.values.shape[2]).index_copy_(0, destinations, values)


class HostRows:
    """Per-slot counts on the host (slot i: the schedule's row i), numpy arrays, and a new row's
    records. A replayed row is *scripted*: its rounds go as its recorded ones went."""

    def __init__(self, slots: int):
        self.produced = np.zeros(slots, np.int64)  # tokens emitted (the device's ``produced``)
        self.rounds = np.zeros(slots, np.int64)  # rounds run
        self.tested = np.zeros(slots, np.int64)  # drafts put to the test (the draft policy reads these two)
        self.accepted = np.zeros(slots, np.int64)  # drafts accepted
        self.budget = np.zeros(slots, np.int64)  # new tokens the row may get
        self.limit = np.zeros(slots, np.int64)  # where it ends: its budget, or its written length
        self.new = np.zeros(slots, bool)  # sampled now (not replayed)
        self.scripted = np.zeros(slots, bool)  # replayed with its rounds
        self.stopped = np.zeros(slots, bool)  # ended by an EOS
        self.prompt_lengths = np.zeros((slots, 2), np.int64)  # per side
        # Per column: a new row's emitted token ids, and per round its drafts and tokens emitted (a
        # scripted row's script).
        self.token_ids = np.zeros((slots, 0), np.int64)
        self.round_drafts = np.zeros((slots, 0), np.int64)
        self.round_tokens = np.zeros((slots, 0), np.int64)

    def _per_slot(self) -> list[np.ndarray]:
        """Every array declared in ``__init__``: each has a slot's entry first."""
        return [array for array in vars(self).values() if isinstance(array, np.ndarray)]

    @property
    def columns(self) -> int:
        return self.token_ids.shape[1]

    def ensure_columns(self, columns: int) -> None:
        if columns > self.columns:
            widen = ((0, 0), (0, columns - self.columns))
            self.token_ids, self.round_drafts, self.round_tokens = (
                np.pad(a, widen) for a in (self.token_ids, self.round_drafts, self.round_tokens)
            )

    def place(self, start: int, rows) -> AdmittedRows:
        """Take ``rows`` (:class:`~qstar_cli.engine.scheduler.Row`) into slots ``start ..``; the
        device's state for them (:meth:`DeviceRows.admit`)."""
        self.ensure_columns(max(max(r.budget, r.request.replay_tokens or 0) for r in rows))
        slots = slice(start, start + len(rows))
        for array in self._per_slot():  # a previous row's counts and records
            array[slots] = 0
        for slot, row in enumerate(rows, start):
            self.budget[slot] = row.budget
            self.limit[slot] = row.budget if row.result is not None else row.request.replay_tokens
            self.new[slot], self.scripted[slot] = row.result is not None, row.script is not None
            self.prompt_lengths[slot] = row.prompt_lengths
            if row.script is not None:
                self.round_drafts[slot, : len(row.script[0])] = row.script[0]
                self.round_tokens[slot, : len(row.script[1])] = row.script[1]
        return AdmittedRows(
            counter_key=np.array([counter_key(r.request.sample_idx, r.request.response_idx) for r in rows], np.int64),
            limit=self.limit[slots].copy(),
            new=self.new[slots].astype(np.int64),
            cached=self.prompt_lengths[slots].T - 1,
            pending=np.array([(r.request.prompt_ids_theta[-1], r.request.prompt_ids_t[-1]) for r in rows], np.int64).T,
        )

    def move(self, src: list[int], dst: list[int]) -> None:
        for array in self._per_slot():
            array[dst] = array[src]

    def cached(self, n: int) -> np.ndarray:
        """Tokens in the leading rows' caches, ``[n, 2]`` (per side): all but the pending one."""
        return self.prompt_lengths[:n] - 1 + self.produced[:n, None]

    def room(self, n: int) -> np.ndarray:
        """Drafts each leading row has room for: its round's last token must fit its budget."""
        return self.budget[:n] - self.produced[:n] - 1

    def script(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Scripted rows' drafts and tokens of their next round (0 and -1 for other rows)."""
        at = np.minimum(self.rounds[:n], self.columns - 1)[:, None]
        scripted = self.scripted[:n]
        drafts = np.take_along_axis(self.round_drafts[:n], at, 1)[:, 0]
        tokens = np.take_along_axis(self.round_tokens[:n], at, 1)[:, 0]
        return np.where(scripted, drafts, 0), np.where(scripted, tokens, -1)

    def advance(self, block: np.ndarray, draft_len: np.ndarray) -> RoundOutcome:
        """Apply a round's block (:meth:`DeviceRows.advance`) with the drafts each row made."""
        n, width = len(block), block.shape[1] - len(OUTCOME)
        token_ids, outcome = block[:, :width], dict(zip(OUTCOME, block[:, width:].T))
        accepted, emitted = outcome["accepted"], outcome["emitted"]
        new, rows = self.new[:n], np.arange(n)
        before = self.produced[:n].copy()
        # Every row's emitted positions (query, column), replayed ones too: the diagnostics are taken
        # over them, and a resumed run must take them over the same rows as the uninterrupted one.
        r, c = np.nonzero(np.arange(width) < emitted[:, None])
        keep = new[r]
        self.token_ids[r[keep], before[r[keep]] + c[keep]] = token_ids[r[keep], c[keep]]
        self.round_drafts[rows[new], self.rounds[:n][new]] = draft_len[new]
        self.round_tokens[rows[new], self.rounds[:n][new]] = emitted[new]
        self.produced[:n] += emitted
        self.rounds[:n] += 1
        self.accepted[:n] += emitted - 1
        self.tested[:n] += np.minimum(emitted, draft_len)
        self.stopped[:n] |= outcome["stopped"].astype(bool)
        # An EOS among the accepted drafts: every emitted token was an accepted draft.
        counted_accepted = emitted - 1 + (emitted < accepted + 1)
        return RoundOutcome(
            finished=np.nonzero(outcome["finished"])[0].tolist(),
            emitted=emitted,
            nan=np.stack([outcome["nan_theta"], outcome["nan_t"]], -1).astype(bool) & new[:, None],
            destinations=np.stack([r * width + c, r * self.columns + before[r] + c]),
            new_tokens=int(emitted[new].sum()),
            row_rounds=int(new.sum()),
            drafted=int(draft_len[new].sum()),
            tested=int(np.minimum(emitted, draft_len)[new].sum()),
            accepted=int(counted_accepted[new].sum()),
        )

    def jump(self, n: int) -> list[int]:
        """With replayed rows alone, advance them to the next finish without computing; the rows that finish."""
        scripted = self.scripted[:n]
        left = np.where(scripted, (self.round_tokens[:n] > 0).sum(1) - self.rounds[:n], self.limit[:n] - self.produced[:n])
        rounds = int(left.min())
        cols = np.arange(self.columns)
        window = scripted[:, None] & (cols >= self.rounds[:n, None]) & (cols < self.rounds[:n, None] + rounds)
        tokens, drafts = self.round_tokens[:n] * window, self.round_drafts[:n] * window
        self.produced[:n] += np.where(scripted, tokens.sum(1), rounds)
        self.accepted[:n] += ((tokens - 1) * window).sum(1)
        self.tested[:n] += np.minimum(tokens, drafts).sum(1)
        self.rounds[:n] += rounds
        return np.nonzero(self.produced[:n] == self.limit[:n])[0].tolist()


@dataclass(frozen=True)
class RoundFeed:
    """What a round feeds (step 1 of :meth:`~qstar_cli.engine.sampler.DualModelSampler._round`), from the
    rows' state. Per-side tensors are indexed by :class:`~qstar_cli.engine.roles.Side`."""

    k: int  # the most drafts a row makes this round
    draft_len_host: np.ndarray  # [n] drafts each row makes
    draft_len: Tensor  # the same, on the device
    forced: Tensor | None  # [n] a replayed row's tokens this round as written (-1: a new row); None without drafts
    pending: Tensor  # [2, n] the pending tokens
    positions: Tensor  # [2, n, k + 1] the queries' positions (-1 past a row's drafts)
    longest: list[int]  # per side, the forwards' attention width
    counter_key: Tensor  # [n] the keys of the rows' draws
    produced: Tensor  # [n] tokens each row emitted before the round (the token index of its first draw)


@dataclass
class RoundOutcome:
    """What the host takes from a round: the rows that finished, the tokens each emitted, NaN flags of new rows ``[n, 2]``,
    where each emitted token's values go (``[2, tokens]``: query index in the round, flat index into
    :attr:`DeviceRows.values`), and the new rows' counts for :class:`~qstar_cli.engine.samples.StreamStats`."""

    finished: list[int]
    emitted: np.ndarray
    nan: np.ndarray
    destinations: np.ndarray
    new_tokens: int
    row_rounds: int
    drafted: int
    tested: int
    accepted: int


class FinishedRows:
    """A round's finished new rows: their results, complete but for the per-token values, which are
    on their way to the host (one copy for all of them)."""

    def __init__(self, finished: list[tuple[int, object]], values: HostCopy | None, topk_ids: HostCopy | None = None):
        self.finished, self.values, self.topk_ids = finished, values, topk_ids

    @classmethod
    def collect(cls, state: DeviceRows, schedule, finished: list[int]) -> list[FinishedRows]:
        """The finished rows of ``schedule`` (a :class:`~qstar_cli.engine.scheduler.SlotScheduler`)
        that are new, before their slots are reused; none or one :class:`FinishedRows`."""
        rows, host = schedule.rows, schedule.host
        done = [i for i in finished if rows[i].result is not None]
        if not done:
            return []
        for i in done:
            result, produced, rounds = rows[i].result, host.produced[i], host.rounds[i]
            result.token_ids = host.token_ids[i, :produced].tolist()
            result.finish_reason = "stop" if host.stopped[i] else "length"
            if result.draft_lengths is not None:
                result.draft_lengths, result.round_tokens = host.round_drafts[i, :rounds].tolist(), host.round_tokens[i, :rounds].tolist()
        copies = [None, None]
        if state.values is not None:
            rows_done, columns = to_device(np.array(done, np.int64), state.values.device), int(host.produced[done].max())
            copies = [copy_to_host(t[rows_done, :columns]) if t is not None else None for t in (state.values, state.topk_ids)]
        return [cls([(rows[i].position, rows[i].result) for i in done], *copies)]

    def results(self):
        """``(position, result)`` of each row, its per-token values in (float64, as the sidecar has
        them) and its teacher top-K."""
        values = self.values.numpy() if self.values is not None else None
        topk_ids = self.topk_ids.numpy() if self.topk_ids is not None else None
        fields = len(SUMMARY_FIELDS)
        for j, (position, result) in enumerate(self.finished):
            result.per_token = {PER_TOKEN_FIELDS[0]: result.token_ids}
            if values is not None:
                mine = values[j, : len(result.token_ids)]
                result.per_token.update(zip(SUMMARY_FIELDS, mine[:, :fields].astype(np.float64).T.tolist()))
                if topk_ids is not None:
                    ids = topk_ids[j, : len(result.token_ids)]
                    result.teacher_topk = TeacherTopK(ids.copy(), mine[:, fields:-1].copy(), mine[:, -1].copy())
            yield position, result


class HostCopy:
    """A device tensor on its way to the host (:func:`copy_to_host`); :meth:`numpy` waits for it."""

    def __init__(self, tensor: Tensor):
        cuda = tensor.device.type == "cuda"
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        self._host.copy_(tensor, non_blocking=cuda)
        self._done = None
        if cuda:
            # Recorded on the stream the copy went to: the current device's may be another GPU's.
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tensor.device))

    def numpy(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()


def copy_to_host(tensor: Tensor) -> HostCopy:
    """Start copying ``tensor`` to the host without waiting (pinned memory, non-blocking on CUDA)."""
    return HostCopy(tensor)


def _widened(tensor: Tensor, columns: int) -> Tensor:
    """``tensor`` ``[slots, columns, ...]`` with room for ``columns`` columns, the new ones zero."""
    grown = tensor.new_zeros(tensor.shape[0], columns, *tensor.shape[2:])
    grown[:, : tensor.shape[1]] = tensor
    return grown


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """Host data on ``device`` without waiting: on CUDA through pinned memory, non-blocking (a copy
    from pageable memory synchronises the stream first). torch's pinned-memory allocator keeps the
    block until the copy is done. Every copy of host data to the device goes through here."""
    host = torch.from_numpy(array)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def to_host(tensor: Tensor) -> np.ndarray:
    """The round's transfer: the one place a round waits for the device."""
    return tensor.numpy(force=True)
