"""A round's token choice, as a pure function of its log-probabilities, drafts and counter keys.

A round of speculative q* sampling (:mod:`~qstar_cli.distributions.speculative`) scores each row's
pending token and ``k`` drafts, so it has pi_theta's, pi_t's and q's log-probabilities at ``k + 1``
positions. :func:`choose_tokens` turns them into the row's tokens in four steps:

1. temper and truncate q into the distribution tokens are drawn from, r (:func:`sampling_logprobs`);
2. accept each row's leading drafts with probability ``min(1, r / p)`` (:func:`verify_drafts`);
3. draw the token at the first rejected position (or after the last draft) from what
   :func:`verify_drafts` leaves there, keyed by the row's counter key and token index (:func:`sample_tokens`);
4. pick each position's token's log-probabilities and flag rows whose emitted tokens had NaN ones.

With ``k = 0`` steps 2 and 3 are plain sampling: the token is drawn from r at the one position, with
the uniform of stream 0 at the row's token index (its tokens produced), as every round's last token is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qstar_cli.distributions.sampling import SamplingParams, counter_uniform, sample_tokens, sampling_logprobs
from qstar_cli.distributions.speculative import log1mexp, verify_drafts
from qstar_cli.runfiles.format import check_teacher_topk_k

#: Uniform streams of the counter-based generator: the round's last token (0, plain sampling's
#: draw), drafts, and acceptance tests.
TOKEN_STREAM, DRAFT_STREAM, ACCEPT_STREAM = 0, 1, 2


@dataclass(frozen=True)
class TokenChoice:
    """What :func:`choose_tokens` chose for ``n`` rows of ``k + 1`` positions."""

    #: ``[n, k + 1]``: the accepted drafts, the drawn token at position ``accepted``, then the
    #: rejected drafts (never emitted).
    token_ids: Tensor
    #: ``[n]``: leading drafts accepted.
    accepted: Tensor
    #: ``[n * (k + 1)]`` each: the log-probability of each position's token under pi_theta, pi_t and
    #: r (the sidecar's ``logp_theta``, ``logp_t`` and ``logp_q``).
    logp_theta: Tensor
    logp_t: Tensor
    logp_drawn: Tensor
    #: ``[n, 2]``: whether pi_theta's (or the draft pair's) and pi_t's log-probs are NaN at a token
    #: the row emits. A NaN would silently make q the other model alone.
    nan: Tensor


def draw_drafts(
    logp_drafter: Tensor, sampling: SamplingParams, seed: int, counter_key: Tensor, token_index: Tensor
) -> tuple[Tensor, Tensor]:
    """A draft per row from the drafter's untempered log-probs ``[n, V]``, tempered and truncated as
    q is, at each row's ``token_index``; ``(draft ids [n], the log p they were drawn from [n, V])``."""
    logp_p = sampling_logprobs(logp_drafter, sampling)
    return sample_tokens(logp_p, counter_uniform(seed, counter_key, token_index, DRAFT_STREAM)), logp_p


def choose_tokens(
    logp_theta: Tensor,
    logp_t: Tensor,
    logp_q: Tensor,
    drafts: Tensor,
    logp_drafts: Tensor,
    draft_len: Tensor,
    counter_key: Tensor,
    produced: Tensor,
    seed: int,
    sampling: SamplingParams,
    pair_drafts: bool = False,
) -> TokenChoice:
    """Choose a round's tokens (the module's steps).

    ``logp_theta``, ``logp_t``, ``logp_q``: ``[n * (k + 1), V]`` untempered log-probs at each row's
    ``k + 1`` positions (row-major). ``drafts`` ``[n, k]``, ``logp_drafts`` ``[n, k, V]`` the log p
    each was drawn from (:func:`draw_drafts`), ``draft_len`` ``[n]`` the drafts each row made.
    ``counter_key`` and ``produced`` ``[n]``: each row's counter key and the tokens it emitted before
    the round (the token index of the round's first position).
    ``pair_drafts``: the drafts come from a draft pair, whose own NaN (not pi_theta's) would skew
    the residual a rejection draws from, so it is flagged too.
    """
    n, k = drafts.shape
    logp_drawn = sampling_logprobs(logp_q, sampling)
    offsets = torch.arange(k + 1, device=produced.device)
    u_accept = counter_uniform(seed, counter_key.unsqueeze(-1).expand(n, k), produced.unsqueeze(-1) + offsets[:k], ACCEPT_STREAM)
    accepted, logp_last = verify_drafts(logp_drawn.view(n, k + 1, -1), logp_drafts, drafts, draft_len, u_accept)
    last = sample_tokens(logp_last, counter_uniform(seed, counter_key, produced + accepted, TOKEN_STREAM))
    token_ids = torch.cat([drafts, last.unsqueeze(-1)], dim=1).scatter_(1, accepted.unsqueeze(-1), last.unsqueeze(-1))
    picked = token_ids.view(-1, 1)
    theta, t, drawn = (logp.gather(-1, picked).squeeze(-1) for logp in (logp_theta, logp_t, logp_drawn))
    emitted = (offsets <= accepted.unsqueeze(-1)).flatten()
    nan = torch.stack([theta.isnan() & emitted, t.isnan() & emitted], dim=-1).view(n, k + 1, 2).any(1)
    if pair_drafts:
        drafted = offsets[:k] < draft_len.unsqueeze(-1)
        nan[:, 0] |= (logp_drafts.isnan().any(-1) & drafted).any(-1)
    return TokenChoice(token_ids, accepted, theta, t, drawn, nan)


def teacher_topk(logp_t: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """pi_t's ``k`` most likely ids per row of ``logp_t`` ``[n, V]`` (int32 ``[n, k]``), their
    log-probabilities ``[n, k]``, and the log of the mass outside them ``[n, 1]`` (-inf when they
    hold it all; float rounding past 1 counts as all)."""
    top = logp_t.topk(k, dim=-1)
    tail = log1mexp(top.values.logsumexp(-1, keepdim=True).clamp(max=0.0))
    return top.indices.to(torch.int32), top.values, tail


def check_teacher_topk(k: int, vocab: int) -> int:
    """``teacher_topk``: an integer from 0 (off) to :data:`~qstar_cli.runfiles.format.MAX_TEACHER_TOPK`,
    and no more than the shared vocabulary."""
    check_teacher_topk_k(k)
    if k > vocab:
        raise ValueError(f"teacher_topk {k} needs a shared vocabulary of at least {k} ids, not {vocab}")
    return k
