"""Sampling from q: distributions (chi-square), truncation rules, and counter-based randomness."""

import math

import pytest
import torch

from qstar_cli.distributions import sampling
from qstar_cli.distributions.sampling import SamplingParams, counter_uniform, sampling_logprobs
from qstar_cli.distributions.token_choice import choose_tokens
from tests.helpers import chi_square_pvalue

N_DRAWS = 20000


def draw(logp_q, params, seed, counter_key, token_index):
    """One token per row from q as a plain round draws it (:func:`choose_tokens` without drafts);
    the ids and their log-probabilities under the distribution sampled."""
    n = len(logp_q)
    no_drafts = counter_key.new_zeros(n, 0), logp_q.new_empty(n, 0, logp_q.shape[-1]), counter_key.new_zeros(n)
    choice = choose_tokens(logp_q, logp_q, logp_q, *no_drafts, counter_key, token_index, seed, params)
    return choice.token_ids[:, 0], choice.logp_drawn


def draw_counts(logp_q, params, seed=0):
    rows = logp_q.expand(N_DRAWS, -1)
    idx = torch.arange(N_DRAWS)
    tokens, _ = draw(rows, params, seed, idx, torch.zeros_like(idx))
    return torch.bincount(tokens, minlength=logp_q.shape[-1])


@pytest.fixture
def logp_q():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 40, generator=gen) * 1.5).log_softmax(-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.7),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9),
    ],
)
def test_frequencies_match_the_sampled_distribution(logp_q, params):
    target = sampling_logprobs(logp_q, params).exp()[0]
    counts = draw_counts(logp_q, params)
    assert chi_square_pvalue(counts, target) > 1e-3
    assert (counts[target == 0] == 0).all()
    # Power: the untransformed q is rejected whenever the transform changes it noticeably.
    if (target - logp_q.exp()[0]).abs().sum() > 0.1:
        assert chi_square_pvalue(counts, logp_q.exp()[0]) < 1e-6


def test_temperature_top_k_top_p_definitions():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    logp = probs.log()
    tempered = sampling_logprobs(logp, SamplingParams(temperature=0.5)).exp()
    assert torch.allclose(tempered, probs**2 / (probs**2).sum())
    top2 = sampling_logprobs(logp, SamplingParams(top_k=2)).exp()
    assert torch.allclose(top2, torch.tensor([[4 / 7, 3 / 7, 0, 0]], dtype=torch.float64))
    # top_p = 0.7: 0.4 + 0.3 reaches 0.7, so two tokens remain; 0.71 needs the third.
    nucleus = sampling_logprobs(logp, SamplingParams(top_p=0.7)).exp()
    assert torch.allclose(nucleus, torch.tensor([[4 / 7, 3 / 7, 0, 0]], dtype=torch.float64))
    nucleus = sampling_logprobs(logp, SamplingParams(top_p=0.71)).exp()
    assert torch.allclose(nucleus, torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0]], dtype=torch.float64))
    # The most likely token survives any top_p.
    assert sampling_logprobs(logp, SamplingParams(top_p=0.01))[0, 0] == 0


def test_greedy_is_the_argmax_with_log_prob_zero():
    gen = torch.Generator().manual_seed(1)
    logp_q = torch.randn(64, 100, generator=gen).log_softmax(-1)
    idx = torch.arange(64)
    tokens, logp = draw(logp_q, SamplingParams(temperature=0), 0, idx, idx)
    assert torch.equal(tokens, logp_q.argmax(-1))
    assert torch.equal(logp, torch.zeros(64))


def test_logp_of_the_drawn_token_under_the_sampled_distribution():
    gen = torch.Generator().manual_seed(2)
    logp_q = torch.randn(32, 50, generator=gen).log_softmax(-1)
    params = SamplingParams(temperature=0.7, top_k=20)
    idx = torch.arange(32)
    tokens, logp = draw(logp_q, params, 3, idx, idx)
    expected = sampling_logprobs(logp_q, params).gather(-1, tokens[:, None])[:, 0]
    assert torch.equal(logp, expected)
    assert torch.isfinite(logp).all()


