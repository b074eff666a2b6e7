"""pi_t's top-K at every emitted token (``teacher_topk``): what a float64 full forward gives, for
plain and speculative rounds, through refills (qstar_cli.distributions.token_choice.teacher_topk)."""

import copy

import numpy as np
import pytest
import torch

from qstar_cli.engine.samples import SampleRequest
from tests.helpers import conversations, make_sampler

K = 7


def float64_logp_t(loaded, prompt_ids, token_ids, vocab):
    """pi_t's log-probabilities at each response position, from one float64 forward."""
    model = copy.deepcopy(loaded.model).double()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits.log_softmax(-1)


@pytest.mark.parametrize("draft_k", [0, "auto"])
def test_stored_top_k_is_a_float64_full_forwards(spread_pair, draft_k):
    sampler = make_sampler(spread_pair, draft_k=draft_k, teacher_topk=K, max_new_tokens=10)
    requests = [SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(conversations(7))]
    results = [r for _, r in sampler.stream(requests, slots=3)]  # refills: rows join and leave the slots
    assert len(results) == 7
    for result in results:
        top = result.teacher_topk
        reference = float64_logp_t(spread_pair[1], result.prompt_ids_t, result.token_ids, sampler.vocab)
        assert top.ids.shape == top.logprobs.shape == (len(result.token_ids), K) and top.ids.dtype == np.int32
        values, ids = reference.topk(K + 1, dim=-1)
        for position in range(len(result.token_ids)):
            stored = set(top.ids[position].tolist())
            # Ids as a set; the K-th may tie with the (K+1)-th within float32 rounding.
            expected = set(ids[position, :K].tolist())
            if values[position, K - 1] - values[position, K] < 1e-4:
                expected = (expected - {ids[position, K - 1].item()}) | (stored - expected)
            assert stored == expected, (result.sample_idx, position)
            stored_logp = torch.from_numpy(top.logprobs[position]).double()
            assert torch.allclose(stored_logp, reference[position, top.ids[position].tolist()], atol=2e-4)
            assert (np.diff(top.logprobs[position]) <= 0).all(), "most likely first"
        tail = torch.log1p(-reference.gather(-1, torch.from_numpy(top.ids).long()).exp().sum(-1))
        assert torch.allclose(torch.from_numpy(top.tail).double(), tail, atol=1e-4), result.sample_idx
        # The per-token logp_t of the sampled token is the same distribution's.
        assert torch.allclose(
            torch.tensor(result.per_token["logp_t"]).double(),
            reference.gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0],
            atol=2e-4,
        )


def test_top_k_of_the_whole_vocabulary_leaves_no_tail_and_bad_settings_are_refused(pair):
    sampler = make_sampler(pair, teacher_topk=K, max_new_tokens=3)
    sampler.teacher_topk = sampler.vocab  # the whole vocabulary: the tail is empty, -inf and never NaN
    [result] = sampler.generate(conversations(1))
    assert np.isneginf(result.teacher_topk.tail).all() or (result.teacher_topk.tail < -10).all()
    assert not np.isnan(result.teacher_topk.logprobs).any()
    for bad in (-1, 65, 2.5, True):
        with pytest.raises(ValueError, match="teacher_topk must be an integer from 0"):
            make_sampler(pair, teacher_topk=bad)
    with pytest.raises(ValueError, match="needs diagnostics full"):
        make_sampler(pair, teacher_topk=K).generate(conversations(1), diagnostics="summary")
