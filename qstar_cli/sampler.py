"""The dual-model sampler: two causal LMs, their slot KV caches, q* tokens for every running row per round.

``--batch-size N`` is N slots. A row's prompt is prefilled but its last token, which is *pending*:
each round feeds every running row's pending token to both models, each with its own
:class:`~qstar_cli.slots.SlotCache`, takes log-softmax in float32 over the shared vocabulary, and
solves alpha, diagnoses and draws with the math core; the drawn token is the next pending one. One
host transfer per round carries the per-row results. A row that finishes (an EOS of either model,
its token budget, or a model's context) frees its slot, which the next requests take after one
batched prefill per model (continuous batching); ``static`` refills only an empty batch.

With ``draft_k`` > 0 (speculative q* sampling, SPEC section 3) a round also feeds each row's drafts:
pi_theta (or a small draft pair) proposes them one forward at a time, the other model(s) score
pending token + drafts in one forward, and :func:`~qstar_cli.speculative.verify_drafts` keeps the
accepted ones and one more token, exactly distributed as q*. A row's rejected drafts are rolled
back by its length alone; other rows keep theirs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from qstar_cli.mixture import (
    DIAGNOSTIC_FIELDS,
    AlphaMethod,
    check_alpha_method,
    mixture_logprobs,
    solve_alpha,
    token_diagnostics,
)
from qstar_cli.models import (
    LoadedModel,
    VocabularyMismatchError,
    check_shared_vocabulary,
    context_limit,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qstar_cli.prompts import Messages, PromptFormat
from qstar_cli.sampling import SamplingParams, counter_uniform, sample_key, sample_tokens, sampling_logprobs
from qstar_cli.slots import SlotCache
from qstar_cli.speculative import AUTO_MAX_DRAFT, auto_draft_len, round_costs, verify_drafts

SCHEDULERS: tuple[str, ...] = ("continuous", "static")
#: Who drafts for speculative sampling: pi_theta itself, or a small pair of models.
DRAFTERS: tuple[str, ...] = ("theta", "pair")
#: The most drafts per round: past a few, a draft is rarely reached (acceptance^k) and costs a forward.
MAX_DRAFT_K = 32
#: Uniform streams of the counter-based generator: drafts and acceptance tests (token draws: 0).
DRAFT_STREAM, ACCEPT_STREAM = 1, 2

#: Per-token arrays of a sample, in the sidecar's order (SPEC section 5).
PER_TOKEN_FIELDS: tuple[str, ...] = ("token_id", "alpha", "logp_theta", "logp_t", "logp_q") + DIAGNOSTIC_FIELDS


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


def eos_ids(*loaded: LoadedModel) -> set[int]:
    """Every EOS id of either model's generation config and tokenizer."""
    ids: set[int] = set()
    for m in loaded:
        for value in (m.model.generation_config.eos_token_id, m.tokenizer.eos_token_id):
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
    return ids