def test_draws_do_not_depend_on_batch_composition_or_order():
    gen = torch.Generator().manual_seed(3)
    logp_q = torch.randn(50, 300, generator=gen).log_softmax(-1)
    keys = torch.arange(100, 150)
    token_index = torch.arange(50) % 7
    params = SamplingParams(temperature=0.9, top_p=0.95)
    together, _ = draw(logp_q, params, 11, keys, token_index)
    alone = torch.stack([draw(logp_q[i : i + 1], params, 11, keys[i : i + 1], token_index[i : i + 1])[0][0] for i in range(50)])
    perm = torch.randperm(50, generator=gen)
    shuffled, _ = draw(logp_q[perm], params, 11, keys[perm], token_index[perm])
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, together[perm])
    other_seed, _ = draw(logp_q, params, 12, keys, token_index)
    assert not torch.equal(other_seed, together)


def test_counter_uniform_is_uniform_and_keyed():
    idx = torch.arange(200000)
    u = counter_uniform(0, idx, torch.zeros_like(idx))
    assert u.min() > 0 and u.max() < 1
    counts = torch.histc(u, bins=50, min=0, max=1)
    assert chi_square_pvalue(counts.long(), torch.full((50,), 1 / 50)) > 1e-3
    # Neighbouring counters and streams are unrelated.
    v = counter_uniform(0, idx, torch.ones_like(idx))
    w = counter_uniform(0, idx, torch.zeros_like(idx), stream=1)
    for other in (v, w):
        assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1]) < 0.01
    assert torch.equal(u, counter_uniform(0, idx, torch.zeros_like(idx)))


def test_zero_probability_tokens_are_never_drawn_even_at_extreme_uniforms():
    from qstar_cli.distributions.sampling import sample_tokens

    logp = torch.tensor([[-math.inf, math.log(0.5), -math.inf, math.log(0.5), -math.inf]])
    rows = logp.expand(4, -1)
    u = torch.tensor([1e-9, 0.5, 1 - 1e-7, 1.0])
    assert sample_tokens(rows, u).tolist() == [1, 1, 3, 3]


def test_a_cpu_scan_gives_a_zero_entry_the_prefix_before_it():
    """The CPU's cumsum adds in order: a zero entry's prefix is its predecessor's, bit for bit, so
    the running maximum a parallel scan needs would change nothing there."""
    gen = torch.Generator().manual_seed(5)
    logp = torch.randn(16, 5000, generator=gen).log_softmax(-1).masked_fill(torch.rand(16, 5000, generator=gen) < 0.3, -math.inf)
    probs = logp.exp()
    cdf = probs.cumsum(-1)
    assert torch.equal(cdf, torch.where(probs > 0, cdf, 0.0).cummax(-1).values)


def test_a_scan_that_rounds_a_prefix_up_never_lands_a_draw_on_a_zero_entry(monkeypatch):
    """A parallel scan (CUDA's cumsum) sums each prefix in its own order, so the prefix at a zero
    entry can come out an ulp above the one before it; a uniform in that gap must not draw it."""
    from qstar_cli.distributions.sampling import sample_tokens

    real_cumsum = torch.Tensor.cumsum

    def rounding_scan(self, *args, **kwargs):
        cdf = real_cumsum(self, *args, **kwargs)
        return torch.where(self == 0, torch.nextafter(cdf, torch.tensor(math.inf)), cdf)

    monkeypatch.setattr(torch.Tensor, "cumsum", rounding_scan)
    monkeypatch.setattr(sampling, "SEQUENTIAL_SCAN_DEVICES", ())  # as on a GPU
    logp = torch.tensor([[math.log(0.25), -math.inf, math.log(0.75)], [-math.inf, 0.0, -math.inf]])
    gap = torch.nextafter(torch.tensor(0.25), torch.tensor(1.0))  # the rounded-up prefix at entry 1
    assert rounding_scan(logp.exp(), dim=-1)[0, 1] == gap  # the scan does round up there
    u = torch.tensor([gap.item(), 1.0])
    assert sample_tokens(logp, u).tolist() == [2, 1]


@pytest.mark.parametrize("devices", [("cpu",), ()], ids=["sequential scan", "parallel scan"])
def test_a_nan_row_draws_an_id_within_the_vocabulary(monkeypatch, devices):
    """A model's NaN row is caught after the round; until then its draw must index the vocabulary."""
    from qstar_cli.distributions.sampling import sample_tokens

    monkeypatch.setattr(sampling, "SEQUENTIAL_SCAN_DEVICES", devices)
    logp = torch.tensor([[math.nan] * 4, [math.log(0.5), math.log(0.5), -math.inf, -math.inf]])
    ids = sample_tokens(logp, torch.tensor([0.5, 1.0]))
    assert 0 <= ids[0] < 4 and ids[1] == 1


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
