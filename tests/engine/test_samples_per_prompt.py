"""Several responses per prompt (``--samples-per-prompt K``): order, independence, keys, resume, one prefill."""

import pytest
import torch

from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha
from qstar_cli.distributions.sampling import counter_key, counter_uniform, sample_tokens
from qstar_cli.engine.samples import SampleRequest, StreamStats
from tests.helpers import (
    CONVERSATIONS,
    PROMPTS,
    VALID,
    as_if_killed_after,
    assert_equals_full_forward,
    chi_square_pvalue,
    cli,
    full_forward_logps,
    make_sampler,
    one_line_error,
    paths,
    read_lines,
)


def requests_for(sampler, conversations, k, replay=None):
    out = []
    for row, conversation in enumerate(conversations):
        ids = sampler.encode_prompts(conversation)
        for response in range(k):
            known = None if replay is None else replay.get((row, response))
            out.append(SampleRequest(row, *ids, replay_tokens=known, response_idx=response))
    return out


def test_k_responses_in_row_major_order_in_both_files(base_args, tmp_path):
    out = tmp_path / "k.jsonl"
    result = cli(*base_args, "--output", str(out), "--samples-per-prompt", "4")
    assert result.exit_code == 0, result.output
    main, side = read_lines(paths(out)[0]), read_lines(paths(out)[1])
    expected = [(row, k) for row in VALID for k in range(4)]
    assert [(r["sample_idx"], r["response_idx"]) for r in main] == expected
    assert [(r["sample_idx"], r["response_idx"]) for r in side] == expected
    for i in range(0, len(main), 4):
        group = side[i : i + 4]
        assert len({tuple(r["per_token"]["token_id"]) for r in group}) > 1, "the 4 responses are not copies"
        assert all(r["prompt_ids_t"] == group[0]["prompt_ids_t"] for r in group)
        assert all(m["messages"][:-1] == PROMPTS[m["sample_idx"]]["messages"] for m in main[i : i + 4])


def test_every_response_equals_a_full_forward(spread_pair):
    sampler = make_sampler(spread_pair, max_new_tokens=30)
    results = list(sampler.stream(requests_for(sampler, CONVERSATIONS, 5), slots=4))
    assert sorted((r.sample_idx, r.response_idx) for _, r in results) == [(i, k) for i in range(3) for k in range(5)]
    for _, result in results:
        assert_equals_full_forward(spread_pair, sampler, result)


def test_the_first_tokens_of_many_responses_follow_q(sharp_pair):
    sampler = make_sampler(sharp_pair, max_new_tokens=1)
    n = 3000
    stats = StreamStats()
    results = [r for _, r in sampler.stream(requests_for(sampler, CONVERSATIONS[1:2], n), slots=1000, stats=stats)]
    assert stats.prompts_prefilled == 3, "one prefill per chunk of 1000 responses"
    r = results[0]
    logp_theta = full_forward_logps(sharp_pair[0], r.prompt_ids_theta, r.token_ids, sampler.vocab)
    logp_t = full_forward_logps(sharp_pair[1], r.prompt_ids_t, r.token_ids, sampler.vocab)
    q = mixture_logprobs(logp_theta, logp_t, solve_alpha(logp_theta, logp_t)).exp()[0]
    counts = torch.bincount(torch.tensor([x.token_ids[0] for x in results]), minlength=sampler.vocab)
    assert q.max() > 0.05
    assert chi_square_pvalue(counts, q) > 1e-3
    # Power: copies of one draw would put all the mass on one token.
    assert chi_square_pvalue(counts, logp_theta.exp()[0]) < 1e-6


def test_one_response_draws_with_the_keys_of_before(pair):
    """K = 1 (response 0) keys each draw by (seed, row, step) exactly as the release before K existed."""
    assert counter_key(torch.tensor([5]), torch.tensor([0])).item() == 5
    sampler = make_sampler(pair, max_new_tokens=10, seed=3)
    results = sampler.generate(CONVERSATIONS, sample_indices=[7, 8, 9])
    for r in results:
        logp_theta = full_forward_logps(pair[0], r.prompt_ids_theta, r.token_ids, sampler.vocab)
        logp_t = full_forward_logps(pair[1], r.prompt_ids_t, r.token_ids, sampler.vocab)
        logp_q = mixture_logprobs(logp_theta, logp_t, solve_alpha(logp_theta, logp_t))
        steps = torch.arange(len(r.token_ids))
        u = counter_uniform(3, torch.full_like(steps, r.sample_idx), steps)
        assert sample_tokens(logp_q, u).tolist() == r.token_ids