class DualModelSampler:
    """Samples responses token by token from q* = pi_theta^alpha * pi_t^(1-alpha) / Z.

    >>> sampler = DualModelSampler.from_pretrained("demo", "demo", theta_format="plain", t_format="chat")
    >>> [result] = sampler.generate([[{"role": "user", "content": "What is 7 * 8?"}]])
    >>> result.text, result.per_token["alpha"][:3]
    """

    def __init__(
        self,
        theta: LoadedModel,
        target: LoadedModel,
        theta_format: str | None = None,
        t_format: str | None = None,
        alpha_method: AlphaMethod = "kl_symmetry",
        alpha: float = 0.5,
        max_new_tokens: int = 512,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        draft_k: int | str = 0,
        draft_pair: tuple[LoadedModel, LoadedModel] | None = None,
    ):
        self.theta, self.target = theta, target
        self.vocab = check_shared_vocabulary(theta, target)
        #: Drafts per row per round (0: plain sampling; "auto": chosen per row, up to AUTO_MAX_DRAFT).
        self.auto_draft = draft_k == "auto"
        self.draft_k = AUTO_MAX_DRAFT if self.auto_draft else check_draft_k(draft_k)
        #: The models, the prompt each sees (0: pi_theta's, 1: pi_t's), and how they are fed: the
        #: sequential ones a token per forward (the drafter), the verifying ones a round per forward.
        self.models: tuple[LoadedModel, ...] = (theta, target)
        self.sides: tuple[int, ...] = (0, 1)
        self.sequential, self.verifying = (0,), (1,)
        if draft_pair is not None:
            for draft, main in zip(draft_pair, (theta, target)):
                try:
                    shared = check_shared_vocabulary(draft, main)
                except VocabularyMismatchError as err:
                    raise VocabularyMismatchError(f"draft model {draft.name} against {main.name}: {err}") from None
                if shared < self.vocab:
                    raise VocabularyMismatchError(f"draft model {draft.name} emits fewer than the {self.vocab} ids that {main.name} shares")
            self.models, self.sides = self.models + tuple(draft_pair), self.sides + (0, 1)
            self.sequential, self.verifying = (2, 3), (0, 1)
        self.theta_format = PromptFormat(theta_format, theta.tokenizer)
        self.t_format = PromptFormat(t_format, target.tokenizer)
        self.alpha_method, self.alpha = alpha_method, alpha
        check_alpha_method(alpha_method, alpha)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingParams()
        self.seed = seed
        self.eos = {i for i in eos_ids(theta, target) if i < self.vocab}
        #: (pi_theta's side, pi_t's side): the most tokens, prompt and response, the models of each side
        #: take, draft models included (None: no limit known).
        self.context_limits = tuple(
            min((limit for i, m in enumerate(self.models) if self.sides[i] == side if (limit := context_limit(m)) is not None), default=None)
            for side in (0, 1)
        )

    @classmethod
    def from_pretrained(
        cls,
        model_theta: str,
        model_t: str,
        device: str = "auto",
        dtype: str = "auto",
        draft_model_theta: str | None = None,
        draft_model_t: str | None = None,
        **kwargs,
    ) -> DualModelSampler:
        """Load the models (hub id, local directory, ``.gguf`` file, or ``demo``) and build a sampler;
        ``draft_model_theta`` and ``draft_model_t`` name a draft pair for speculative sampling."""
        # "meta" (the architecture without weights) is for a driver whose replicas sample elsewhere.
        dev = torch.device("meta") if device == "meta" else resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        loaded: dict[str, LoadedModel] = {}
        for spec in (model_theta, model_t, draft_model_theta, draft_model_t):
            if spec is not None and spec not in loaded:
                loaded[spec] = load_model(spec, dev, dt)
        pair = (loaded[draft_model_theta], loaded[draft_model_t]) if draft_model_theta and draft_model_t else None
        return cls(loaded[model_theta], loaded[model_t], draft_pair=pair, **kwargs)

    def encode_prompts(self, conversation: Messages) -> tuple[list[int], list[int]]:
        """The prompt ids each model sees for one conversation."""
        return self.theta_format.encode(conversation), self.t_format.encode(conversation)

    def token_budget(self, prompt_theta: list[int], prompt_t: list[int]) -> int:
        """New tokens a row may get: ``max_new_tokens``, and no more than either model's context leaves."""
        room = [limit - len(p) for limit, p in zip(self.context_limits, (prompt_theta, prompt_t)) if limit is not None]
        return min([self.max_new_tokens, *room])

    def _pad_id(self, loaded: LoadedModel) -> int:
        tok = loaded.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[Messages],
        sample_indices: list[int] | None = None,
        prompt_ids: list[tuple[list[int], list[int]]] | None = None,
        on_step: Callable[[int], None] | None = None,
        batch_size: int | None = None,
        scheduler: str = "continuous",
    ) -> list[SampleResult]:
        """One response per conversation; results in input order.

        ``sample_indices`` (default 0..n-1) key the counter-based randomness: the same index, seed and
        settings give the same response whatever else is in the batch (with ``draft_k="auto"``, one
        from the same distribution: the batch shares its draft lengths). ``prompt_ids`` are the
        ``encode_prompts`` of the conversations when the caller has them already. ``batch_size``
        slots (default: all conversations at once) are scheduled as in :meth:`stream`.
        """
        if sample_indices is None:
            sample_indices = list(range(len(conversations)))
        prompts = prompt_ids if prompt_ids is not None else [self.encode_prompts(c) for c in conversations]
        requests = [SampleRequest(i, p_theta, p_t) for i, (p_theta, p_t) in zip(sample_indices, prompts)]
        results: list[SampleResult | None] = [None] * len(requests)
        for position, result in self.stream(requests, batch_size or max(len(requests), 1), scheduler, on_step):
            results[position] = result
        return results

    @torch.inference_mode()
    def stream(
        self,
        requests: Iterable[SampleRequest],
        slots: int = 8,
        scheduler: str = "continuous",
        on_step: Callable[[int], None] | None = None,
        max_waiting: int | None = None,
        stats: StreamStats | None = None,
    ) -> Iterator[tuple[int, SampleResult]]:
        """Generate the requests on ``slots`` slots; yield ``(position, result)`` as samples finish.

        ``position`` is the request's index in ``requests``, which is read lazily. Each step is one
        round (one token per row, or with ``draft_k`` a row's drafts and the tokens accepted of
        them). Refill policy (``continuous``): after a round, once at least :func:`refill_size`
        slots are free (or no row runs), the next requests are prefilled together, one forward per
        model, and join the batch. ``static`` refills only when every slot is free (batches of
        ``slots`` consecutive requests that shrink as rows finish). A request is admitted only while
        it lies fewer than ``max_waiting`` (default ``32 * slots``) positions after the oldest
        unfinished one, which bounds the finished samples a caller holds back to write them in order.

        The schedule depends on the requests and the sampled rounds alone, never on timing, so a
        run that replays its already-written samples (``SampleRequest.replay_tokens`` and
        ``replay_rounds``) gives every other sample exactly the batches, slots and floats it had in
        the uninterrupted run. ``on_step(n)`` is called after each round with the tokens it
        produced; an exception it raises ends the stream.
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        stats = stats if stats is not None else StreamStats()
        max_waiting = max_waiting or 32 * slots
        refill = slots if scheduler == "static" else refill_size(slots)
        pending = _Lookahead(enumerate(requests))
        caches = tuple(SlotCache(m.model.config, slots, 1) for m in self.models)
        rows: list[_Row] = []

        while True:
            free = slots - len(rows)
            if pending and (free >= refill or not rows):
                oldest = min((r.position for r in rows), default=pending.peek()[0])
                group: list[_Row] = []
                while pending and pending.peek()[0] < oldest + max_waiting:
                    # A prompt's responses go in together (at most ``slots`` at a time).
                    same = 1
                    while same < slots and (nxt := pending.peek(same)) and nxt[1].shares_prompt(pending.peek()[1]):
                        same += 1
                    if same > free - len(group):
                        break
                    group.extend(self._admit(*next(pending)) for _ in range(same))
                if group:
                    group = self._prefill(caches, rows, group, stats)
                    rows.extend(group)
            if not rows:
                return

            if all(r.result is None for r in rows):
                # Only replayed samples: nothing to compute, jump to the next finish.
                jump = min(r.rounds_left for r in rows)
                for row in rows:
                    row.replay(jump)
                finished = [i for i, r in enumerate(rows) if r.done]
            else:
                finished = self._round(caches, rows, self._draft_lengths(rows), stats)
            for i in finished:
                if rows[i].result is not None:
                    yield rows[i].position, self._finish(rows[i].result)
            if on_step is not None and any(r.result is not None for r in rows):
                on_step(sum(len(r.result.token_ids) - r.reported for r in rows if r.result is not None))
                for row in rows:
                    row.reported = row.produced

            # Swap-remove finished rows so that the running ones stay packed in the leading slots.
            order = list(range(len(rows)))
            for i in sorted(finished, reverse=True):
                last = order.pop()
                if i < len(order):
                    order[i] = last
            for dst, src in enumerate(order):
                if src != dst:
                    for cache, side in zip(caches, self.sides):
                        cache.move(src, dst, rows[src].cached(side))
            rows = [rows[i] for i in order]

    @functools.cache
    def round_costs(self, rows: int) -> np.ndarray:
        """Cost of a round of ``k = 0..AUTO_MAX_DRAFT`` drafts for ``rows`` rows (:func:`round_costs`),
        for ``--draft-k auto``: constants of the models and device, never timings, so that the
        rounds (and the samples) do not depend on timing."""
        size = [sum(p.numel() for p in m.model.parameters()) for m in self.models]
        return round_costs(
            sum(size[i] for i in self.sequential), sum(size[i] for i in self.verifying), rows, self.theta.model.device.type
        )

    def _draft_lengths(self, rows: list[_Row]) -> list[int]:
        """Drafts each row makes this round: ``draft_k`` (or the auto policy's choice for the batch,
        or a replayed row's recorded one), never more than leave room for the round's last token."""
        room = np.array([r.budget - r.produced - 1 for r in rows])
        k = self.draft_k
        if self.auto_draft:
            accepted, tested = (np.array([getattr(r, name) for r in rows], dtype=np.float64) for name in ("accepted", "tested"))
            k = auto_draft_len(accepted, tested, room, self.round_costs(len(rows)))
        return [r.replay_draft_len() if r.result is None else int(min(k, space)) for r, space in zip(rows, room)]

    def _admit(self, position: int, request: SampleRequest) -> _Row:
        if request.replay_tokens is not None:
            # The budget it had (which --draft-k auto reads); it ends where it ended.
            return _Row(position, request, self.token_budget(request.prompt_ids_theta, request.prompt_ids_t), None, request.replay_rounds)
        result = SampleResult(
            request.sample_idx, "", [], request.prompt_ids_theta, request.prompt_ids_t, "length",
            {f: [] for f in PER_TOKEN_FIELDS}, request.response_idx,
        )
        if self.draft_k:
            result.draft_lengths, result.round_tokens = [], []
        budget = self.token_budget(request.prompt_ids_theta, request.prompt_ids_t)
        if budget < 1:
            raise ValueError(f"a prompt fills a model's context ({self.context_limits} tokens); it has no room for a response")
        return _Row(position, request, budget, result)

    def _prefill(self, caches, rows: list[_Row], group: list[_Row], stats: StreamStats) -> list[_Row]:
        """Prefill ``group`` into the slots after ``rows``: one left-padded forward per model over its
        distinct prompts but their last token (fed with the first round), whose caches are then
        copied to their other responses. Returns the group in slot order (distinct prompts first).
        """
        first = [i == 0 or not r.request.shares_prompt(group[i - 1].request) for i, r in enumerate(group)]
        distinct = [r for r, f in zip(group, first) if f]
        copies = [r for r, f in zip(group, first) if not f]
        # Each copy's prompt is the last distinct one before it.
        origin = list(itertools.accumulate((int(f) for f in first)))
        origin = [o - 1 for o, f in zip(origin, first) if not f]
        group = distinct + copies
        start = len(rows)
        for cache, side in zip(caches, self.sides):
            cache.ensure_capacity(max(r.prompt_lengths[side] + r.budget for r in group))
        width = [max(r.prompt_lengths[side] for r in distinct) - 1 for side in self.sides]
        if not any(r.result is not None for r in rows + group) or not any(width):
            return group
        for cache, loaded, side, side_width in zip(caches, self.models, self.sides, width):
            if not side_width:
                continue
            ids = [r.prompt_ids(side)[:-1] for r in distinct]
            tokens = torch.full((len(ids), side_width), self._pad_id(loaded), dtype=torch.long)
            positions = torch.full((len(ids), side_width), -1, dtype=torch.long)
            for i, prompt in enumerate(ids):
                if prompt:
                    tokens[i, -len(prompt) :] = torch.tensor(prompt)
                    positions[i, -len(prompt) :] = torch.arange(len(prompt))
            device = loaded.model.device
            cache.forward(loaded.model, tokens.to(device), positions.to(device), start, side_width, self.vocab)
            for j, i in enumerate(origin):
                cache.move(start + i, start + len(distinct) + j, len(ids[i]))
        stats.prefills += 1
        stats.prompts_prefilled += len(distinct)
        return group

    def _mixture(self, logp_theta: Tensor, logp_t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, log q)`` of two models' log-probs under this sampler's alpha method."""
        alpha = solve_alpha(logp_theta, logp_t, method=self.alpha_method, alpha=self.alpha)
        return alpha, mixture_logprobs(logp_theta, logp_t, alpha)

    def _round(self, caches, rows: list[_Row], draft_len: list[int], stats: StreamStats) -> list[int]:
        """One round for every row: draft, verify, record the tokens emitted; the rows that finished.

        Each row feeds its pending token (the last one emitted, or its prompt's last) and
        ``draft_len`` drafts (:meth:`_draft`), which the verifying models score in one forward
        (:meth:`_verify`). q is solved at every position and :func:`verify_drafts` keeps each row's
        accepted drafts plus one token; the cache columns of rejected drafts are simply overwritten
        by the row's next round.
        """
        n, k = len(rows), max(draft_len)
        device = self.theta.model.device
        keys = torch.tensor([(r.request.sample_idx, r.request.response_idx, r.produced) for r in rows], device=device)
        sample, step = sample_key(keys[:, 0], keys[:, 1]), keys[:, 2]
        lengths = torch.tensor(draft_len, device=device)
        feed = _Feed.of(rows, lengths, k)
        draft_ids, logp_p, drafter_logps = self._draft(caches, feed, sample, step, k)
        logp_theta, logp_t = self._verify(caches, feed, draft_ids, drafter_logps)
        alpha, logp_q = self._mixture(logp_theta, logp_t)  # [n * (k + 1), V]
        logp_r = sampling_logprobs(logp_q, self.sampling)

        u_accept = counter_uniform(self.seed, sample.unsqueeze(-1).expand(n, k), step.unsqueeze(-1) + feed.offsets[:k], ACCEPT_STREAM)
        accepted, logp_last = verify_drafts(logp_r.view(n, k + 1, -1), logp_p, draft_ids, lengths, u_accept)
        # The round's last token is keyed by its position, stream 0: without drafts, plain sampling's draw.
        last = sample_tokens(logp_last, counter_uniform(self.seed, sample, step + accepted))
        tokens = torch.cat([draft_ids, last.unsqueeze(-1)], dim=1).scatter_(1, accepted.unsqueeze(-1), last.unsqueeze(-1))
        picked = tokens.view(-1, 1)
        columns = {
            "token_id": tokens.view(-1),
            "alpha": alpha,
            "logp_theta": logp_theta.gather(-1, picked).squeeze(-1),
            "logp_t": logp_t.gather(-1, picked).squeeze(-1),
            "logp_q": logp_r.gather(-1, picked).squeeze(-1),
            **token_diagnostics(logp_theta, logp_t, logp_q),
        }
        values = torch.stack([columns[f].to(torch.float64) for f in PER_TOKEN_FIELDS], dim=-1).view(n, -1)
        # The round's only host synchronisation.
        host = torch.cat([accepted.unsqueeze(-1).to(torch.float64), values], dim=1).tolist()
        stats.steps += 1
        finished = []
        for i, (row, values) in enumerate(zip(rows, host)):
            if row.result is None:
                row.replay(1)
            else:
                row.record(draft_len[i], int(values[0]), values[1:], len(PER_TOKEN_FIELDS), self.eos, stats)
            if row.done:
                finished.append(i)
        return finished

    def _draft(self, caches, feed: _Feed, sample: Tensor, step: Tensor, k: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The sequential models take the pending tokens, then each draft, one forward at a time;
        after each forward a draft is drawn from the drafter's distribution (pi_theta's, or the
        draft pair's mixture q'), tempered and truncated as q is.

        Returns the drafts ``[n, k]``, the log p they were drawn from ``[n, k, V]``, and the
        drafter's k + 1 untempered log-probs (``[n, V]`` each; pi_theta's are reused for q).
        """
        drafts, draft_logps, drafter_logps = [], [], []
        for j in range(k + 1):
            out = []
            for i in self.sequential:
                side = self.sides[i]
                fed = feed.pending[side] if j == 0 else drafts[-1]
                positions = feed.positions[side][:, j : j + 1]
                out.append(caches[i].forward(self.models[i].model, fed.unsqueeze(-1), positions, 0, feed.longest[side], self.vocab))
            drafter_logps.append(out[0] if len(out) == 1 else self._mixture(*out)[1])
            if j < k:
                logp_p = sampling_logprobs(drafter_logps[-1], self.sampling)
                drafts.append(sample_tokens(logp_p, counter_uniform(self.seed, sample, step + j, DRAFT_STREAM)))
                draft_logps.append(logp_p)
        if not k:
            empty = drafter_logps[0].new_zeros(len(sample), 0, self.vocab)
            return sample.new_zeros(len(sample), 0), empty, drafter_logps
        return torch.stack(drafts, dim=1), torch.stack(draft_logps, dim=1), drafter_logps

    def _verify(self, caches, feed: _Feed, draft_ids: Tensor, drafter_logps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The verifying models score pending token + drafts in one forward each; pi_theta's and
        pi_t's log-probs at every position of the round, ``[n * (k + 1), V]`` each."""
        verified = {}
        for i in self.verifying:
            side = self.sides[i]
            ids = torch.cat([feed.pending[side].unsqueeze(-1), draft_ids], dim=1)
            verified[i] = caches[i].forward(self.models[i].model, ids, feed.positions[side], 0, feed.longest[side], self.vocab, every_query=True)
        logp_theta = verified[0] if 0 in verified else torch.stack(drafter_logps, dim=1)
        return logp_theta.flatten(0, 1), verified[1].flatten(0, 1)

    def _finish(self, result: SampleResult) -> SampleResult:
        text_ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
        result.text = self.target.tokenizer.decode(text_ids)
        return result


