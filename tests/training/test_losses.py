"""The distillation losses of WeightedSFTTrainer as tensor maths, against float64 hand computations,
and the placing of per-token columns at TRL's label positions. Torch alone: no TRL, no model (the
trainer itself: test_weighted_sft.py)."""

import math

import pytest
import torch

from qstar_cli.training.losses import reverse_kl_loss, to_label_positions, topk_forward_kl
from tests.helpers import bucket_kl, teacher_topk

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reverse_kl_value_and_gradient_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True)
    sampled = torch.tensor([0, 3, 1, 4, 2, 3])
    logp_t = torch.randn(6, generator=gen, dtype=F64) - 2
    logp_theta = logits.log_softmax(-1)[torch.arange(6), sampled]
    log_ratio = torch.tensor([0.5, -0.3, 4.0, -1.0, 0.0, 2.5], dtype=F64)  # exp(4) and exp(2.5) pass the clip of 10
    logp_q = logp_theta.detach() - log_ratio
    loss = reverse_kl_loss(logp_theta, logp_t, logp_q, ratio_clip=10.0)
    loss.sum().backward()
    p = logits.detach().softmax(-1)
    for i, y in enumerate(sampled.tolist()):
        ratio = min(math.exp(log_ratio[i].item()), 10.0)
        log_ratio_to_teacher = math.log(p[i, y].item()) - logp_t[i].item()
        assert loss[i].item() == pytest.approx(ratio * log_ratio_to_teacher, rel=1e-12)
        # d/dz_j of -sg(logp_t - logp_theta) * logp_theta * ratio = ratio * (logp_theta - logp_t) * (1[j = y] - p_j)
        by_hand = [ratio * log_ratio_to_teacher * ((j == y) - p[i, j].item()) for j in range(5)]
        assert logits.grad[i].tolist() == pytest.approx(by_hand, rel=1e-12, abs=1e-15)
    # Padding: zeros everywhere give a zero loss and a zero gradient.
    zeros = torch.zeros(3, dtype=F64, requires_grad=True)
    padded = reverse_kl_loss(zeros, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), 10.0)
    padded.sum().backward()
    assert padded.tolist() == [0.0] * 3 and zeros.grad.tolist() == [0.0] * 3


def test_topk_forward_kl_value_and_gradient_by_hand():
    gen = torch.Generator().manual_seed(1)
    vocab, k = 7, 3
    logits = torch.randn(4, vocab, generator=gen, dtype=F64, requires_grad=True)
    teacher_logits = 2 * torch.randn(4, vocab, generator=gen, dtype=F64)
    teacher_logits[3, 2:] = float("-inf")  # mass on 2 ids only: a -inf log-prob among the K and a -inf tail
    ids, logprobs, tail = teacher_topk(teacher_logits.log_softmax(-1), k)
    assert logprobs[3, -1] == tail[3] == float("-inf")
    kl = topk_forward_kl(logits.log_softmax(-1), ids, logprobs, tail)
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    p = logits.detach().softmax(-1).tolist()
    for i in range(4):
        assert kl[i].item() == pytest.approx(bucket_kl(p[i], ids[i].tolist(), logprobs[i].tolist(), tail[i].item()), rel=1e-12)
        # d KL / d z_j = p_theta(j) - P_t(B) p_theta(j) / P_theta(B), B the bucket of j (its own id, or the tail)
        bucket_of = {j: [j] for j in ids[i].tolist()}
        rest = [j for j in range(vocab) if j not in bucket_of]
        teacher_mass = dict(zip(ids[i].tolist(), logprobs[i].exp().tolist())) | {j: tail[i].exp().item() for j in rest}
        by_hand = [p[i][j] - teacher_mass[j] * p[i][j] / sum(p[i][m] for m in bucket_of.get(j, rest)) for j in range(vocab)]
        assert logits.grad[i].tolist() == pytest.approx(by_hand, rel=1e-10, abs=1e-14)
    # With K = V - 1 the tail is one id, and the K + 1 buckets are the whole distribution: the full KL.
    teacher_logp = teacher_logits[:3].log_softmax(-1)
    full = (teacher_logp.exp() * (teacher_logp - logits[:3].log_softmax(-1))).sum(-1)
    assert topk_forward_kl(logits[:3].log_softmax(-1), *teacher_topk(teacher_logp, vocab - 1)).tolist() == pytest.approx(
        full.tolist(), rel=1e-12
    )


def test_per_token_values_land_on_the_label_positions():
    labels = torch.tensor([
        [-100, -100, 5, 6, 7, -100],  # prompt of 2, response of 3, right padding
        [-100, 8, 9, -100, -100, -100],
        [10, 11, 12, 13, 14, 15],  # no prompt: the first token is never scored
        [-100, -100, -100, -100, 16, 17],  # left padding or a long prompt; its response cut by max_length
    ])  # fmt: skip
    values = [torch.tensor(v, dtype=torch.float32) for v in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14])]
    expected = [[0, 1, 2, 3, 0], [4, 5, 0, 0, 0], [7, 8, 9, 10, 11], [0, 0, 0, 12, 13]]
    assert to_label_positions(values, labels, "logp_t").tolist() == expected
    # Rows of K values (the teacher's top-K) move as one.
    pairs = to_label_positions([torch.stack([v, -v], -1) for v in values], labels, "teacher_topk_logprobs")
    assert pairs.shape == (4, 5, 2) and pairs[..., 0].tolist() == expected and (pairs[..., 1] == -pairs[..., 0]).all()
    with pytest.raises(ValueError, match="'logp_q' has fewer values than the row has completion tokens"):
        to_label_positions([values[0], values[0][:1], values[2], values[3]], labels, "logp_q")