def test_resume_inside_a_prompts_responses_is_bit_identical(spread_pair):
    sampler = make_sampler(spread_pair, max_new_tokens=30)
    full = {(r.sample_idx, r.response_idx): r for _, r in sampler.stream(requests_for(sampler, CONVERSATIONS, 3), slots=4)}
    order = [(row, k) for row in range(3) for k in range(3)]
    for done in (2, 4, 7):  # inside row 0's, row 1's and row 2's responses
        known = {key: len(full[key].token_ids) for key in order[:done]}
        resumed = {(r.sample_idx, r.response_idx): r for _, r in sampler.stream(requests_for(sampler, CONVERSATIONS, 3, known), slots=4)}
        assert sorted(resumed) == order[done:]
        for key, result in resumed.items():
            assert result.per_token == full[key].per_token, (key, done)


def test_cli_resume_inside_a_prompts_responses_is_byte_identical(base_args, tmp_path):
    ref, out = tmp_path / "ref.jsonl", tmp_path / "cut.jsonl"
    assert cli(*base_args, "--output", str(ref), "--samples-per-prompt", "3").exit_code == 0
    assert cli(*base_args, "--output", str(out), "--samples-per-prompt", "3").exit_code == 0
    # As if killed after 5 samples (row 1's second response), with a torn line in the sidecar.
    for path in paths(out)[:2]:
        lines = open(path, "rb").read().splitlines(keepends=True)
        open(path, "wb").write(b"".join(lines[:5]) + (lines[5][:40] if str(path).endswith("diagnostics.jsonl") else b""))
    as_if_killed_after(out, 5)
    result = cli(*base_args, "--output", str(out), "--samples-per-prompt", "3")
    assert result.exit_code == 0, result.output
    assert "resuming: 5 of 24" in result.output
    for a, b in zip(paths(ref)[:2], paths(out)[:2]):
        assert open(a, "rb").read() == open(b, "rb").read()
    one_line_error(cli(*base_args, "--output", str(out), "--samples-per-prompt", "2"), "samples_per_prompt (3 -> 2)")


def test_each_prompt_is_prefilled_once_per_model(pair):
    sampler = make_sampler(pair, max_new_tokens=6)
    prefilled_rows = {id(pair[0].model): 0, id(pair[1].model): 0}

    def count(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # a prefill (decode steps feed one token per row)
            prefilled_rows[id(module)] += ids.shape[0]

    hooks = [p.model.register_forward_pre_hook(count, with_kwargs=True) for p in pair]
    try:
        results = list(sampler.stream(requests_for(sampler, CONVERSATIONS, 4), slots=8))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(results) == 12
    assert prefilled_rows == {id(pair[0].model): 3, id(pair[1].model): 3}


def test_analyze_reports_the_spread_of_log_weights_within_prompts(base_args, tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from qstar_cli.cli import app

    out = tmp_path / "k.jsonl"
    assert cli(*base_args, "--output", str(out), "--samples-per-prompt", "3").exit_code == 0
    side = read_lines(paths(out)[1])
    result = CliRunner().invoke(app, ["analyze", paths(out)[1], "--json", "--export-weights", str(tmp_path / "w.jsonl")])
    assert result.exit_code == 0, result.output
    spread = json.loads(result.stdout)["per_prompt"]
    by_prompt: dict[int, list[float]] = {}
    for r in side:
        by_prompt.setdefault(r["sample_idx"], []).append(r["logp_theta_sum"] - r["logp_q_sum"])
    log_w = np.concatenate(list(by_prompt.values()))
    within = sum(((np.array(v) - np.mean(v)) ** 2).sum() for v in by_prompt.values())
    assert spread["prompts"] == len(VALID) and spread["responses_per_prompt"] == 3
    assert spread["within_std_mean"] == pytest.approx(np.mean([np.std(v) for v in by_prompt.values()]), rel=1e-9)
    assert spread["within_share"] == pytest.approx(within / ((log_w - log_w.mean()) ** 2).sum(), rel=1e-9)
    weights = read_lines(tmp_path / "w.jsonl")
    assert [(w["sample_idx"], w["response_idx"]) for w in weights] == [(r["sample_idx"], r["response_idx"]) for r in side]


def test_one_index_for_different_prompts_shares_no_prefill(spread_pair):
    """Through the Python API a caller may key two different prompts alike: nothing is copied between them."""
    sampler = make_sampler(spread_pair, max_new_tokens=8)
    results = sampler.generate(CONVERSATIONS, sample_indices=[4, 4, 4], batch_size=3)
    assert [r.prompt_ids_t for r in results] == [sampler.encode_prompts(c)[1] for c in CONVERSATIONS]
    for result in results:
        assert_equals_full_forward(spread_pair, sampler, result)
