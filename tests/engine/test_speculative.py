"""Speculative q* sampling: the acceptance rule, its distribution, per-row rollback, edge cases, CLI."""

import copy
import json

import numpy as np
import pytest
import torch

from qstar_cli.distributions import token_choice
from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha
from qstar_cli.distributions.sampling import (
    SamplingParams,
    sample_tokens,
    sampling_logprobs,
)
from qstar_cli.distributions.speculative import (
    auto_draft_len,
    expected_tokens,
    forward_cost,
    residual_logprobs,
    round_costs,
    verify_drafts,
)
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.engine.samples import SampleRequest, StreamStats
from qstar_cli.testing.tiny import build_tiny_model
from tests.helpers import (
    CONVERSATIONS,
    SPREAD_EOS,
    assert_equals_full_forward,
    chi_square_pvalue,
    cli,
    conversations,
    full_forward_logps,
    make_sampler,
    one_line_error,
    paths,
    read_lines,
    spread_sampler,
)

N_DRAWS = 20000


# --- The acceptance rule as a pure function ------------------------------------------------------


def random_logp(shape, seed, zeros=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2
    if zeros:  # tokens the distribution cannot emit
        logits[..., :zeros] = -torch.inf
    return logits.log_softmax(-1)


def test_residual_equals_a_float64_reference():
    r, p = random_logp((5, 30), 0, zeros=3), random_logp((5, 30), 1)
    p[:, 10:12] = -torch.inf  # tokens the drafter cannot propose
    expected = (r.exp() - p.exp()).clamp_min(0)
    expected = (expected / expected.sum(-1, keepdim=True)).log()
    got = residual_logprobs(r.float(), p.float())
    assert not got.isnan().any()
    assert torch.allclose(got.double().exp(), expected.exp(), atol=1e-6)
    # r == p: no residual mass; r itself comes back (no NaN).
    assert torch.equal(residual_logprobs(r, r), r)


def simulate_first_token(logp_r, logp_p, seed, rule=verify_drafts):
    """The first token one round emits, for N_DRAWS rows sharing one r (2 positions) and p (1 draft)."""
    gen = torch.Generator().manual_seed(seed)
    target = logp_r.float().expand(N_DRAWS, 2, -1)
    draft = logp_p.float().expand(N_DRAWS, 1, -1)
    drafts = sample_tokens(draft[:, 0], torch.rand(N_DRAWS, generator=gen))[:, None]
    accepted, logp_last = rule(target, draft, drafts, torch.ones(N_DRAWS, dtype=torch.long), torch.rand(N_DRAWS, 1, generator=gen))
    last = sample_tokens(logp_last, torch.rand(N_DRAWS, generator=gen))
    return torch.where(accepted > 0, drafts[:, 0], last), accepted


def accept_everything(logp_target, logp_draft, drafts, draft_len, u_accept):
    """A wrong rule (the test's power check): every draft accepted."""
    return verify_drafts(logp_target, logp_draft, drafts, draft_len, torch.zeros_like(u_accept))


def test_the_first_token_of_a_round_follows_r_and_acceptance_is_one_minus_tv():
    r, p = random_logp((2, 12), 2, zeros=2), random_logp((12,), 3)
    tokens, accepted = simulate_first_token(r, p, seed=0)
    counts = torch.bincount(tokens, minlength=12)
    assert chi_square_pvalue(counts, r[0].exp()) > 1e-3
    assert counts[:2].sum() == 0, "a token r cannot emit is never emitted"
    one_minus_tv = torch.minimum(r[0].exp(), p.exp()).sum().item()
    assert abs(accepted.double().mean().item() - one_minus_tv) < 4 * (0.25 / N_DRAWS) ** 0.5
    # Power: accepting every draft gives p, which the same test rejects.
    wrong, _ = simulate_first_token(r, p, seed=0, rule=accept_everything)
    assert chi_square_pvalue(torch.bincount(wrong, minlength=12), r[0].exp()) < 1e-6


def test_draft_lengths_cap_acceptance_and_choose_the_last_distribution():
    r, p = random_logp((3, 3, 6), 4), random_logp((3, 2, 6), 5)
    drafts = torch.tensor([[1, 2], [3, 4], [5, 0]])
    draft_len = torch.tensor([0, 1, 2])
    u = torch.full((3, 2), 1e-9)  # accepts every draft a row made
    accepted, logp_last = verify_drafts(r, p, drafts, draft_len, u)
    assert accepted.tolist() == [0, 1, 2]
    assert torch.equal(logp_last, r[torch.arange(3), accepted])
    # Without drafts at all: plain sampling's distribution.
    accepted, logp_last = verify_drafts(r[:, :1], p[:, :0], drafts[:, :0], torch.zeros(3, dtype=torch.long), u[:, :0])
    assert accepted.tolist() == [0, 0, 0] and torch.equal(logp_last, r[:, 0])


def test_greedy_accepts_exactly_the_argmax():
    point = torch.full((2, 2, 5), -torch.inf)
    point[:, :, 3] = 0.0  # r: argmax 3 at both positions
    draft = torch.full((2, 1, 5), -torch.inf)
    draft[0, 0, 3] = draft[1, 0, 1] = 0.0
    accepted, logp_last = verify_drafts(point, draft, torch.tensor([[3], [1]]), torch.ones(2, dtype=torch.long), torch.full((2, 1), 0.999))
    assert accepted.tolist() == [1, 0]
    assert sample_tokens(logp_last, torch.full((2,), 0.5)).tolist() == [3, 3]


def test_auto_draft_length_maximises_the_batchs_tokens_per_cost():
    cost = np.array([2.0 + 1.2 * k for k in range(9)])  # a drafter 5x cheaper than the verifier
    cases = [  # (accepted, tested, room) per row
        ([0.0], [40.0], [8]),  # rejects everything: one draft (to keep measuring)
        ([95.0], [100.0], [8]),
        ([200.0], [200.0], [8]),  # accepts everything: the longest
        ([200.0], [200.0], [2]),  # ... that its budget leaves room for
        ([95.0, 0.0, 60.0], [100.0, 40.0, 100.0], [8, 8, 1]),
    ]
    got = [auto_draft_len(*(np.array(x) for x in case), cost) for case in cases]
    for (accepted, tested, room), k in zip(cases, got):
        a = (np.array(accepted) + 3.2) / (np.array(tested) + 4.0)
        rates = [sum(expected_tokens(a, np.minimum(j, np.array(room)))) / cost[j] for j in range(1, 9)]
        assert k == int(np.argmax(rates)) + 1
    assert got[0] == 1 and got[1] >= 4 and got[2] == 8 and got[3] <= 2


def test_forward_costs_rise_with_tokens_and_rounds_with_drafts():
    tokens = np.array([1, 2, 8, 16, 32, 64, 128])
    for device in ("cpu", "cuda", "mps"):
        cost = forward_cost(tokens, device)
        assert cost[0] == 1 and np.all(np.diff(cost) >= 0)
        rounds = round_costs(1.0, 5.0, 4, device)
        assert np.all(np.diff(rounds) > 0)
    # A drafter 5x cheaper at batch 1 on a CPU: k drafts cost k + 1 of its forwards and one verifying forward.
    assert np.allclose(round_costs(1.0, 5.0, 1, "cpu")[:3], [1 + 5, 2 + 5 * 1.5, 3 + 5 * 1.5])


# --- The sampler ---------------------------------------------------------------------------------


def q_of(pair, sampler, prompts, tokens):
    """The distribution sampled (q, tempered and truncated) at the positions after ``tokens``, from a
    full forward of each model, float64, ``[len(tokens) + 1, V]``."""
    logp_theta = full_forward_logps(pair[0], prompts[0], tokens + [0], sampler.vocab).double()
    logp_t = full_forward_logps(pair[1], prompts[1], tokens + [0], sampler.vocab).double()
    return sampling_logprobs(mixture_logprobs(logp_theta, logp_t, solve_alpha(logp_theta, logp_t)), sampler.sampling).exp()


@pytest.mark.parametrize(
    ("drafter", "sampling"),
    [("theta", SamplingParams()), ("pair", SamplingParams()), ("theta", SamplingParams(temperature=1.3, top_k=40))],
    ids=["theta", "pair", "theta-tempered"],
)
def test_first_and_second_tokens_follow_q(sharp_pair, drafter, sampling, monkeypatch):
    """With 2 drafts and 3 tokens the first round drafts positions 1 and 2; position 2's marginal is
    sum_x q1(x) q2(.|x), over the first tokens that are not an EOS."""
    # The pair drafter is the two models swapped: a mixture q' unlike q.
    draft_pair = (sharp_pair[1], sharp_pair[0]) if drafter == "pair" else None
    sampler = make_sampler(sharp_pair, max_new_tokens=3, draft_k=2, draft_pair=draft_pair, sampling=sampling)
    prompts = sampler.encode_prompts(CONVERSATIONS[1])
    n = 3000
    requests = [SampleRequest(0, *prompts, response_idx=i) for i in range(n)]

    def draws():
        stats = StreamStats()
        results = [r for _, r in sampler.stream(requests, slots=1000, stats=stats)]
        assert all(r.draft_lengths[0] == 2 for r in results), "both positions lie in the first draft window"
        first = torch.tensor([r.token_ids[0] for r in results])
        second = torch.tensor([r.token_ids[1] for r in results if len(r.token_ids) > 1])
        vocab = sampler.vocab
        return torch.bincount(first, minlength=vocab), torch.bincount(second, minlength=vocab), stats

    first, second, stats = draws()
    assert 0.05 < stats.accepted / stats.tested < 0.98, "some drafts rejected, some accepted"
    q = q_of(sharp_pair, sampler, prompts, [])
    q2 = torch.stack([q_of(sharp_pair, sampler, prompts, [x])[1] for x in range(sampler.vocab)])
    continues = torch.tensor([x not in sampler.eos for x in range(sampler.vocab)], dtype=torch.float64)
    marginal = (q[0] * continues) @ q2
    marginal /= marginal.sum()
    assert chi_square_pvalue(first, q[0]) > 1e-3
    assert chi_square_pvalue(second, marginal) > 1e-3
    # Power: a wrong acceptance rule (every draft accepted) fails the same tests.
    monkeypatch.setattr(token_choice, "verify_drafts", accept_everything)
    wrong_first, wrong_second, _ = draws()
    assert chi_square_pvalue(wrong_first, q[0]) < 1e-6
    assert chi_square_pvalue(wrong_second, marginal) < 1e-6


@pytest.mark.parametrize("draft_k", [3, "auto"])
def test_every_number_equals_a_full_forward_after_refills(spread_pair, draft_k):
    sampler = spread_sampler(spread_pair, draft_k=draft_k)
    stats = StreamStats()
    requests = [SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(conversations(14, long_every=7))]
    finished = [r for _, r in sampler.stream(requests, slots=3, stats=stats)]
    assert stats.prefills > 4 and 0 < stats.accepted < stats.tested <= stats.drafted
    lengths = [len(r.token_ids) for r in finished]
    assert len(set(lengths)) > 5 and max(lengths) == 40
    for result in finished:
        assert_equals_full_forward(spread_pair, sampler, result)
        stops = [t in sampler.eos for t in result.token_ids]
        assert stops == [False] * (len(stops) - 1) + [result.finish_reason == "stop"]
        assert sum(result.round_tokens) == len(result.token_ids)
        produced = np.cumsum([0] + result.round_tokens[:-1])
        # Never more drafts than leave room for the round's last token within max_new_tokens.
        assert all(k <= 40 - done - 1 for k, done in zip(result.draft_lengths, produced))


def test_rows_keep_their_own_accepted_lengths(spread_pair):
    """In one batch, rows accept different numbers of drafts; each rolls back its own: every sample
    is the one it is when generated alone."""
    sampler = spread_sampler(spread_pair, draft_k=4)
    convs = conversations(6)
    together = sampler.generate(convs, batch_size=6)
    alone = [sampler.generate([c], sample_indices=[i])[0] for i, c in enumerate(convs)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    first_rounds = {r.round_tokens[0] for r in together}
    assert len(first_rounds) > 1, "rows of one round accepted different numbers of drafts"


def test_eos_and_max_new_tokens_inside_a_draft(spread_pair):
    sampler = spread_sampler(spread_pair, draft_k=4, max_new_tokens=7)
    results = sampler.generate(conversations(24), batch_size=8)
    cut_by_eos = [r for r in results if r.finish_reason == "stop" and r.round_tokens[-1] < r.draft_lengths[-1] + 1]
    assert cut_by_eos, "an EOS was an accepted draft: the round stopped there"
    assert all(len(r.token_ids) <= 7 for r in results)
    at_cap = [r for r in results if r.finish_reason == "length"]
    assert at_cap and all(len(r.token_ids) == 7 for r in at_cap)
    # 7 tokens in rounds of at most 5: the last round drafted fewer than 4 to end at the cap.
    assert any(r.draft_lengths[-1] < 4 for r in at_cap)
    for result in results:
        assert_equals_full_forward(spread_pair, sampler, result)


def test_identical_models_accept_every_draft(tiny_tokenizer, tiny_models):
    model = LoadedModel(tiny_models[0], tiny_tokenizer, "theta")
    sampler = DualModelSampler(model, model, theta_format="chat", t_format="chat", max_new_tokens=17, draft_k=3)
    stats = StreamStats()
    results = [
        r for _, r in sampler.stream([SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(CONVERSATIONS)], 3, stats=stats)
    ]
    assert stats.accepted == stats.tested == stats.drafted > 0
    for r in results:
        full = len(r.token_ids) if r.finish_reason == "length" else len(r.token_ids) - 1
        assert r.round_tokens[: full // 4] == [4] * (full // 4)


def negated(loaded):
    """The model with its output head negated: its likeliest token is the other's least likely."""
    model = copy.deepcopy(loaded.model)
    model.lm_head.weight = torch.nn.Parameter(-model.lm_head.weight.detach().clone())
    return LoadedModel(model, loaded.tokenizer, "negated " + loaded.name)


@pytest.mark.parametrize("drafter", ["theta", "none accepted"])
def test_greedy_speculative_equals_greedy_plain(spread_pair, drafter):
    greedy = SamplingParams(temperature=0)
    convs = conversations(8)
    plain = spread_sampler(spread_pair, sampling=greedy).generate(convs, batch_size=4)
    draft_pair = tuple(negated(m) for m in spread_pair) if drafter == "none accepted" else None
    sampler = spread_sampler(spread_pair, sampling=greedy, draft_k=3, draft_pair=draft_pair)
    stats = StreamStats()
    speculative = [
        r
        for _, r in sorted(
            sampler.stream([SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(convs)], 4, stats=stats), key=lambda x: x[0]
        )
    ]
    assert [r.token_ids for r in speculative] == [r.token_ids for r in plain]
    if drafter == "none accepted":
        assert stats.tested > 0 and stats.accepted == 0
    else:
        assert stats.accepted > 0


@pytest.mark.parametrize(("drafter", "responses"), [("theta", 1), ("pair", 2)])
def test_replayed_speculative_samples_leave_the_others_bit_identical(spread_pair, drafter, responses):
    draft_pair = tuple(negated(m) for m in spread_pair) if drafter == "pair" else None
    sampler = spread_sampler(spread_pair, draft_k="auto", draft_pair=draft_pair)
    prompts = [sampler.encode_prompts(c) for c in conversations(12 // responses)]
    requests = [SampleRequest(i, *p, response_idx=k) for i, p in enumerate(prompts) for k in range(responses)]
    whole = dict(sampler.stream(requests, slots=3))
    done = 5  # inside a prompt's responses when there are 2
    replayed = [
        SampleRequest(r.sample_idx, r.prompt_ids_theta, r.prompt_ids_t, replay_tokens=len(whole[i].token_ids),
                      response_idx=r.response_idx, replay_rounds=(whole[i].draft_lengths, whole[i].round_tokens))
        if i < done else r
        for i, r in enumerate(requests)
    ]  # fmt: skip
    resumed = dict(sampler.stream(replayed, slots=3))
    assert sorted(resumed) == list(range(done, 12))
    for i, result in resumed.items():
        assert result.token_ids == whole[i].token_ids
        assert result.per_token == whole[i].per_token
    # Replay is needed: started afresh, the same samples see other batches and round differently.
    afresh = dict(sampler.stream(requests[done:], slots=3))
    assert any(afresh[i - done].per_token != whole[i].per_token for i in range(done, 12))


def test_the_pair_itself_as_drafter_accepts_nearly_every_draft(spread_pair):
    """q' = q up to float rounding: any drift of the draft caches from the accepted tokens would show."""
    sampler = spread_sampler(spread_pair, draft_k=3, draft_pair=spread_pair)
    stats = StreamStats()
    results = [
        r for _, r in sampler.stream([SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(conversations(8))], 4, stats=stats)
    ]
    assert stats.tested > 100 and stats.accepted >= 0.99 * stats.tested
    for result in results:
        assert_equals_full_forward(spread_pair, sampler, result)


def test_a_draft_models_context_limits_its_side(spread_pair, tiny_tokenizer):
    short = LoadedModel(build_tiny_model(tiny_tokenizer, seed=1, sharpness=4.0, extra_eos=SPREAD_EOS), tiny_tokenizer, "short")
    short.model.config.max_position_embeddings = 64
    sampler = spread_sampler(spread_pair, draft_k=2, draft_pair=(short, spread_pair[1]))
    assert sampler.context_limits == (64, 1024)


# --- The command line ----------------------------------------------------------------------------


def test_manifest_and_sidecar_record_the_rounds(base_args, tmp_path):
    out = tmp_path / "s.jsonl"
    result = cli(*base_args, "--draft-k", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    main, diagnostics, meta = paths(out)
    session = json.loads(open(meta).read())["sessions"][-1]
    spec = session["speculative"]
    assert 0 < spec["acceptance_rate"] <= 1 and 0 < spec["mean_accepted_length"] <= 2
    assert spec["verify_forwards_per_token"] < 1
    records = read_lines(diagnostics)
    assert all(sum(r["round_tokens"]) == r["num_tokens"] for r in records)
    assert all(len(r["per_token"]["token_id"]) == r["num_tokens"] for r in records)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--draft-k", "-1"], "--draft-k must be an integer from 0 (off) to 32, or auto, got -1"),
        (["--draft-k", "two"], "--draft-k must be an integer from 0 (off) to 32, or auto, got two"),
        (["--draft-k", "33"], "--draft-k must be an integer from 0 (off) to 32, or auto, got 33"),
        (["--draft-k", "2.5"], "got 2.5"),
        (["--draft-k", "2", "--draft", "small"], "--draft must be one of theta, pair, got 'small'"),
        (["--draft-k", "2", "--draft", "pair"], "--draft pair needs both --draft-model-theta and --draft-model-t"),
        (["--draft-k", "2", "--draft-model-theta", "x", "--draft-model-t", "y"], "name a draft model: add --draft pair"),
        (["--draft-k", "2", "--draft-model-t", "y"], "--draft-model-t names a draft model: add --draft pair"),
        (["--draft", "pair", "--draft-model-theta", "x", "--draft-model-t", "y"], "--draft pair drafts only with --draft-k K > 0"),
        (["--draft-k", "2", "--draft", "pair", "--draft-model-theta", "/no/such/dir", "--draft-model-t", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_draft_settings_exit_2_with_one_line(base_args, tmp_path, flags, message):
    one_line_error(cli(*base_args, *flags, "--output", str(tmp_path / "x.jsonl")), message)


@pytest.mark.parametrize(
    ("first", "then", "change"), [(["--draft-k", "2"], [], "draft_k (2 -> 0)"), ([], ["--draft-k", " AUTO"], "draft_k (0 -> 'auto')")]
)
def test_a_resume_keeps_the_draft_settings(base_args, tmp_path, first, then, change):
    out = tmp_path / "r.jsonl"
    assert cli(*base_args, *first, "--num-samples", "2", "--output", str(out)).exit_code == 0
    before = [open(p, "rb").read() for p in paths(out)]
    one_line_error(cli(*base_args, *then, "--output", str(out)), change)
    assert [open(p, "rb").read() for p in paths(out)] == before
