"""Tiny random models of the model families people pair, built from transformers' own configs.

Each :class:`Family` names a transformers model type and what its attention has; :func:`build_family_model`
makes a model of it over the tiny tokenizer, with sliding windows and chunks of :data:`WINDOW` tokens
(shorter than a test's prompt and response, so that every layer type's mask matters). The test
matrix (``tests/engine/test_families.py``) runs each accepted family through the sampler and checks
every stored number against transformers' own full forward; :func:`family_table` is the docs' table
(docs/model-families.md), whose status comes from the same check ``generate`` runs before loading.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from qstar_cli.distributions.mixture import mixture_logprobs, token_diagnostics
from qstar_cli.engine.architectures import UnsupportedModelError, check_architecture

#: Sliding windows and attention chunks of the tiny models, in tokens.
WINDOW = 8
#: Every tiny model's sizes; a family's ``config`` adds to (or overrides) these.
BASE_CONFIG = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip
_MIXED = ["sliding_attention", "sliding_attention", "full_attention"]


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    #: What its attention has beyond the layer types (which the table reads from the config).
    features: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: Tells two rows of one model type apart (their :attr:`key`).
    variant: str = ""

    @property
    def key(self) -> str:
        return f"{self.model_type}-{self.variant}" if self.variant else self.model_type


def family(key: str) -> Family:
    """The family of :data:`FAMILIES` whose :attr:`Family.key` is ``key``."""
    return next(f for f in FAMILIES if f.key == key)


_MOE4 = dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96, interleave_moe_layer_step=1)
_MLA = dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)

# fmt: off
FAMILIES = (
    Family("Llama", "llama"),
    Family("Qwen2", "qwen2"),
    Family("Qwen3", "qwen3", "query and key norms"),
    Family("Qwen3-MoE", "qwen3_moe", "MoE routing", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    Family("Phi-3", "phi3", "fused projections", dict(sliding_window=WINDOW)),
    Family("OLMo 2", "olmo2", "query and key norms"),
    Family("Granite", "granite", "attention, residual, embedding and logit multipliers",
           dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)),
    Family("SmolLM3", "smollm3", "layers without rotary embeddings", dict(no_rope_layer_interval=2)),
    Family("GLM-4", "glm4", "partial rotary embeddings"),
    Family("Mistral", "mistral", "", dict(sliding_window=WINDOW)),
    Family("Mixtral", "mixtral", "MoE routing", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    Family("Qwen2-MoE", "qwen2_moe", "MoE routing with a shared expert",
           dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    Family("Starcoder2", "starcoder2", "biases, layer norms", dict(sliding_window=WINDOW)),
    Family("Gemma", "gemma", "embedding scaled by the hidden size"),
    Family("Gemma 2", "gemma2", "attention and final logit soft caps, query pre-attention scalar (eager attention)",
           dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=20.0, final_logit_softcapping=10.0)),
    Family("Gemma 3", "gemma3_text", "query pre-attention scalar, local and global rotary bases",
           dict(sliding_window=WINDOW, num_hidden_layers=3, layer_types=_MIXED, query_pre_attn_scalar=24)),
    Family("Cohere 2", "cohere2", "parallel attention and MLP, logit scale", dict(sliding_window=WINDOW, num_hidden_layers=3, layer_types=_MIXED)),
    Family("OLMo 3", "olmo3", "query and key norms", dict(sliding_window=WINDOW, num_hidden_layers=3, layer_types=_MIXED)),
    Family("EXAONE 4", "exaone4", "query and key norms", dict(sliding_window=WINDOW, num_hidden_layers=3, layer_types=_MIXED)),
    Family("gpt-oss", "gpt_oss", "attention sinks, MoE routing (eager attention)",
           dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], num_local_experts=4, num_experts_per_tok=2)),
    Family("Llama 4, rotary embeddings in every layer", "llama4_text", "MoE routing",
           dict(attention_chunk_size=WINDOW, layer_types=["chunked_attention", "full_attention"], **_MOE4), variant="rotary"),
    Family("DeepSeek-V3", "deepseek_v3", "latent KV (MLA: key head size 16, value head size 12), MoE routing",
           dict(**_MLA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)),
    Family("Llama 4", "llama4_text", "layers without rotary embeddings whose queries are scaled by position (temperature tuning), MoE",
           dict(attention_chunk_size=WINDOW, num_hidden_layers=4, no_rope_layer_interval=2, **_MOE4)),
    Family("Qwen3-Next", "qwen3_next", "gated delta-net linear attention beside full attention, MoE",
           dict(layer_types=["linear_attention", "full_attention"])),
    Family("Falcon-H1", "falcon_h1", "Mamba-2 mixers beside attention in every layer"),
    Family("LFM2", "lfm2", "short convolutions beside attention", dict(layer_types=["conv", "full_attention"])),
    Family("Jamba", "jamba", "Mamba layers beside attention, MoE", dict(attn_layer_period=2, attn_layer_offset=1)),
    Family("Granite 4 hybrid", "granitemoehybrid", "Mamba-2 layers beside attention", dict(layer_types=["linear_attention", "full_attention"])),
    Family("Nemotron-H", "nemotron_h", "Mamba-2, MLP and attention layers"),
)
# fmt: on


def family_config(family: Family, vocab_size: int, eos_token_id: int | None = None, pad_token_id: int | None = None):
    """The tiny config of ``family`` (transformers' config class of its model type)."""
    from transformers import CONFIG_MAPPING

    values = {**BASE_CONFIG, "vocab_size": vocab_size, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": None}
    return CONFIG_MAPPING[family.model_type](**{**values, **family.config})


def build_family_model(family: Family, tokenizer, seed: int = 0, attn_implementation: str | None = None, sharpness: float = 4.0):
    """A random model of ``family`` over ``tokenizer``'s vocabulary, in eval mode; ``sharpness``
    scales the output head so that next-token distributions are peaky (responses end, alpha varies)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(family, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False)


def family_status(family: Family, vocab_size: int = 384) -> tuple[str, str]:
    """``(attention, status)`` of the docs' table: the layer types and the family's features, and
    ``exact`` or the refusal ``generate`` gives before loading."""
    config = family_config(family, vocab_size)
    try:
        layout = check_architecture(config)
    except UnsupportedModelError as err:
        return family.features, f"refused: {err.reason}"
    return "; ".join(filter(None, (layout.describe(), family.features))), "exact"


def family_table() -> str:
    """The docs' table of model families (Markdown)."""
    rows = ["| family | model type | attention | status |", "|---|---|---|---|"]
    for family in FAMILIES:
        attention, status = family_status(family)
        rows.append(f"| {family.name} | `{family.model_type}` | {attention} | {status} |")
    return "\n".join(rows) + "\n"


def reference_model(model):
    """A float64 copy of ``model`` on transformers' eager attention (MoE experts eager too: grouped
    matmuls have no float64), whose full forward is the reference for every stored number."""
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("eager")
    if type(ref)._can_set_experts_implementation():
        ref.set_experts_implementation("eager")
    return ref


def _full_forward(ref, prompt_ids: list[int], token_ids: list[int], vocab: int) -> torch.Tensor:
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits.log_softmax(-1)


#: The matrix's conversations: prompts of different lengths (a system message, several turns).
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the sum of the first ten positive integers?"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another one?"}],
]
#: The matrix's runs: plain, speculative, K = 3 responses per prompt on 4 slots (rows admitted,
#: moved and refilled) with prompts prefilled 7 tokens at a time, and compiled (with drafts, so that
#: decode and verify forwards are both compiled).
MODES = ("plain", "draft_k=3", "K=3 on 4 slots, prefill chunks of 7", "compiled")


