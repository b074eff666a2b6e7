"""The dual-model sampler on tiny random models: exactness, batching, endpoints, distribution."""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha
from qstar_cli.distributions.sampling import SamplingParams
from qstar_cli.engine.compiled import warm_up
from qstar_cli.engine.models import LoadedModel, VocabularyMismatchError
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.engine.slots import SlotCache
from tests.helpers import (
    CONVERSATIONS,
    chi_square_pvalue,
    full_forward_logps,
    make_sampler,
    swapped_tokenizer,
)


def test_cached_log_probs_equal_one_full_forward(pair):
    sampler = make_sampler(pair)
    results = sampler.generate(CONVERSATIONS)
    assert len({len(r.prompt_ids_t) for r in results}) == 3, "prompts of mixed lengths in one batch"
    for r in results:
        assert len(r.token_ids) >= 1
        logp_theta = full_forward_logps(pair[0], r.prompt_ids_theta, r.token_ids, sampler.vocab)
        logp_t = full_forward_logps(pair[1], r.prompt_ids_t, r.token_ids, sampler.vocab)
        picked = torch.tensor(r.token_ids)[:, None]
        assert torch.allclose(
            logp_theta.gather(-1, picked)[:, 0].double(), torch.tensor(r.per_token["logp_theta"], dtype=torch.float64), atol=1e-4
        )
        assert torch.allclose(logp_t.gather(-1, picked)[:, 0].double(), torch.tensor(r.per_token["logp_t"], dtype=torch.float64), atol=1e-4)
        alpha = solve_alpha(logp_theta, logp_t)
        assert torch.allclose(alpha.double(), torch.tensor(r.per_token["alpha"], dtype=torch.float64), atol=1e-4)
        logp_q = mixture_logprobs(logp_theta, logp_t, alpha).gather(-1, picked)[:, 0]
        assert torch.allclose(logp_q.double(), torch.tensor(r.per_token["logp_q"], dtype=torch.float64), atol=1e-4)
        assert r.per_token["token_id"] == r.token_ids
        assert all(len(v) == len(r.token_ids) for v in r.per_token.values())


def test_prompts_follow_each_models_format(pair):
    sampler = make_sampler(pair)
    r = sampler.generate(CONVERSATIONS[2:])[0]
    tok = pair[0].tokenizer
    assert tok.decode(r.prompt_ids_theta) == "User: Name a prime.\n\nAssistant: Seven.\n\nUser: Another one?\n\nAssistant:"
    assert tok.decode(r.prompt_ids_t).endswith("<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n")
    assert "Seven." in tok.decode(r.prompt_ids_t)


def test_a_rows_result_does_not_depend_on_its_batch(pair):
    sampler = make_sampler(pair, max_new_tokens=16)
    together = sampler.generate(CONVERSATIONS, sample_indices=[10, 11, 12])
    for i, conversation in enumerate(CONVERSATIONS):
        [alone] = sampler.generate([conversation], sample_indices=[10 + i])
        assert alone.token_ids == together[i].token_ids
        assert alone.finish_reason == together[i].finish_reason
        assert torch.allclose(torch.tensor(alone.per_token["logp_q"]), torch.tensor(together[i].per_token["logp_q"]), atol=1e-5)


@pytest.mark.parametrize("alpha, side", [(1.0, 0), (0.0, 1)])
def test_alpha_end_points_reproduce_a_single_model(pair, alpha, side):
    single = (pair[side], pair[side])
    mixed = make_sampler(pair, alpha_method="fixed", alpha=alpha, theta_format="chat")
    alone = make_sampler(single, alpha_method="fixed", alpha=alpha, theta_format="chat")
    a = mixed.generate(CONVERSATIONS, sample_indices=[3, 4, 5])
    b = alone.generate(CONVERSATIONS, sample_indices=[3, 4, 5])
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        key = "logp_theta" if side == 0 else "logp_t"
        assert torch.allclose(torch.tensor(x.per_token["logp_q"]), torch.tensor(x.per_token[key]), atol=1e-5)


def test_greedy_takes_the_argmax_of_q(pair):
    sampler = make_sampler(pair, sampling=SamplingParams(temperature=0))
    for r in sampler.generate(CONVERSATIONS):
        logp_theta = full_forward_logps(pair[0], r.prompt_ids_theta, r.token_ids, sampler.vocab)
        logp_t = full_forward_logps(pair[1], r.prompt_ids_t, r.token_ids, sampler.vocab)
        logp_q = mixture_logprobs(logp_theta, logp_t, solve_alpha(logp_theta, logp_t))
        assert r.token_ids == logp_q.argmax(-1).tolist()
        assert r.per_token["logp_q"] == [0.0] * len(r.token_ids)


