"""The round's token choice without a model (qstar_cli.distributions.token_choice): fabricated
log-probabilities in, tokens, accepted counts, picked log-probs and NaN rows out."""

import math

import torch

from qstar_cli.distributions.sampling import SamplingParams, sampling_logprobs
from qstar_cli.distributions.token_choice import choose_tokens
from tests.helpers import chi_square_pvalue

V, ROWS = 8, 4000
SAMPLING = SamplingParams(temperature=0.7, top_k=6)


def random_logp(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).mul(1.5).log_softmax(-1)


def choose(logp_theta, logp_t, logp_q, drafts, logp_drafts, draft_len, sample, **kwargs):
    produced = torch.full_like(sample, 5)
    return choose_tokens(logp_theta, logp_t, logp_q, drafts, logp_drafts, draft_len, sample, produced, 3, SAMPLING, **kwargs)


def test_a_plain_round_draws_from_tempered_q_whatever_the_batch():
    logp_theta, logp_t, logp_q = (random_logp(1, V, seed=s).expand(ROWS, V) for s in (1, 2, 3))
    no_drafts = torch.zeros(ROWS, 0, dtype=torch.long), torch.empty(ROWS, 0, V), torch.zeros(ROWS, dtype=torch.long)
    sample = torch.arange(ROWS)
    choice = choose(logp_theta, logp_t, logp_q, *no_drafts, sample)
    drawn = sampling_logprobs(logp_q[:1], SAMPLING)[0]
    counts = torch.bincount(choice.token_ids[:, 0], minlength=V)
    assert chi_square_pvalue(counts, drawn.exp().double()) > 1e-3
    assert counts[drawn == -math.inf].sum() == 0, "top-k's cut tokens are never drawn"
    assert choice.accepted.eq(0).all() and not choice.nan.any()
    tokens = choice.token_ids[:, 0]
    for picked, logp in ((choice.logp_theta, logp_theta), (choice.logp_t, logp_t), (choice.logp_drawn, drawn.expand(ROWS, V))):
        assert torch.equal(picked, logp.gather(-1, tokens[:, None])[:, 0])
    # A row's token is a function of its key and position alone: the same rows in another batch.
    rows = torch.tensor([3999, 17, 5])
    alone = choose(logp_theta[:3], logp_t[:3], logp_q[:3], *(x[:3] for x in no_drafts), rows)
    assert torch.equal(alone.token_ids[:, 0], tokens[rows])


def test_drafts_leave_the_first_token_distributed_as_r():
    k = 2
    logp_q = random_logp(1, 1, V, seed=4).expand(ROWS, k + 1, V)
    logp_p = random_logp(1, 1, V, seed=5).expand(ROWS, k, V)
    drafts = torch.multinomial(logp_p[:, 0].exp(), k, replacement=True, generator=torch.Generator().manual_seed(6))
    flat = logp_q.reshape(-1, V)
    choice = choose(flat, flat, flat, drafts, logp_p, torch.full((ROWS,), k), torch.arange(ROWS))
    first = torch.bincount(choice.token_ids[:, 0], minlength=V)
    assert chi_square_pvalue(first, sampling_logprobs(logp_q[:1, 0], SAMPLING)[0].exp().double()) > 1e-3
    assert 0 < choice.accepted.float().mean() < k, "some drafts are accepted, some rejected"
    # The accepted drafts stand where they were drafted.
    kept = torch.arange(k) < choice.accepted[:, None]
    assert torch.equal(choice.token_ids[:, :k][kept], drafts[kept])


def test_nan_rows_flag_the_emitted_tokens_alone():
    """Two rows, two positions: row 0 drafts one token and has it accepted (r == p), row 1 drafts
    none, so its second position is never emitted."""
    logp = random_logp(2, 2, V, seed=7)
    logp_drafts = sampling_logprobs(logp[:, :1].reshape(-1, V), SAMPLING).view(2, 1, V)
    drafts = logp_drafts[:, 0].argmax(-1, keepdim=True)
    draft_len, sample = torch.tensor([1, 0]), torch.tensor([0, 1])
    logp_theta, logp_t = logp.clone().view(-1, V), logp.clone().view(-1, V)
    logp_theta[1] = math.nan  # row 0's second position: emitted
    logp_t[3] = math.nan  # row 1's second position: not emitted
    choice = choose(logp_theta, logp_t, logp.view(-1, V), drafts, logp_drafts, draft_len, sample)
    assert choice.accepted.tolist() == [1, 0]
    assert choice.nan.tolist() == [[True, False], [False, False]]
    # A draft pair's own NaN at a drafted position counts as the theta side's; past a row's drafts not.
    clean = logp.view(-1, V)
    bad_drafts = logp_drafts.clone()
    bad_drafts[1] = math.nan  # row 1 made no draft
    assert not choose(clean, clean, clean, drafts, bad_drafts, draft_len, sample, pair_drafts=True).nan.any()
    bad_drafts[0, 0, 3] = math.nan
    assert choose(clean, clean, clean, drafts, bad_drafts, draft_len, sample, pair_drafts=True).nan.tolist() == [
        [True, False],
        [False, False],
    ]
    assert not choose(clean, clean, clean, drafts, bad_drafts, draft_len, sample).nan.any(), "pi_theta drafting: its scores are checked"
