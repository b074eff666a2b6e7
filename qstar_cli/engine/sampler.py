"""The dual-model sampler: two causal LMs, their slot KV caches, q* tokens for every running row per round.

``--batch-size N`` is N slots. A row's prompt is prefilled but its last token, which is *pending*
(:mod:`~qstar_cli.engine.prefill`). Each round (:meth:`DualModelSampler._round`, whose docstring
numbers its steps) feeds every running row's pending token to both models, each with its own
:class:`~qstar_cli.engine.slots.SlotCache`, takes log-softmax in float32 over the shared vocabulary,
solves alpha and q with the math core, and chooses the tokens
(:func:`~qstar_cli.distributions.token_choice.choose_tokens`); the last one is the next pending
token. One host transfer per round carries the per-row results. A row that finishes (an EOS of
either model, its token budget, or a model's context) frees its slot, which the next requests take
after one batched prefill per model (continuous batching); ``static`` refills only an empty batch.

The models play named roles (:mod:`~qstar_cli.engine.roles`). With ``draft_k`` > 0 (speculative q*
sampling, docs/speculative.md) the *drafter*, pi_theta or a small draft pair, proposes each row's
drafts one forward at a time, and the *scorers* (pi_t, and pi_theta when a pair drafts) score
pending token + drafts in one forward; the accepted drafts and one more token are exactly
distributed as q*. A row's rejected drafts are rolled back by its length alone; other rows keep theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qstar_cli.distributions.mixture import AlphaMethod, check_alpha_method
from qstar_cli.distributions.sampling import SamplingParams
from qstar_cli.distributions.speculative import AUTO_MAX_DRAFT, auto_draft_len, check_draft_k, round_costs
from qstar_cli.distributions.token_choice import TokenChoice, check_teacher_topk, choose_tokens, draw_drafts, teacher_topk
from qstar_cli.engine.architectures import check_architecture
from qstar_cli.engine.compiled import EAGER, compiled_forward, compiled_math, graphed, use_compile
from qstar_cli.engine.cpu_linears import prepack_linears, repack_linears
from qstar_cli.engine.memory import PREFILL_CHUNK_TOKENS, SlotPlan, keep_freed_host_memory, plan_slots
from qstar_cli.engine.models import (
    LoadedModel,
    check_draft_pair,
    check_shared_vocabulary,
    context_limit,
    eos_ids,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qstar_cli.engine.prefill import prefill
from qstar_cli.engine.prompts import Messages, PromptFormat
from qstar_cli.engine.roles import DRAFT_PAIR, PLAIN_SCORERS, Role, RoleModel, Side, run_roles
from qstar_cli.engine.rows import DeviceRows, FinishedRows, HostRows, RoundFeed, RoundOutcome, to_device, to_host
from qstar_cli.engine.samples import SampleRequest, SampleResult, StreamStats
from qstar_cli.engine.scheduler import Row, SlotScheduler
from qstar_cli.engine.slots import SlotCache, check_versions, use_slot_attention
from qstar_cli.errors import QstarRunError
from qstar_cli.runfiles.format import SUMMARY_FIELDS, per_token_fields


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
        teacher_topk: int = 0,
    ):
        check_versions()
        self.theta, self.target = theta, target
        self.vocab = check_shared_vocabulary(theta, target)
        #: Drafts per row per round (0: plain sampling; "auto": chosen per row, up to AUTO_MAX_DRAFT).
        self.auto_draft = draft_k == "auto"
        self.draft_k = AUTO_MAX_DRAFT if self.auto_draft else check_draft_k(draft_k)
        #: Whether a draft pair drafts (else pi_theta drafts for itself).
        self.pair_drafts = draft_pair is not None
        if draft_pair is not None:
            check_draft_pair(draft_pair, (theta, target), self.vocab)
        models = dict(zip(run_roles(self.pair_drafts), (theta, target, *(draft_pair or ()))))
        _prepare_models(tuple(models.values()))
        #: Every model by its role, with its compiled forward when compiled.
        self.roles = {role: RoleModel(role, m, compiled_forward(m.model) if compile else None) for role, m in models.items()}
        #: The drafters propose drafts a forward at a time; the scorers score a round's pending token
        #: and drafts in one forward each. pi_theta drafts for itself, so its drafting forwards are
        #: its scores; a draft pair drafts from its own mixture, and pi_theta scores.
        self.drafters: tuple[Role, ...] = DRAFT_PAIR if self.pair_drafts else (Role.THETA,)
        self.scorers: tuple[Role, ...] = PLAIN_SCORERS if self.pair_drafts else (Role.T,)
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
        self._round_costs: dict[int, np.ndarray] = {}
        self.eos = {i for i in eos_ids(theta, target) if i < self.vocab}
        #: pi_t's top-K kept at each emitted token (0: none; :class:`~qstar_cli.runfiles.format.TeacherTopK`).
        self.teacher_topk = check_teacher_topk(teacher_topk, self.vocab)
        #: Per side: the most tokens, prompt and response, the models reading it take, draft models
        #: included (None: no limit known).
        self.context_limits = tuple(
            min((limit for r in self.roles.values() if r.side == side if (limit := context_limit(r.loaded)) is not None), default=None)
            for side in Side
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

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[Messages],
        sample_indices: list[int] | None = None,
        prompt_ids: list[tuple[list[int], list[int]]] | None = None,
        on_round: Callable[[int], None] | None = None,
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
        for position, result in self.stream(requests, batch_size or max(len(requests), 1), scheduler, on_round, diagnostics=diagnostics):
            results[position] = result
        return results

    @torch.inference_mode()
    def stream(
        self,
        requests: Iterable[SampleRequest],
        slots: int = 8,
        scheduler: str = "continuous",
        on_round: Callable[[int], None] | None = None,
        max_waiting: int | None = None,
        stats: StreamStats | None = None,
        diagnostics: str = "full",
    ) -> Iterator[tuple[int, SampleResult]]:
        """Generate the requests on ``slots`` slots; yield ``(position, result)`` as samples finish.

        ``position`` is the request's index in ``requests``, which is read lazily. The stream goes
        in rounds (one token per row, or with ``draft_k`` a row's drafts and the tokens accepted of
        them). After a round, :class:`~qstar_cli.engine.scheduler.SlotScheduler` (``scheduler``
        ``continuous`` or ``static``; ``max_waiting``, default ``32 * slots``) says which requests
        join; they are prefilled together, one forward per model.

        The schedule depends on the requests and the sampled rounds alone, never on timing, so a
        run that replays its already-written samples (``SampleRequest.replay_tokens`` and
        ``replay_rounds``) gives every other sample exactly the batches, slots and floats it had in
        the uninterrupted run. ``on_round(n)`` is called after each round with the tokens it
        produced; an exception it raises ends the stream.

        ``diagnostics`` (a level of :data:`~qstar_cli.runfiles.format.DIAGNOSTICS_LEVELS`) is the
        work asked for: at ``none`` the per-token diagnostics are neither computed nor brought to
        the host, and results keep only their token ids per token (the tokens are the same).
        """
        stats = stats if stats is not None else StreamStats()
        for r in self.roles.values():
            repack_linears(r.model)  # its weights as they are now
        schedule = SlotScheduler(requests, slots, scheduler, max_waiting or 32 * slots, self._admit)
        caches = {
            r.role: SlotCache(
                r.model.config, slots, 1, compiled=r.compiled is not None, bucketed=r.compiled is not None and graphed(r.model)
            )
            for r in self.roles.values()
        }
        if self.teacher_topk and diagnostics != "full":
            raise ValueError(f"teacher_topk is kept in the sidecar's per-token arrays: it needs diagnostics full, not {diagnostics}")
        state = DeviceRows(slots, self.theta.model.device, self.eos, len(per_token_fields(diagnostics)) - 1, self.teacher_topk)
        outbox: list[FinishedRows] = []  # the last round's finished rows, their values on the way
        try:
            while True:
                if group := schedule.next_group():
                    self._admit_group(caches, state, schedule, group, stats)
                if not schedule.rows:
                    break
                if schedule.replayed_only():
                    finished, new_tokens = schedule.jump(), None
                    state.set_produced(schedule.host, len(schedule.rows))
                else:
                    finished, new_tokens = self._round(caches, state, schedule, stats)
                ready, outbox = outbox, []  # the round's transfer waited for their copies
                yield from self._deliver(ready)
                outbox = FinishedRows.collect(state, schedule, finished)
                if on_round is not None and new_tokens is not None:
                    on_round(new_tokens)
                self._free_slots(caches, state, schedule, finished)
        except (Exception, KeyboardInterrupt):
            ready, outbox = outbox, []
            yield from self._deliver(ready)  # samples that finished are not lost to a stop or an error
            raise
        yield from self._deliver(outbox)

    def _admit_group(
        self, caches: dict[Role, SlotCache], state: DeviceRows, schedule: SlotScheduler, group: list[Row], stats: StreamStats
    ) -> None:
        """Prefill ``group`` into the slots after the running rows and start their state."""
        start = len(schedule.rows)
        rows = prefill(caches, self.roles.values(), schedule.rows, group, self.vocab, self.prefill_tokens, stats)
        state.admit(start, schedule.place(rows))
        state.ensure_columns(schedule.host.columns)

    def _free_slots(self, caches: dict[Role, SlotCache], state: DeviceRows, schedule: SlotScheduler, finished: list[int]) -> None:
        """Remove the finished rows; the rows the schedule moves to keep the running ones packed take
        their caches and state with them."""
        src, dst = schedule.remove(finished)
        for s_, d_, cached in zip(src, dst, schedule.host.cached(len(schedule.rows))[dst]):
            for r in self.roles.values():
                caches[r.role].move(s_, d_, int(cached[r.side]))
        if src:
            state.move(src, dst)

    def plan_slots(self, prompt_ids: list[tuple[list[int], list[int]]], memory_fraction: float, samples: int) -> SlotPlan:
        """The slots that fit the free memory beside the loaded models (``--batch-size auto``,
        :func:`~qstar_cli.engine.memory.plan_slots`) for these prompts' sequences."""
        longest = tuple(max(len(ids[side]) + self.token_budget(*ids) for ids in prompt_ids) for side in Side)
        prompts = tuple(max(len(ids[side]) for ids in prompt_ids) for side in Side)
        return plan_slots(
            [r.model for r in self.roles.values()],
            [r.side for r in self.roles.values()],
            longest,
            prompts,
            self.vocab,
            self.draft_k,
            memory_fraction,
            samples,
            prefill_tokens=self.prefill_tokens,
        )

    def round_costs(self, rows: int) -> np.ndarray:
        """Cost of a round of ``k = 0..AUTO_MAX_DRAFT`` drafts for ``rows`` rows (:func:`round_costs`),
        for ``--draft-k auto``: constants of the models and device, never timings, so that the
        rounds (and the samples) do not depend on timing. Kept per sampler (a cache on the method
        would keep every sampler, and its models, alive)."""
        if rows not in self._round_costs:
            drafters, scorers = (
                sum(p.numel() for r in roles for p in self.roles[r].model.parameters()) for roles in (self.drafters, self.scorers)
            )
            self._round_costs[rows] = round_costs(drafters, scorers, rows, self.theta.model.device.type)
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
        result = SampleResult(
            request.sample_idx, "", [], request.prompt_ids_theta, request.prompt_ids_t, "length", {}, request.response_idx
        )
        if self.draft_k:
            result.draft_lengths, result.round_tokens = [], []
        return Row(position, request, budget, result)

    def _round(
        self, caches: dict[Role, SlotCache], state: DeviceRows, schedule: SlotScheduler, stats: StreamStats
    ) -> tuple[list[int], int]:
        """One round for the ``n`` running rows; the rows that finished and the tokens new rows emitted.

        1. **Feed**: each row's pending token (the last one emitted, or its prompt's last) and the
           positions of its ``k + 1`` queries, ``k`` its drafts this round (:meth:`_feed`).
        2. **Drafter forwards**: the drafter (pi_theta, or the draft pair's mixture) takes the pending
           tokens and then each draft it draws, a forward each (:meth:`_draft`; none in a plain round).
        3. **Scoring forwards**: each scorer takes the pending tokens and drafts in one forward, its
           log-probs at every query (:meth:`_score`).
        4. **Alpha and q** at every position (:meth:`_mixture`).
        5. **Accept and draw**: each row's accepted drafts and one more token, exactly distributed as
           q* (:func:`~qstar_cli.distributions.token_choice.choose_tokens`). A rejected draft's cache
           columns are simply overwritten by the row's next round.
        6. **Advance on the device**: tokens emitted (cut after an EOS), cached lengths, pending tokens.
        7. **The one transfer**: one int32 block to the host (:mod:`qstar_cli.engine.rows`), whose counts advance.
        8. **Record** the emitted tokens' per-token values, and pi_t's top-K, on the device (:meth:`_record`).
        """
        host, n = schedule.host, len(schedule.rows)
        feed = self._feed(state, host, n)
        drafts = self._draft(caches, feed)
        logp_theta, logp_t = self._score(caches, feed, drafts)
        alpha, logp_q = self._mixture(logp_theta, logp_t)
        choice = choose_tokens(
            logp_theta, logp_t, logp_q, drafts.token_ids, drafts.logp, feed.draft_len, feed.counter_key, feed.produced, self.seed, self.sampling,
            pair_drafts=self.pair_drafts,
        )  # fmt: skip
        block = state.advance(choice.token_ids, choice.accepted, feed.forced, choice.nan)
        outcome = host.advance(to_host(block), feed.draft_len_host)
        if outcome.nan.any():
            raise NonFiniteLogProbs(self._nan_message(schedule.rows, outcome, host))
        stats.count_round(outcome)
        if state.values is not None:
            self._record(state, outcome, alpha, choice, logp_theta, logp_t, logp_q)
        return outcome.finished, outcome.new_tokens

    def _feed(self, state: DeviceRows, host: HostRows, n: int) -> RoundFeed:
        """Step 1: the round's draft lengths and each side's queries."""
        draft_len_host = self._draft_lengths(host, n)
        k = int(draft_len_host.max())
        device = state.table.device
        if k:  # a replayed row's rounds are forced to go as they went
            draft_len, forced = to_device(np.stack([draft_len_host, host.script(n)[1]]), device)
        else:
            draft_len, forced = torch.zeros(n, dtype=torch.long, device=device), None
        pending, positions = state.feed(n, draft_len if k else None, k)
        return RoundFeed(
            k=k,
            draft_len_host=draft_len_host,
            draft_len=draft_len,
            forced=forced,
            pending=pending,
            positions=positions,
            longest=(host.cached(n).max(0) + k + 1).tolist(),
            counter_key=state.counter_key[:n],
            produced=state.produced[:n],
        )

    def _forward(self, caches: dict[Role, SlotCache], role: RoleModel, feed: RoundFeed, token_ids: Tensor, queries: slice) -> Tensor:
        """``role``'s forward over ``token_ids`` ``[n, q]`` at the feed's ``queries``; log-probs ``[n, q, V]``."""
        side = role.side
        return caches[role.role].forward(
            role.model, token_ids, feed.positions[side][:, queries], 0, feed.longest[side], self.vocab, every_query=True, run=role.compiled
        )

    def _draft(self, caches: dict[Role, SlotCache], feed: RoundFeed) -> Drafts:
        """Step 2: the drafter takes the pending tokens, then each draft, one forward at a time; after
        each forward but the last a draft is drawn from the drafter's distribution (pi_theta's, or
        the draft pair's mixture q'), tempered and truncated as q is. The last forward caches the
        last draft. A plain round (no drafts, pi_theta drafting) has no drafter forward: pi_theta
        scores."""
        n, k = len(feed.counter_key), feed.k
        no_drafts = feed.counter_key.new_zeros(n, 0), torch.empty(n, 0, self.vocab, device=feed.counter_key.device)
        if not k and not self.pair_drafts:
            return Drafts(*no_drafts, None)
        drafts, logp_drafts, drafter_logps = [], [], []
        fed = feed.pending
        for j in range(k + 1):
            out = [self._forward(caches, self.roles[r], feed, fed[r.side].unsqueeze(-1), slice(j, j + 1))[:, 0] for r in self.drafters]
            drafter_logps.append(out[0] if len(out) == 1 else self._mixture(*out)[1])
            if j < k:
                draft, logp_p = draw_drafts(drafter_logps[-1], self.sampling, self.seed, feed.counter_key, feed.produced + j)
                drafts.append(draft)
                logp_drafts.append(logp_p)
                fed = draft.expand(2, n)  # both sides take the draft
        token_ids, logp = (torch.stack(drafts, dim=1), torch.stack(logp_drafts, dim=1)) if k else no_drafts
        return Drafts(token_ids, logp, torch.stack(drafter_logps, dim=1))

    def _score(self, caches: dict[Role, SlotCache], feed: RoundFeed, drafts: Drafts) -> tuple[Tensor, Tensor]:
        """Step 3: each scorer takes the pending token and the drafts in one forward; pi_theta's and
        pi_t's log-probs at every position of the round, ``[n * (k + 1), V]`` each (pi_theta's are
        its drafting forwards' when it drafts)."""
        scorers = self.scorers if drafts.drafter_logps is not None else PLAIN_SCORERS
        scores = {
            role: self._forward(
                caches, self.roles[role], feed, torch.cat([feed.pending[role.side].unsqueeze(-1), drafts.token_ids], dim=1), slice(None)
            )
            for role in scorers
        }
        logp_theta = scores[Role.THETA] if Role.THETA in scores else drafts.drafter_logps
        return logp_theta.flatten(0, 1), scores[Role.T].flatten(0, 1)

    def _mixture(self, logp_theta: Tensor, logp_t: Tensor) -> tuple[Tensor, Tensor]:
        """Step 4: ``(alpha, log q)`` of two models' log-probs under this sampler's alpha method."""
        alpha = self.math.solve_alpha(logp_theta, logp_t, method=self.alpha_method, alpha=self.alpha)
        return alpha, self.math.mixture_logprobs(logp_theta, logp_t, alpha)

    def _record(
        self,
        state: DeviceRows,
        outcome: RoundOutcome,
        alpha: Tensor,
        choice: TokenChoice,
        logp_theta: Tensor,
        logp_t: Tensor,
        logp_q: Tensor,
    ) -> None:
        """Step 8: the emitted tokens' values (no rejected draft's, no padded query's) into the rows'
        per-token values, in :data:`SUMMARY_FIELDS` order, then pi_t's top-K (:func:`teacher_topk`).
        The sidecar's ``logp_q`` is the token's log-probability under the distribution it was drawn
        from; the diagnostics are of the untempered q."""
        query, destinations = to_device(outcome.destinations, state.table.device)
        if len(query) == len(logp_t):  # every position emits (plain rounds): no copy
            query = slice(None)
        values = {"alpha": alpha, "logp_theta": choice.logp_theta, "logp_t": choice.logp_t, "logp_q": choice.logp_drawn}
        values = {name: value[query] for name, value in values.items()}
        values.update(self.math.token_diagnostics(logp_theta[query], logp_t[query], logp_q[query]))
        columns = torch.stack([values[name] for name in SUMMARY_FIELDS], dim=-1)
        state.record(destinations, columns, teacher_topk(logp_t[query], self.teacher_topk) if self.teacher_topk else None)

    def _nan_message(self, rows: list[Row], outcome: RoundOutcome, host: HostRows) -> str:
        """Which model gave NaN log-probabilities, for which samples of the round."""
        bad = np.nonzero(outcome.nan.any(-1))[0]
        names = {
            Side.THETA: f"pi_theta{' or the draft pair' if self.pair_drafts else ''} ({self.theta.name})",
            Side.T: f"pi_t ({self.target.name})",
        }
        roles = " and ".join(name for side, name in names.items() if outcome.nan[:, side].any())
        row = rows[bad[0]]
        return (
            f"{roles} gave NaN log-probabilities in {len(bad)} of the round's {len(rows)} rows (first: sample "
            f"{row.request.sample_idx} response {row.request.response_idx}, token {host.produced[bad[0]] - outcome.emitted[bad[0]]}); "
            "no such token is written. The checkpoint may be damaged, or float16 may overflow (try --dtype float32 or bfloat16)"
        )

    def _deliver(self, outbox: list[FinishedRows]) -> Iterator[tuple[int, SampleResult]]:
        for finished in outbox:
            for position, result in finished.results():
                text_ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
                result.text = self.target.tokenizer.decode(text_ids)
                yield position, result


@dataclass(frozen=True)
class Drafts:
    """A round's drafts (step 2)."""

    token_ids: Tensor  # [n, k]
    logp: Tensor  # [n, k, V] the tempered log p each was drawn from
    drafter_logps: Tensor | None  # [n, k + 1, V] the drafter's untempered log-probs (None: no drafter forward)


def _prepare_models(models: tuple[LoadedModel, ...]) -> None:
    """Each model refused unless the slot cache serves it exactly (:func:`check_architecture`), then
    the changes beyond the sampler, made once it is built: every model's attention goes through its
    slot cache and, on a CPU, its linear layers through oneDNN with packed weights
    (:func:`prepack_linears`; the models' own modules change: they are this sampler's now), and with
    a model on the CPU the process's allocator keeps freed memory for the next round (process-wide)."""
    for loaded in models:
        check_architecture(loaded.model.config, loaded.name, type(loaded.model))
        use_slot_attention(loaded.model)
        if loaded.model.device.type == "cpu":
            prepack_linears(loaded.model)
    if any(loaded.model.device.type == "cpu" for loaded in models):
        keep_freed_host_memory()