def test_first_token_frequencies_match_q(sharp_pair):
    pair = sharp_pair
    sampler = make_sampler(pair, max_new_tokens=1)
    n = 3000
    results = sampler.generate([CONVERSATIONS[1]] * n, sample_indices=list(range(n)))
    r = results[0]
    logp_theta = full_forward_logps(pair[0], r.prompt_ids_theta, r.token_ids, sampler.vocab)
    logp_t = full_forward_logps(pair[1], r.prompt_ids_t, r.token_ids, sampler.vocab)
    q = mixture_logprobs(logp_theta, logp_t, solve_alpha(logp_theta, logp_t)).exp()[0]
    counts = torch.bincount(torch.tensor([x.token_ids[0] for x in results]), minlength=sampler.vocab)
    assert q.max() > 0.05, "the models must be peaky enough for the test to have power"
    assert chi_square_pvalue(counts, q) > 1e-3
    # Power: neither model alone explains the draws.
    assert chi_square_pvalue(counts, logp_theta.exp()[0]) < 1e-6
    assert chi_square_pvalue(counts, logp_t.exp()[0]) < 1e-6


def test_vocabulary_mismatch_names_the_first_differing_token(pair, tiny_tokenizer):
    swapped, by_id = swapped_tokenizer(tiny_tokenizer)
    with pytest.raises(VocabularyMismatchError, match=rf"token id 100 is {by_id[100]!r} for theta but {by_id[101]!r} for other"):
        DualModelSampler(pair[0], LoadedModel(pair[1].model, swapped, "other"))


def test_padded_embeddings_never_emit_extra_rows(pair):
    # The target fixture model has 5 embedding rows beyond its tokenizer.
    assert pair[1].model.get_output_embeddings().weight.shape[0] == len(pair[1].tokenizer) + 5
    sampler = make_sampler(pair, max_new_tokens=30)
    assert sampler.vocab == len(pair[0].tokenizer)
    results = sampler.generate(CONVERSATIONS * 4, sample_indices=list(range(12)))
    assert max(max(r.token_ids) for r in results) < sampler.vocab


@pytest.mark.parametrize("side", [0, 1])
def test_eos_of_either_model_stops_its_rows_at_different_steps(pair, side):
    sampler = make_sampler(pair, max_new_tokens=40)
    baseline = sampler.generate(CONVERSATIONS, sample_indices=[0, 1, 2])
    # Make the 4th token of row 0 an EOS of one model only: row 0 stops there, the others run on.
    stop_token = baseline[0].token_ids[3]
    model = pair[side].model
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [saved, stop_token]
    try:
        results = make_sampler(pair, max_new_tokens=40).generate(CONVERSATIONS, sample_indices=[0, 1, 2])
    finally:
        model.generation_config.eos_token_id = saved
    assert results[0].finish_reason == "stop"
    assert results[0].token_ids == baseline[0].token_ids[: baseline[0].token_ids.index(stop_token) + 1]
    for r, b in zip(results, baseline):
        n = len(r.token_ids)
        assert r.token_ids == b.token_ids[:n]
        assert r.finish_reason == "stop" or n == 40
    assert len({len(r.token_ids) for r in results}) > 1


def test_bfloat16_models_move_per_token_numbers_by_rounding_only(pair):
    """bf16 weights (the default on CUDA), log-probs taken in float32 from bf16 logits: on the tiny
    pair, greedy tokens stay the same and per-token log-probs move by about 0.01 nats (measured
    0.008-0.010), alpha and the KLs by about 3e-4, against a float32 run."""
    greedy = SamplingParams(temperature=0.0)
    half = tuple(LoadedModel(copy.deepcopy(m.model).to(torch.bfloat16), m.tokenizer, m.name) for m in pair)
    full = make_sampler(pair, max_new_tokens=24, sampling=greedy).generate(CONVERSATIONS)
    bf16 = make_sampler(half, max_new_tokens=24, sampling=greedy).generate(CONVERSATIONS)
    moved = {name: 0.0 for name in ("logp_theta", "logp_t", "alpha", "kl_theta", "kl_t")}
    for a, b in zip(full, bf16):
        assert b.token_ids == a.token_ids
        for name in moved:
            moved[name] = max(moved[name], max(abs(x - y) for x, y in zip(a.per_token[name], b.per_token[name])))
    assert 1e-4 < moved["logp_theta"] < 0.03 and 1e-4 < moved["logp_t"] < 0.03, moved
    assert moved["alpha"] < 2e-3 and moved["kl_theta"] < 2e-3 and moved["kl_t"] < 2e-3, moved


