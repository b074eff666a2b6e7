"""The distillation losses of ``WeightedSFTTrainer`` as pure tensor functions, and the placing of a
set's per-completion-token columns at TRL's label positions.

Everything is per token and elementwise over leading dimensions; log-probabilities are natural logs.
No model and no TRL here, so each function is tested against a hand computation on made-up tensors.
"""

from __future__ import annotations

import torch

#: ``ratio_clip``'s default: the per-token importance ratio pi_theta / q is truncated at 10, as in
#: ACER's truncated importance sampling (Wang et al. 2017).
RATIO_CLIP = 10.0


def reverse_kl_loss(logp_theta: torch.Tensor, logp_t: torch.Tensor, logp_q: torch.Tensor, ratio_clip: float) -> torch.Tensor:
    """On-policy distillation on tokens drawn from q: per token, ``r * (logp_theta - logp_t)`` in value
    and ``-r * sg(logp_t - logp_theta) * grad logp_theta`` in gradient.

    ``logp_theta`` is the policy being trained's log-prob of the sampled token, with its gradient;
    ``logp_t`` and ``logp_q`` are the teacher's and the sampler q's, stored at generation time.
    ``sum_y pi_theta(y) (logp_theta(y) - logp_t(y)) grad logp_theta(y)`` is the gradient of the
    reverse KL(pi_theta || pi_t) at a position, so a token drawn from q is importance-weighted by
    ``r = min(exp(sg(logp_theta) - logp_q), ratio_clip)``:

    * the ratio uses the current policy, not the ``logp_theta`` stored at generation: the gradient is
      the current policy's, and the set is trained on for many steps, after the first of which the
      stored value is some earlier policy's (at the first step the two agree);
    * it is detached: a weight on the sample, not part of the objective;
    * it is truncated at ``ratio_clip`` (truncated importance sampling): a token q rarely draws but
      pi_theta favours would otherwise take an unbounded weight, and the gradient's variance grows
      with the largest weight. Since q holds pi_theta^alpha, a per-token ratio of 10 already means
      the two models disagree sharply about that token, so the typical ratios, spread around 1,
      stay unbiased.

    The value ``r * (logp_theta - logp_t)`` is the importance-sampled (k1) estimate of the
    reverse KL, so the logged loss reads as a KL; it differs from ``-r * sg(logp_t - logp_theta) *
    logp_theta`` by a term without gradient. Zeros in all three (padding) give zero.
    """
    logp_theta_now = logp_theta.detach()
    ratio = (logp_theta_now - logp_q).exp().clamp(max=ratio_clip)  # exp(+large) = inf, clamped
    log_ratio_to_teacher = logp_theta_now - logp_t
    # 1 + logp_theta - sg(logp_theta) is 1 in value and carries grad logp_theta.
    return ratio * log_ratio_to_teacher * (1 + logp_theta - logp_theta_now)


def topk_forward_kl(
    logp_theta: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor
) -> torch.Tensor:
    """KL(pi_t || pi_theta) at each position, over pi_t's K stored ids and one bucket for the rest.

    ``logp_theta``: pi_theta's log-probs over the whole vocabulary, ``[..., V]``; ``teacher_ids`` and
    ``teacher_logprobs``: pi_t's K most likely ids and their log-probs, ``[..., K]``;
    ``teacher_tail``: log of pi_t's mass outside them, ``[...]``. Returns ``[...]``::

        sum_k p_t(k) (log p_t(k) - log p_theta(k)) + P_t(tail) (log P_t(tail) - log P_theta(tail))

    with ``P_theta(tail)`` pi_theta's mass outside the K ids. The tail is a bucket of its own rather
    than the K renormalised: this is then the exact KL between the two distributions coarsened to
    K + 1 outcomes (a lower bound on the full KL, zero only when pi_theta gives each of the K ids
    and the rest together pi_t's mass). Renormalising over the K would ignore how much pi_theta
    puts outside them, or, against unrenormalised pi_theta, push all of its mass into the K, a
    sharper distribution than pi_t's. Entries of mass 0 (a ``-inf`` tail when the K hold all of
    pi_t's mass, a ``-inf`` log-prob) add 0, with a zero gradient, never NaN.
    """
    theta_topk = logp_theta.gather(-1, teacher_ids)
    # pi_theta's tail as a log-sum-exp over the other ids: exact, where 1 - sum(top K) would cancel.
    theta_tail = logp_theta.scatter(-1, teacher_ids, float("-inf")).logsumexp(-1)
    teacher = torch.cat([teacher_logprobs, teacher_tail[..., None]], -1)
    theta = torch.cat([theta_topk, theta_tail[..., None]], -1)
    has_mass = teacher > float("-inf")
    teacher = torch.where(has_mass, teacher, 0.0)  # a finite stand-in, so no inf reaches the backward pass
    return torch.where(has_mass, teacher.exp() * (teacher - theta), 0.0).sum(-1)


def to_label_positions(per_token: list[torch.Tensor], labels: torch.Tensor, column: str) -> torch.Tensor:
    """Each row's per-completion-token values placed where TRL's fused LM head scores them.

    ``per_token[i]``: row i's values, ``[n_i, ...]``, one per completion token in order;
    ``labels``: the batch's labels ``[batch, length]``, -100 off the completion. TRL scores the
    label at position j + 1 from position j, so its per-token outputs are ``[batch, length - 1]``;
    the k-th label of a row, at position p, is scored at p - 1 and takes the row's k-th value. The
    result is ``[batch, length - 1, ...]``, zero where no label is scored. Padding, on either side,
    carries label -100 and is skipped. A row cut by ``max_length`` (TRL keeps the start) has fewer
    labels than values and uses the first; a row with more labels than values is a ``ValueError``
    naming ``column``.
    """
    is_label = labels != -100
    lengths = torch.tensor([len(values) for values in per_token])
    if (is_label.sum(1) > lengths).any():
        raise ValueError(f"a row's {column!r} has fewer values than the row has completion tokens (it needs one per token)")
    padded = torch.nn.utils.rnn.pad_sequence(per_token, batch_first=True)  # [batch, max n_i, ...]
    # The rank among its row's labels, counted from position 0: a label there (no prompt) is never
    # scored, and its value is skipped.
    rank = is_label.cumsum(1)[:, 1:] - 1
    rows, positions = is_label[:, 1:].nonzero(as_tuple=True)
    placed = padded.new_zeros((labels.shape[0], labels.shape[1] - 1, *padded.shape[2:]))
    placed[rows, positions] = padded[rows, rank[rows, positions]]
    return placed
