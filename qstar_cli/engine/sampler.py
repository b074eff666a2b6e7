"""The dual-model sampler: two causal LMs, their slot KV caches, q* tokens for every running row per round.

``--batch-size N`` is N slots. A row's prompt is prefilled but its last token, which is *pending*:
each round feeds every running row's pending token to both models, each with its own
:class:`~qstar_cli.engine.slots.SlotCache`, takes log-softmax in float32 over the shared vocabulary, and
solves alpha, diagnoses and draws with the math core; the drawn token is the next pending one. One
host transfer per round carries the per-row results. A row that finishes (an EOS of either model,
its token budget, or a model's context) frees its slot, which the next requests take after one
batched prefill per model (continuous batching); ``static`` refills only an empty batch.

With ``draft_k`` > 0 (speculative q* sampling, docs/speculative.md) a round also feeds each row's drafts:
pi_theta (or a small draft pair) proposes them one forward at a time, the other model(s) score
pending token + drafts in one forward, and :func:`~qstar_cli.distributions.speculative.verify_drafts` keeps the
accepted ones and one more token, exactly distributed as q*. A row's rejected drafts are rolled
back by its length alone; other rows keep theirs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qstar_cli.errors import QstarRunError
from qstar_cli.distributions.mixture import AlphaMethod, check_alpha_method
from qstar_cli.engine.compiled import EAGER, compiled_forward, compiled_math, graphed, use_compile
from qstar_cli.engine.models import (
    LoadedModel,
    VocabularyMismatchError,
    check_shared_vocabulary,
    context_limit,
    eos_ids,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qstar_cli.engine.memory import PREFILL_CHUNK_TOKENS, SlotPlan, keep_freed_host_memory, plan_slots, prefill_chunk
from qstar_cli.engine.prompts import Messages, PromptFormat
from qstar_cli.engine.rows import VALUE_FIELDS, DeviceRows, FinishedRows, HostRows, RoundOutcome, to_device, to_host
from qstar_cli.engine.samples import SampleRequest, SampleResult, StreamStats
from qstar_cli.distributions.sampling import SamplingParams, counter_uniform, sample_tokens, sampling_logprobs
from qstar_cli.engine.scheduler import Row, SlotScheduler
from qstar_cli.engine.slots import SlotCache, check_versions, use_slot_attention
from qstar_cli.runfiles.format import per_token_fields
from qstar_cli.distributions.speculative import AUTO_MAX_DRAFT, auto_draft_len, check_draft_k, round_costs, verify_drafts

#: Uniform streams of the counter-based generator: drafts and acceptance tests (token draws: 0).
DRAFT_STREAM, ACCEPT_STREAM = 1, 2


class NonFiniteLogProbs(QstarRunError):
    """A model's log-probabilities are NaN: its samples would be the other model's alone."""


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
        compile: bool = False,
    ):
        check_versions()
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
        for loaded in self.models:
            use_slot_attention(loaded.model)
        if any(loaded.model.device.type == "cpu" for loaded in self.models):
            keep_freed_host_memory()
        self.theta_format = PromptFormat(theta_format, theta.tokenizer)
        self.t_format = PromptFormat(t_format, target.tokenizer)
        self.alpha_method, self.alpha = alpha_method, alpha
        check_alpha_method(alpha_method, alpha)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingParams()
        self.seed = seed
        #: Tokens one prefill forward takes at most (:func:`~qstar_cli.engine.memory.prefill_chunk`).
        self.prefill_tokens = PREFILL_CHUNK_TOKENS
        #: The round's mathematics, compiled (:mod:`qstar_cli.engine.compiled`) or eager.
        self.math = compiled_math() if compile else EAGER
        #: Each model's decode and verify forward when compiled (None: the model itself, eager).
        self.decoders = tuple(compiled_forward(m.model) if compile else None for m in self.models)
        self._round_costs: dict[int, np.ndarray] = {}
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
        compile: str = "off",
        **kwargs,
    ) -> DualModelSampler:
        """Load the models (hub id, local directory, ``.gguf`` file, or ``demo``) and build a sampler;
        ``draft_model_theta`` and ``draft_model_t`` name a draft pair for speculative sampling;
        ``compile`` is ``on``, ``off`` or ``auto`` (:func:`~qstar_cli.engine.compiled.use_compile`)."""
        # "meta" (the architecture without weights) is for a driver whose replicas sample elsewhere.
        dev = torch.device("meta") if device == "meta" else resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        loaded: dict[str, LoadedModel] = {}
        for spec in (model_theta, model_t, draft_model_theta, draft_model_t):
            if spec is not None and spec not in loaded:
                loaded[spec] = load_model(spec, dev, dt)
        pair = (loaded[draft_model_theta], loaded[draft_model_t]) if draft_model_theta and draft_model_t else None
        return cls(loaded[model_theta], loaded[model_t], draft_pair=pair, compile=use_compile(compile, dev), **kwargs)

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
        diagnostics: str = "full",
    ) -> list[SampleResult]:
        """One response per conversation; results in input order.

        ``sample_indices`` (default 0..n-1) key the counter-based randomness: the same index, seed and
        settings give the same response whatever else is in the batch (with ``draft_k="auto"``, one
        from the same distribution: the batch shares its draft lengths). ``prompt_ids`` are the
        ``encode_prompts`` of the conversations when the caller has them already. ``batch_size``
        slots (default: all conversations at once) are scheduled as in :meth:`stream`, which also
        says what ``diagnostics`` does.
        """
        if sample_indices is None:
            sample_indices = list(range(len(conversations)))
        prompts = prompt_ids if prompt_ids is not None else [self.encode_prompts(c) for c in conversations]
        requests = [SampleRequest(i, p_theta, p_t) for i, (p_theta, p_t) in zip(sample_indices, prompts)]
        results: list[SampleResult | None] = [None] * len(requests)
        for position, result in self.stream(requests, batch_size or max(len(requests), 1), scheduler, on_step, diagnostics=diagnostics):
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
        diagnostics: str = "full",
    ) -> Iterator[tuple[int, SampleResult]]:
        """Generate the requests on ``slots`` slots; yield ``(position, result)`` as samples finish.

        ``position`` is the request's index in ``requests``, which is read lazily. Each step is one
        round (one token per row, or with ``draft_k`` a row's drafts and the tokens accepted of
        them). After a round, :class:`~qstar_cli.engine.scheduler.SlotScheduler` (``scheduler``
        ``continuous`` or ``static``; ``max_waiting``, default ``32 * slots``) says which requests
        join; they are prefilled together, one forward per model.

        The schedule depends on the requests and the sampled rounds alone, never on timing, so a
        run that replays its already-written samples (``SampleRequest.replay_tokens`` and
        ``replay_rounds``) gives every other sample exactly the batches, slots and floats it had in
        the uninterrupted run. ``on_step(n)`` is called after each round with the tokens it
        produced; an exception it raises ends the stream.

        ``diagnostics`` (a level of :data:`~qstar_cli.runfiles.format.DIAGNOSTICS_LEVELS`) is the
        work asked for: at ``none`` the per-token diagnostics are neither computed nor brought to
        the host, and results keep only their token ids per token (the tokens are the same).
        """
        stats = stats if stats is not None else StreamStats()
        schedule = SlotScheduler(requests, slots, scheduler, max_waiting or 32 * slots, self._admit)
        caches = tuple(
            SlotCache(m.model.config, slots, 1, compiled=d is not None, bucketed=d is not None and graphed(m.model))
            for m, d in zip(self.models, self.decoders)
        )
        state = DeviceRows(slots, self.theta.model.device, self.eos, len(per_token_fields(diagnostics)) - 1)
        host, outbox = schedule.host, []  # outbox: the last round's finished rows, their values on the way
        try:
            while True:
                if group := schedule.next_group():
                    start = len(schedule.rows)
                    state.admit(start, schedule.place(self._prefill(caches, schedule.rows, group, stats)))
                    state.ensure_columns(host.columns)
                rows = schedule.rows
                if not rows:
                    break
                if schedule.replayed_only():
                    finished, produced = schedule.jump(), None
                    state.set_steps(host, len(rows))
                else:
                    finished, produced = self._round(caches, state, schedule, stats)
                ready, outbox = outbox, []  # the round's transfer waited for their copies
                yield from self._deliver(ready)
                outbox = FinishedRows.collect(state, schedule, finished)
                if on_step is not None and produced is not None:
                    on_step(produced)
                src, dst = schedule.remove(finished)
                for s_, d_, cached in zip(src, dst, host.cached(len(schedule.rows))[dst]):
                    for cache, side in zip(caches, self.sides):
                        cache.move(s_, d_, int(cached[side]))
                if src:
                    state.move(src, dst)
        except (Exception, KeyboardInterrupt):
            ready, outbox = outbox, []
            yield from self._deliver(ready)  # samples that finished are not lost to a stop or an error
            raise
        yield from self._deliver(outbox)

    def plan_slots(self, prompt_ids: list[tuple[list[int], list[int]]], memory_fraction: float, samples: int) -> SlotPlan:
        """The slots that fit the free memory beside the loaded models (``--batch-size auto``,
        :func:`~qstar_cli.engine.memory.plan_slots`) for these prompts' sequences."""
        longest = tuple(max(len(ids[side]) + self.token_budget(*ids) for ids in prompt_ids) for side in (0, 1))
        prompts = tuple(max(len(ids[side]) for ids in prompt_ids) for side in (0, 1))
        models = [m.model for m in self.models]
        return plan_slots(
            models, list(self.sides), longest, prompts, self.vocab, self.draft_k, memory_fraction, samples, prefill_tokens=self.prefill_tokens
        )

    def round_costs(self, rows: int) -> np.ndarray:
        """Cost of a round of ``k = 0..AUTO_MAX_DRAFT`` drafts for ``rows`` rows (:func:`round_costs`),
        for ``--draft-k auto``: constants of the models and device, never timings, so that the
        rounds (and the samples) do not depend on timing. Kept per sampler (a cache on the method
        would keep every sampler, and its models, alive)."""
        if rows not in self._round_costs:
            size = [sum(p.numel() for p in m.model.parameters()) for m in self.models]
            self._round_costs[rows] = round_costs(
                sum(size[i] for i in self.sequential), sum(size[i] for i in self.verifying), rows, self.theta.model.device.type
            )
        return self._round_costs[rows]

    def _draft_lengths(self, host: HostRows, n: int) -> np.ndarray:
        """Drafts each row makes this round: ``draft_k`` (or the auto policy's choice for the batch,
        or a replayed row's recorded one), never more than leave room for the round's last token."""
        room, k = host.room(n), self.draft_k
        if self.auto_draft:
            k = auto_draft_len(host.accepted[:n].astype(np.float64), host.tested[:n].astype(np.float64), room, self.round_costs(n))
        return np.where(host.new[:n], np.minimum(k, room), host.script(n)[0])

    def _admit(self, position: int, request: SampleRequest) -> Row:
        budget = self.token_budget(request.prompt_ids_theta, request.prompt_ids_t)
        if request.replay_tokens is not None:
            # The budget it had (which --draft-k auto reads); it ends where it ended.
            return Row(position, request, budget, None, request.replay_rounds)
        if budget < 1:
            raise ValueError(f"a prompt fills a model's context ({self.context_limits} tokens); it has no room for a response")
        result = SampleResult(request.sample_idx, "", [], request.prompt_ids_theta, request.prompt_ids_t, "length", {}, request.response_idx)
        if self.draft_k:
            result.draft_lengths, result.round_tokens = [], []
        return Row(position, request, budget, result)

    def _prefill(self, caches, rows: list[Row], group: list[Row], stats: StreamStats) -> list[Row]:
        """Prefill ``group`` into the slots after ``rows``: left-padded forwards per model over its
        distinct prompts but their last token (fed with the first round), whose caches are then
        copied to their other responses. Returns the group in slot order (distinct prompts first).

        Each forward takes at most :attr:`prefill_tokens` tokens (:func:`prefill_chunk`: as many whole
        prompts as fit, else a prompt's columns a chunk at a time, each chunk attending to the
        columns cached before it), so its working memory is what ``--batch-size auto`` reserved.
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
            # Left-padded: the tokens and their positions (-1: padding), one copy to the device.
            table = np.stack([np.full((len(ids), side_width), self._pad_id(loaded)), np.full((len(ids), side_width), -1)])
            for i, prompt in enumerate(ids):
                if prompt:
                    table[:, i, -len(prompt) :] = prompt, np.arange(len(prompt))
            tokens, positions = to_device(table, loaded.model.device)
            chunk_rows, chunk_columns = prefill_chunk(len(ids), side_width, self.prefill_tokens)
            for r in range(0, len(ids), chunk_rows):
                # These rows' own width: their longest prompt's columns, the last of the table's.
                chunk_width = max(len(prompt) for prompt in ids[r : r + chunk_rows])
                padding = side_width - chunk_width
                for c in range(padding, side_width, chunk_columns):
                    block = slice(r, r + chunk_rows), slice(c, c + chunk_columns)
                    # The longest of these prompts has position column - padding.
                    longest = min(c + chunk_columns, side_width) - padding
                    cache.forward(loaded.model, tokens[block], positions[block], start + r, longest, self.vocab)
            for j, i in enumerate(origin):
                cache.move(start + i, start + len(distinct) + j, len(ids[i]))
        stats.prefills += 1
        stats.prompts_prefilled += len(distinct)
        return group

    def _mixture(self, logp_theta: Tensor, logp_t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, log q)`` of two models' log-probs under this sampler's alpha method."""
        alpha = self.math.solve_alpha(logp_theta, logp_t, method=self.alpha_method, alpha=self.alpha)
        return alpha, self.math.mixture_logprobs(logp_theta, logp_t, alpha)

    def _round(self, caches, state: DeviceRows, schedule: SlotScheduler, stats: StreamStats) -> tuple[list[int], int]:
        """One round for the ``n`` running rows: draft, verify, accept, advance; the rows that
        finished and the tokens new rows emitted.

        Each row feeds its pending token (the last one emitted, or its prompt's last) and its
        drafts (:meth:`_draft`), which the verifying models score in one forward (:meth:`_verify`).
        q is solved at every position and :func:`verify_drafts` keeps each row's accepted drafts
        plus one token (:meth:`_accept`); the cache columns of rejected drafts are simply
        overwritten by the row's next round. The rows advance on the device, and one block comes
        to the host (:mod:`qstar_cli.engine.rows`); the emitted tokens' diagnostics follow it.
        """
        host, n = schedule.host, len(schedule.rows)
        draft_len = self._draft_lengths(host, n)
        k = int(draft_len.max())
        device = state.state.device
        if k:  # a replayed row's rounds are forced to go as they went
            lengths, forced = to_device(np.stack([draft_len, host.script(n)[1]]), device)
        else:
            lengths, forced = torch.zeros(n, dtype=torch.long, device=device), None
        pending, positions = state.feed(n, lengths if k else None, k)
        feed = _Feed(pending, positions, (host.cached(n).max(0) + k + 1).tolist())
        sample, step = state.key[:n], state.step[:n]
        draft_ids, logp_p, drafter_logps = self._draft(caches, feed, sample, step, k)
        logp_theta, logp_t = self._verify(caches, feed, draft_ids, drafter_logps)
        tokens, accepted, columns, logp_q = self._accept(logp_theta, logp_t, logp_p, draft_ids, lengths, sample, step)
        nan = self._nan_rows(columns, accepted, logp_p, lengths)
        outcome = host.advance(to_host(state.advance(tokens, accepted, forced, nan)), draft_len)
        if outcome.nan.any():
            raise NonFiniteLogProbs(self._nan_message(schedule.rows, outcome, host))
        stats.steps += 1
        for name in ("tokens", "row_rounds", "drafted", "tested", "accepted"):
            setattr(stats, name, getattr(stats, name) + getattr(outcome, name))
        if state.values is not None:  # the emitted tokens' alone: no rejected draft, no padded query
            query, flat = to_device(outcome.destinations, device)
            if len(query) == len(logp_t):  # every position emits (plain rounds): no copy
                query = slice(None)
            diagnostics = self.math.token_diagnostics(logp_theta[query], logp_t[query], logp_q[query])
            state.record(flat, torch.stack([*(columns[f][query] for f in VALUE_FIELDS[:4]), *(diagnostics[f] for f in VALUE_FIELDS[4:])], dim=-1))
        return outcome.finished, outcome.tokens

    def _accept(self, logp_theta, logp_t, logp_p, draft_ids, lengths, sample, step) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """q at every position, the accepted drafts and the round's last token: the tokens ``[n, k +
        1]`` (accepted drafts, then the last token), the drafts accepted per row, alpha and the three
        log-probs of each position's token (``[n * (k + 1)]``), and log q untempered."""
        n, k = draft_ids.shape
        alpha, logp_q = self._mixture(logp_theta, logp_t)  # [n * (k + 1), V]
        logp_r = sampling_logprobs(logp_q, self.sampling)
        offsets = torch.arange(k, device=step.device)
        u_accept = counter_uniform(self.seed, sample.unsqueeze(-1).expand(n, k), step.unsqueeze(-1) + offsets, ACCEPT_STREAM)
        accepted, logp_last = verify_drafts(logp_r.view(n, k + 1, -1), logp_p, draft_ids, lengths, u_accept)
        # The round's last token is keyed by its position, stream 0: without drafts, plain sampling's draw.
        last = sample_tokens(logp_last, counter_uniform(self.seed, sample, step + accepted))
        tokens = torch.cat([draft_ids, last.unsqueeze(-1)], dim=1).scatter_(1, accepted.unsqueeze(-1), last.unsqueeze(-1))
        picked = tokens.view(-1, 1)
        columns = {"alpha": alpha, **{f: logp.gather(-1, picked).squeeze(-1) for f, logp in zip(VALUE_FIELDS[1:4], (logp_theta, logp_t, logp_r))}}
        return tokens, accepted, columns, logp_q

    def _nan_rows(self, columns: dict[str, Tensor], accepted: Tensor, logp_p: Tensor, lengths: Tensor) -> Tensor:
        """``[n, 2]``: whether pi_theta's (or the draft pair's), and pi_t's, log-probs are NaN at a
        token the row emits. A NaN would silently make q the other model alone: never recorded."""
        n = len(accepted)
        offsets = torch.arange(len(columns["alpha"]) // n, device=accepted.device)
        emitted = (offsets <= accepted.unsqueeze(-1)).flatten()
        nan = torch.stack([columns[f].isnan() & emitted for f in ("logp_theta", "logp_t")], dim=-1).view(n, -1, 2).any(1)
        if len(self.sequential) > 1:  # the draft pair's own NaN would skew the residual a rejection draws from
            drafted = offsets[: logp_p.shape[1]] < lengths.unsqueeze(-1)
            nan[:, 0] |= (logp_p.isnan().any(-1) & drafted).any(-1)
        return nan

    def _nan_message(self, rows: list[Row], outcome: RoundOutcome, host: HostRows) -> str:
        """Which model gave NaN log-probabilities, for which samples of the round."""
        bad = np.nonzero(outcome.nan.any(-1))[0]
        theta = "pi_theta or the draft pair" if len(self.sequential) > 1 else "pi_theta"
        roles = " and ".join(
            f"{role} ({model.name})" for role, model, j in ((theta, self.theta, 0), ("pi_t", self.target, 1)) if outcome.nan[:, j].any()
        )
        row = rows[bad[0]]
        return (
            f"{roles} gave NaN log-probabilities in {len(bad)} of the round's {len(rows)} rows (first: sample "
            f"{row.request.sample_idx} response {row.request.response_idx}, token {host.produced[bad[0]] - outcome.emitted[bad[0]]}); "
            "no such token is written. The checkpoint may be damaged, or float16 may overflow (try --dtype float32 or bfloat16)"
        )

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
                out.append(caches[i].forward(self.models[i].model, fed.unsqueeze(-1), positions, 0, feed.longest[side], self.vocab, run=self.decoders[i]))
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
            verified[i] = caches[i].forward(
                self.models[i].model, ids, feed.positions[side], 0, feed.longest[side], self.vocab, every_query=True, run=self.decoders[i]
            )
        logp_theta = verified[0] if 0 in verified else torch.stack(drafter_logps, dim=1)
        return logp_theta.flatten(0, 1), verified[1].flatten(0, 1)

    def _deliver(self, outbox: list[FinishedRows]) -> Iterator[tuple[int, SampleResult]]:
        for finished in outbox:
            for position, result in finished.results():
                text_ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
                result.text = self.target.tokenizer.decode(text_ids)
                yield position, result


@dataclass
class _Feed:
    """What a round feeds each side (0: pi_theta's prompt, 1: pi_t's): pending tokens ``[2, n]``, the
    positions of the k + 1 queries ``[2, n, k + 1]`` (-1 past a row's drafts), the forwards' width."""

    pending: Tensor
    positions: Tensor
    longest: list[int]
