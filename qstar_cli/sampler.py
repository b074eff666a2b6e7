"""The dual-model sampler: two causal LMs, two KV caches, one q* token per row per step.

Per step, for the rows still running: one forward of each model over the last token with its own
cache, log-softmax in float32 over the shared vocabulary, alpha / diagnostics / draw from the math
core, and a single host transfer of the step's per-row results. Rows that finish (an EOS of either
model, ``max_new_tokens``, or a full context of either model) are dropped from both caches, so the
batch shrinks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

from qstar_cli.mixture import (
    DIAGNOSTIC_FIELDS,
    AlphaMethod,
    check_alpha_method,
    mixture_logprobs,
    solve_alpha,
    token_diagnostics,
)
from qstar_cli.models import LoadedModel, check_shared_vocabulary, context_limit, load_model, resolve_device, resolve_dtype
from qstar_cli.prompts import Messages, PromptFormat
from qstar_cli.sampling import SamplingParams, draw

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


class ModelStream:
    """One model's side of a batch: its KV cache, attention mask and next positions.

    Both models see the same generated tokens after different prompts, so each keeps its own
    left-padded mask and positions. ``select`` drops finished rows; ``DynamicCache.crop`` would roll
    back rejected speculative tokens the same way.
    """

    def __init__(self, model, prompts: list[list[int]], pad_id: int, vocab: int):
        self.model = model
        self.vocab = vocab
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            self.mask[row, width - len(prompt) :] = 1
        ids, self.mask = ids.to(device), self.mask.to(device)
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.cache = DynamicCache(config=model.config)
        self.logp = self._forward(ids, positions)
        self.next_position = positions[:, -1] + 1

    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        # Rows past the shared vocabulary (padded embeddings) get probability zero.
        return out.logits[:, -1, : self.vocab].float().log_softmax(-1)

    def step(self, tokens: Tensor) -> None:
        """Feed one token per row; ``self.logp`` becomes the next-token log-probs."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.logp = self._forward(tokens.unsqueeze(-1), self.next_position.unsqueeze(-1))
        self.next_position = self.next_position + 1

    def select(self, rows: Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.next_position, self.logp = self.mask[rows], self.next_position[rows], self.logp[rows]


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
        dev = resolve_device(device)
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
    ) -> list[SampleResult]:
        """Generate one response per conversation, all in one batch; results in input order.

        ``sample_indices`` (default 0..n-1) key the counter-based randomness: the same index, seed and
        settings give the same response whatever else is in the batch. ``prompt_ids`` are the
        ``encode_prompts`` of the conversations when the caller has them already. ``on_step(n)`` is
        called after each step with the number of tokens it produced; an exception it raises
        abandons the batch.
        """
        if sample_indices is None:
            sample_indices = list(range(len(conversations)))
        prompts = prompt_ids if prompt_ids is not None else [self.encode_prompts(c) for c in conversations]
        budgets = [self.token_budget(*p) for p in prompts]  # a row ends with "length" at its budget
        if min(budgets) < 1:
            raise ValueError(f"a prompt fills a model's context ({self.context_limits} tokens); it has no room for a response")
        results = [
            SampleResult(i, "", [], p_theta, p_t, "length", {f: [] for f in PER_TOKEN_FIELDS})
            for i, (p_theta, p_t) in zip(sample_indices, prompts)
        ]
        theta = ModelStream(self.theta.model, [p[0] for p in prompts], self._pad_id(self.theta), self.vocab)
        target = ModelStream(self.target.model, [p[1] for p in prompts], self._pad_id(self.target), self.vocab)
        device = theta.logp.device
        alive = list(range(len(conversations)))  # result index of each running row
        sample_idx = torch.tensor(sample_indices, dtype=torch.long, device=device)

        for step in range(max(budgets)):
            logp_theta, logp_t = theta.logp, target.logp
            alpha = solve_alpha(logp_theta, logp_t, method=self.alpha_method, alpha=self.alpha)
            logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
            tokens, logp_sampled = draw(
                logp_q, self.sampling, self.seed, sample_idx, torch.full_like(sample_idx, step)
            )
            picked = tokens.unsqueeze(-1)
            columns = {
                "token_id": tokens.to(torch.float64),
                "alpha": alpha,
                "logp_theta": logp_theta.gather(-1, picked).squeeze(-1),
                "logp_t": logp_t.gather(-1, picked).squeeze(-1),
                "logp_q": logp_sampled,
                **token_diagnostics(logp_theta, logp_t, logp_q),
            }
            # The step's only host synchronisation.
            host = torch.stack([columns[f].to(torch.float64) for f in PER_TOKEN_FIELDS], dim=-1).tolist()

            keep = []
            for row, values in enumerate(host):
                result = results[alive[row]]
                for name, value in zip(PER_TOKEN_FIELDS, values):
                    result.per_token[name].append(value)
                token = int(values[0])
                result.token_ids.append(token)
                if token in self.eos:
                    result.finish_reason = "stop"
                elif step + 1 < budgets[alive[row]]:
                    keep.append(row)
            if on_step is not None:
                on_step(len(host))
            if not keep:
                break
            if len(keep) < len(alive):
                rows = torch.tensor(keep, device=device)
                theta.select(rows)
                target.select(rows)
                tokens, sample_idx = tokens[rows], sample_idx[rows]
                alive = [alive[r] for r in keep]
            theta.step(tokens)
            target.step(tokens)

        for result in results:
            result.per_token["token_id"] = [int(t) for t in result.per_token["token_id"]]
            text_ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
            result.text = self.target.tokenizer.decode(text_ids)
        return results