def check_draft_k(value: int | str) -> int:
    """A fixed draft length: an integer from 0 to :data:`MAX_DRAFT_K` (``auto`` is the caller's)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"draft_k must be an integer from 0 to {MAX_DRAFT_K} or auto, got {value!r}")
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"draft_k must be an integer from 0 to {MAX_DRAFT_K} or auto, got {value!r}") from None
    if not 0 <= k <= MAX_DRAFT_K:
        raise ValueError(f"draft_k must be an integer from 0 to {MAX_DRAFT_K} or auto, got {value!r}")
    return k


def refill_size(slots: int) -> int:
    """Free slots that trigger a refill: 1 up to 8 slots, then an eighth of them (prefill stays batched)."""
    return max(1, slots // 8)


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
class StreamStats:
    """What :meth:`DualModelSampler.stream` did: rounds computed, slot occupancy, tokens, prefills, drafts."""

    steps: int = 0  # rounds computed (a stretch of replayed samples alone is skipped)
    tokens: int = 0  # tokens of new (not replayed) samples
    prefills: int = 0  # prefill forwards, per model
    prompts_prefilled: int = 0  # prompts those forwards ran over (each prompt's responses share one)
    row_rounds: int = 0  # rounds of new samples, summed over rows: each is one verifying forward of the row
    drafted: int = 0  # drafts those rounds proposed
    tested: int = 0  # drafts put to the acceptance test (those up to a round's first rejection)
    accepted: int = 0  # drafts accepted

    def add(self, other: StreamStats) -> None:
        """Count ``other``'s work too (the streams of several replicas)."""
        for name, value in dataclasses.asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def utilisation(self, slots: int) -> float:
        """Rows running per round / slots (new samples' rounds; 1 when every slot always ran)."""
        return self.row_rounds / (self.steps * slots) if self.steps else 0.0

    def speculative(self) -> dict[str, float]:
        """Acceptance rate (per draft tested: an estimate of 1 - TV(p, q)), mean drafts accepted per
        round, and forwards per token of a speculative run."""
        return {
            "acceptance_rate": round(self.accepted / self.tested, 4) if self.tested else 0.0,
            "mean_accepted_length": round(self.accepted / self.row_rounds, 4) if self.row_rounds else 0.0,
            "verify_forwards_per_token": round(self.row_rounds / self.tokens, 4) if self.tokens else 0.0,
            "draft_forwards_per_token": round((self.drafted + self.row_rounds) / self.tokens, 4) if self.tokens else 0.0,
        }