def matrix_run(pair, mode: str, max_new_tokens: int = 24):
    """The sampler of ``mode`` over ``pair`` (two :class:`~qstar_cli.engine.models.LoadedModel`) and
    its results for :data:`CONVERSATIONS`."""
    from qstar_cli.engine.sampler import DualModelSampler
    from qstar_cli.engine.samples import SampleRequest

    settings = {"draft_k=3": {"draft_k": 3}, "compiled": {"draft_k": 2, "compile": True}}.get(mode, {})
    sampler = DualModelSampler(*pair, theta_format="plain", t_format="chat", max_new_tokens=max_new_tokens, **settings)
    if not mode.startswith("K=3"):
        return sampler, sampler.generate(CONVERSATIONS)
    sampler.prefill_tokens = 7
    requests = [SampleRequest(row, *sampler.encode_prompts(c), response_idx=k) for row, c in enumerate(CONVERSATIONS) for k in range(3)]
    return sampler, [result for _, result in sampler.stream(requests, slots=4)]


def worst_errors(refs, pair, mode: str) -> tuple[dict[str, float], int]:
    """The worst :func:`stored_number_errors` of each field over a :func:`matrix_run`, and its longest
    sequence (prompt and response, in pi_t's format)."""
    sampler, results = matrix_run(pair, mode)
    worst: dict[str, float] = {}
    for result in results:
        for name, error in stored_number_errors(refs, sampler.vocab, result).items():
            worst[name] = max(worst.get(name, 0.0), error)
    return worst, max(len(r.prompt_ids_t) + len(r.token_ids) for r in results)


def sidecar_sample(record: dict[str, Any]) -> SimpleNamespace:
    """A sidecar line (level full) as :func:`stored_number_errors` takes a sample."""
    return SimpleNamespace(
        prompt_ids_theta=record["prompt_ids_theta"], prompt_ids_t=record["prompt_ids_t"],
        token_ids=record["per_token"]["token_id"], per_token=record["per_token"],
    )  # fmt: skip


def stored_number_errors(refs, vocab: int, result) -> dict[str, float]:
    """The largest difference of each stored per-token number of ``result`` (a
    :class:`~qstar_cli.engine.samples.SampleResult`, or a sidecar line's :func:`sidecar_sample`) from what the float64 full forwards of ``refs``
    (pi_theta's and pi_t's :func:`reference_model`) give at the stored alpha; for alpha itself, the
    float64 ``|KL(q||pi_theta) - KL(q||pi_t)|`` there, its distance from a root (near-equal models make
    alpha ill-conditioned, not the KLs). Sampled with temperature 1 and no truncation, as ``logp_q``
    is then the untempered q's."""
    logp_theta = _full_forward(refs[0], result.prompt_ids_theta, result.token_ids, vocab)
    logp_t = _full_forward(refs[1], result.prompt_ids_t, result.token_ids, vocab)
    logp_q = mixture_logprobs(logp_theta, logp_t, torch.tensor(result.per_token["alpha"], dtype=torch.float64))
    picked = torch.tensor(result.token_ids)[:, None]
    expected = {name: logp.gather(-1, picked)[:, 0] for name, logp in (("logp_theta", logp_theta), ("logp_t", logp_t), ("logp_q", logp_q))}
    expected.update(token_diagnostics(logp_theta, logp_t, logp_q))
    if result.per_token["token_id"] != result.token_ids:
        raise AssertionError("the stored token ids are not the response's")
    errors = {
        name: (torch.tensor(result.per_token[name], dtype=torch.float64) - value).abs().max().item() for name, value in expected.items()
    }
    return {"alpha": (expected["kl_theta"] - expected["kl_t"]).abs().max().item(), **errors}
