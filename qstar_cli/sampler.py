"""The dual-model sampler: two causal LMs, two slot KV caches, one q* token per running row per step.

``--batch-size N`` is N slots. Per step, for the running rows: one forward of each model over each
row's last token with its own :class:`~qstar_cli.slots.SlotCache`, log-softmax in float32 over the
shared vocabulary, alpha / diagnostics / draw from the math core, and a single host transfer of the
step's per-row results. A row that finishes (an EOS of either model, its token budget, or a model's
context) frees its slot, which the next requests take after one batched prefill per model
(continuous batching); ``static`` refills only an empty batch, as fixed batches would.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

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
    check_shared_vocabulary,
    context_limit,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qstar_cli.prompts import Messages, PromptFormat
from qstar_cli.sampling import SamplingParams, draw, sample_key
from qstar_cli.slots import SlotCache

SCHEDULERS: tuple[str, ...] = ("continuous", "static")

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
    ):
        self.theta, self.target = theta, target
        self.vocab = check_shared_vocabulary(theta, target)
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
        #: (pi_theta, pi_t): the most tokens, prompt and response, each model takes (None: no limit known).
        self.context_limits = (context_limit(theta), context_limit(target))

    @classmethod
    def from_pretrained(
        cls, model_theta: str, model_t: str, device: str = "auto", dtype: str = "auto", **kwargs
    ) -> DualModelSampler:
        """Load both models (hub id, local directory, ``.gguf`` file, or ``demo``) and build a sampler."""
        # "meta" (the architecture without weights) is for a driver whose replicas sample elsewhere.
        dev = torch.device("meta") if device == "meta" else resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        theta = load_model(model_theta, dev, dt)
        target = theta if model_t == model_theta else load_model(model_t, dev, dt)
        return cls(theta, target, **kwargs)

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
        settings give the same response whatever else is in the batch. ``prompt_ids`` are the
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

        ``position`` is the request's index in ``requests``, which is read lazily. Refill policy
        (``continuous``): after a step, once at least :func:`refill_size` slots are free (or no row
        runs), the next requests are prefilled together, one forward per model, and join the batch.
        ``static`` refills only when every slot is free (batches of ``slots`` consecutive requests
        that shrink as rows finish). A request is admitted only while it lies fewer than
        ``max_waiting`` (default ``32 * slots``) positions after the oldest unfinished one, which
        bounds the finished samples a caller holds back to write them in order.

        The schedule depends on the requests and the sampled lengths alone, never on timing, so a
        run that replays its already-written samples (``SampleRequest.replay_tokens``) gives every
        other sample exactly the batches, slots and floats it had in the uninterrupted run.
        ``on_step(n)`` is called after each step with the tokens it produced; an exception it raises
        ends the stream.
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        stats = stats if stats is not None else StreamStats()
        max_waiting = max_waiting or 32 * slots
        refill = slots if scheduler == "static" else refill_size(slots)
        pending = _Lookahead(enumerate(requests))
        models = (self.theta, self.target)
        caches = tuple(SlotCache(m.model.config, slots, 1) for m in models)
        device = self.theta.model.device
        rows: list[_Row] = []
        logps = tuple(torch.zeros(0, self.vocab, device=device) for _ in models)

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
                    logps, group = self._prefill(caches, rows, group, logps, stats)
                    rows.extend(group)
            if not rows:
                return

            if all(r.result is None for r in rows):
                # Only replayed samples: nothing to compute, jump to the next finish.
                jump = min(r.budget - r.produced for r in rows)
                for row in rows:
                    row.produced += jump
                tokens = torch.zeros(len(rows), dtype=torch.long, device=device)
                finished = [i for i, r in enumerate(rows) if r.produced == r.budget]
                computed = 0
            else:
                tokens, finished = self._step(rows, logps, stats)
                computed = sum(r.result is not None for r in rows)
            for i in finished:
                if rows[i].result is not None:
                    yield rows[i].position, self._finish(rows[i].result)
            if computed and on_step is not None:
                on_step(computed)

            # Swap-remove finished rows so that the running ones stay packed in the leading slots.
            order = list(range(len(rows)))
            for i in sorted(finished, reverse=True):
                last = order.pop()
                if i < len(order):
                    order[i] = last
            for dst, src in enumerate(order):
                if src != dst:
                    for cache, prompt_len in zip(caches, rows[src].prompt_lengths):
                        cache.move(src, dst, prompt_len + rows[src].produced)
            rows = [rows[i] for i in order]
            logps = self._decode(caches, rows, tokens[torch.tensor(order, dtype=torch.long, device=device)])

    def _admit(self, position: int, request: SampleRequest) -> _Row:
        if request.replay_tokens is not None:
            return _Row(position, request, request.replay_tokens, None)
        result = SampleResult(
            request.sample_idx, "", [], request.prompt_ids_theta, request.prompt_ids_t, "length",
            {f: [] for f in PER_TOKEN_FIELDS}, request.response_idx,
        )
        budget = self.token_budget(request.prompt_ids_theta, request.prompt_ids_t)
        if budget < 1:
            raise ValueError(f"a prompt fills a model's context ({self.context_limits} tokens); it has no room for a response")
        return _Row(position, request, budget, result)

    def _prefill(self, caches, rows: list[_Row], group: list[_Row], logps, stats: StreamStats):
        """Prefill ``group`` into the slots after ``rows``: one left-padded forward per model over its
        distinct prompts, whose caches and log-probs are then copied to their other responses.

        Returns the log-probs of ``rows`` + group, and the group in slot order (distinct prompts first).
        """
        first = [i == 0 or not r.request.shares_prompt(group[i - 1].request) for i, r in enumerate(group)]
        distinct = [r for r, f in zip(group, first) if f]
        copies = [r for r, f in zip(group, first) if not f]
        # Each copy's prompt is the last distinct one before it.
        origin = list(itertools.accumulate((int(f) for f in first)))
        origin = [o - 1 for o, f in zip(origin, first) if not f]
        group = distinct + copies
        start = len(rows)
        computing = any(r.result is not None for r in rows + group)
        new = []
        for side, (cache, loaded, logp) in enumerate(zip(caches, (self.theta, self.target), logps)):
            prompts = [r.prompt_lengths[side] for r in group]
            cache.ensure_capacity(max(length + r.budget for length, r in zip(prompts, group)))
            if not computing:
                new.append(torch.cat([logp, logp.new_zeros(len(group), self.vocab)]))
                continue
            ids = [r.request.prompt_ids_theta if side == 0 else r.request.prompt_ids_t for r in distinct]
            width = max(map(len, ids))
            tokens = torch.full((len(ids), width), self._pad_id(loaded), dtype=torch.long)
            positions = torch.full((len(ids), width), -1, dtype=torch.long)
            for i, prompt in enumerate(ids):
                tokens[i, width - len(prompt) :] = torch.tensor(prompt)
                positions[i, width - len(prompt) :] = torch.arange(len(prompt))
            device = loaded.model.device
            out = cache.forward(loaded.model, tokens.to(device), positions.to(device), start, width, self.vocab)
            for j, i in enumerate(origin):
                cache.move(start + i, start + len(distinct) + j, len(ids[i]))
            new.append(torch.cat([logp, out, out[torch.tensor(origin, dtype=torch.long, device=device)]]))
        if computing:
            stats.prefills += 1
            stats.prompts_prefilled += len(distinct)
        return tuple(new), group

    def _decode(self, caches, rows: list[_Row], tokens: Tensor):
        """Feed each running row its last token; the next-token log-probs of both models."""
        if not any(r.result is not None for r in rows):
            return tuple(tokens.new_zeros(len(rows), self.vocab, dtype=torch.float32) for _ in caches)
        out = []
        for side, (cache, loaded) in enumerate(zip(caches, (self.theta, self.target))):
            positions = [r.prompt_lengths[side] + r.produced - 1 for r in rows]
            longest = max(positions) + 1
            positions = torch.tensor(positions, dtype=torch.long, device=tokens.device).unsqueeze(-1)
            out.append(cache.forward(loaded.model, tokens.unsqueeze(-1), positions, 0, longest, self.vocab))
        return tuple(out)

    def _step(self, rows: list[_Row], logps, stats: StreamStats) -> tuple[Tensor, list[int]]:
        """Solve alpha, mix, draw and diagnose every row; record the new tokens; the rows that finished."""
        logp_theta, logp_t = logps
        device = logp_theta.device
        keys = torch.tensor([(r.request.sample_idx, r.request.response_idx, r.produced) for r in rows], device=device)
        sample, step = sample_key(keys[:, 0], keys[:, 1]), keys[:, 2]
        alpha = solve_alpha(logp_theta, logp_t, method=self.alpha_method, alpha=self.alpha)
        logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
        tokens, logp_sampled = draw(logp_q, self.sampling, self.seed, sample, step)
        picked = tokens.unsqueeze(-1)
        columns = {
            "token_id": tokens,
            "alpha": alpha,
            "logp_theta": logp_theta.gather(-1, picked).squeeze(-1),
            "logp_t": logp_t.gather(-1, picked).squeeze(-1),
            "logp_q": logp_sampled,
            **token_diagnostics(logp_theta, logp_t, logp_q),
        }
        # The step's only host synchronisation.
        host = torch.stack([columns[f].to(torch.float64) for f in PER_TOKEN_FIELDS], dim=-1).tolist()
        stats.steps += 1
        finished = []
        for i, (row, values) in enumerate(zip(rows, host)):
            row.produced += 1
            result = row.result
            if result is None:
                done = row.produced == row.budget
            else:
                stats.tokens += 1
                token = int(values[0])
                result.token_ids.append(token)
                result.per_token["token_id"].append(token)
                for name, value in zip(PER_TOKEN_FIELDS[1:], values[1:]):
                    result.per_token[name].append(value)
                if token in self.eos:
                    result.finish_reason = "stop"
                done = result.finish_reason == "stop" or row.produced == row.budget
            if done:
                finished.append(i)
        return tokens, finished

    def _finish(self, result: SampleResult) -> SampleResult:
        text_ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
        result.text = self.target.tokenizer.decode(text_ids)
        return result


def refill_size(slots: int) -> int:
    """Free slots that trigger a refill: 1 up to 8 slots, then an eighth of them (prefill stays batched)."""
    return max(1, slots // 8)


@dataclass
class SampleRequest:
    """One response to generate: the prompt ids each model sees, keyed by ``sample_idx`` and ``response_idx``.

    Requests of one ``sample_idx`` (the K responses to one prompt) must come one after another and
    share their prompt ids: they are admitted together and the prompt is prefilled once.
    ``replay_tokens`` marks a sample already written by an earlier run: it holds its slot for exactly
    that many steps (its outputs are not computed where no other row needs them, and not yielded), so
    that the samples after it see the batches they saw in the uninterrupted run.
    """

    sample_idx: int
    prompt_ids_theta: list[int]
    prompt_ids_t: list[int]
    replay_tokens: int | None = None
    response_idx: int = 0

    def shares_prompt(self, other: SampleRequest) -> bool:
        """Another response to the same prompt (same row, same prompt ids): one prefill serves both."""
        return (
            self.sample_idx == other.sample_idx
            and self.prompt_ids_theta == other.prompt_ids_theta
            and self.prompt_ids_t == other.prompt_ids_t
        )


@dataclass
class StreamStats:
    """What :meth:`DualModelSampler.stream` did: steps computed, slot occupancy, tokens, prefills."""

    steps: int = 0  # steps computed (a stretch of replayed samples alone is skipped)
    tokens: int = 0  # tokens of new (not replayed) samples
    prefills: int = 0  # prefill forwards, per model
    prompts_prefilled: int = 0  # prompts those forwards ran over (each prompt's responses share one)

    def utilisation(self, slots: int) -> float:
        """Tokens produced / (steps x slots)."""
        return self.tokens / (self.steps * slots) if self.steps else 0.0


@dataclass
class _Row:
    """A request in a slot: its stream position, token budget, result so far (None when replayed)."""

    position: int
    request: SampleRequest
    budget: int
    result: SampleResult | None
    produced: int = 0

    @property
    def prompt_lengths(self) -> tuple[int, int]:
        return len(self.request.prompt_ids_theta), len(self.request.prompt_ids_t)


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