@pytest.mark.parametrize("draft_k", [0, 2])
def test_compiled_round_equals_eager(pair, draft_k):
    """``--compile on`` (torch.compile of the solve, the mixture, the diagnostics and the models'
    decode and verify forwards): the same greedy tokens, and per-token numbers within 1e-5, on the tiny pair in float32 on the CPU."""
    greedy = SamplingParams(temperature=0.0)
    eager = make_sampler(pair, max_new_tokens=12, sampling=greedy, draft_k=draft_k).generate(CONVERSATIONS)
    sampler = make_sampler(pair, max_new_tokens=12, sampling=greedy, draft_k=draft_k, compile=True)
    calls = []
    sampler.roles = {
        role: dataclasses.replace(r, compiled=lambda run=r.compiled, **inputs: calls.append(inputs["input_ids"].shape) or run(**inputs))
        for role, r in sampler.roles.items()
    }
    warm_up(sampler)
    graphs, calls[:] = counters["stats"]["unique_graphs"], []
    compiled = sampler.generate(CONVERSATIONS)
    assert counters["stats"]["unique_graphs"] == graphs, "the warm-up compiled every shape the run takes"
    # Decode forwards (one query) and verify forwards (up to draft_k + 1) are compiled, prefills not.
    assert {1, draft_k + 1} <= {q for _, q in calls} <= set(range(1, draft_k + 2))
    for a, b in zip(eager, compiled):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        for name, values in a.per_token.items():
            torch.testing.assert_close(
                torch.tensor(b.per_token[name], dtype=torch.float64), torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-5
            )


@pytest.mark.parametrize("tokens", [7, 40])
def test_a_chunked_prefill_samples_what_one_forward_does(pair, tokens, monkeypatch):
    """Prefill forwards take at most ``prefill_tokens`` tokens: 7 splits every prompt into columns,
    40 takes whole prompts a few rows at a time; the samples are those of one prefill forward."""
    whole = make_sampler(pair, max_new_tokens=6).generate(CONVERSATIONS * 2)
    sampler = make_sampler(pair, max_new_tokens=6)
    sampler.prefill_tokens = tokens
    shapes = []
    real_forward = SlotCache.forward

    def forward(self, model, ids, *args, run=None, **kwargs):
        if run is None and ids.shape[1] > 1:  # a prefill
            shapes.append(tuple(ids.shape))
        return real_forward(self, model, ids, *args, run=run, **kwargs)

    monkeypatch.setattr(SlotCache, "forward", forward)
    chunked = sampler.generate(CONVERSATIONS * 2)
    longest = max(len(p) for r in whole for p in (r.prompt_ids_theta, r.prompt_ids_t)) - 1
    assert max(r * c for r, c in shapes) <= tokens < 6 * longest and len(shapes) > 2
    for a, b in zip(whole, chunked):
        assert b.token_ids == a.token_ids
        for name, values in a.per_token.items():
            torch.testing.assert_close(
                torch.tensor(b.per_token[name], dtype=torch.float64), torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-5
            )


def test_no_recompile_after_warm_up_when_the_models_sizes_equal_the_warm_ups(tiny_tokenizer):
    """Dynamic shapes give equal sizes one symbol: with 7 key/value heads (the warm-up's row count)
    and a head_dim of 8 (its attention width), a forward that specialises one would pin the other,
    and the run's other row counts and widths would recompile it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qstar_cli.engine.compiled import compiled_forward, warm_up_forward

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=56, intermediate_size=64, num_hidden_layers=1, num_attention_heads=7,
        num_key_value_heads=7, max_position_embeddings=1024, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    run = compiled_forward(model)
    with torch.inference_mode():
        warm_up_forward(model, run, 50, 1)
        graphs = counters["stats"]["unique_graphs"]
        cache = SlotCache(config, 5, 40, compiled=True)
        ids = torch.ones(5, 20, dtype=torch.long)
        cache.forward(model, ids, torch.arange(20).expand(5, 20), 0, 20, 50)
        for rows, at in ((3, 20), (5, 21), (2, 30)):
            cache.forward(model, ids[:rows, :1], torch.full((rows, 1), at), 0, at + 1, 50, run=run)
    assert counters["stats"]["unique_graphs"] == graphs