@dataclass
class _Row:
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

    def record(self, draft_len: int, accepted: int, values: list[float], width: int, eos: set[int], stats: StreamStats) -> None:
        """Append a round's emitted tokens (``accepted`` drafts and one more, cut after an EOS)."""
        result = self.result
        emitted = 0
        for j in range(accepted + 1):
            token_values = values[j * width : (j + 1) * width]
            token = self.last_token = int(token_values[0])
            result.token_ids.append(token)
            result.per_token["token_id"].append(token)
            for name, value in zip(PER_TOKEN_FIELDS[1:], token_values[1:]):
                result.per_token[name].append(value)
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


@dataclass
class _Feed:
    """What a round feeds each side (0: pi_theta's prompt, 1: pi_t's): pending tokens ``[n]``, the
    positions of the k + 1 queries ``[n, k + 1]`` (-1 past a row's drafts), the forwards' width."""

    offsets: Tensor
    pending: dict[int, Tensor]
    positions: dict[int, Tensor]
    longest: dict[int, int]

    @classmethod
    def of(cls, rows: list[_Row], lengths: Tensor, k: int) -> _Feed:
        device = lengths.device
        offsets = torch.arange(k + 1, device=device)
        queries = offsets <= lengths.unsqueeze(-1)
        pending, positions, longest = {}, {}, {}
        for side in (0, 1):
            cached = [r.cached(side) for r in rows]
            pending[side] = torch.tensor([r.pending(side) for r in rows], device=device)
            positions[side] = torch.where(queries, torch.tensor(cached, device=device).unsqueeze(-1) + offsets, -1)
            longest[side] = max(cached) + k + 1
        return cls(offsets, pending, positions, longest)


class _Lookahead:
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
