"""Speculative q* sampling: the acceptance rule and the draft-length policy, as pure functions.

Speculative q* sampling (docs/speculative.md). A drafter proposes tokens ``x_1..x_k`` from its distributions ``p_1..p_k``; the
target (q* as sampled: tempered, top-k, top-p) gives ``r_1..r_{k+1}`` at the same positions. Draft
``x_i`` is accepted with probability ``min(1, r_i(x_i) / p_i(x_i))``; at the first rejection the
token is drawn from the residual ``normalise(max(0, r_i - p_i))`` and the round ends; if all ``k``
are accepted a bonus token comes from ``r_{k+1}``. Every emitted token is then distributed exactly
as a token drawn from r (Leviathan et al. 2023, Chen et al. 2023). The functions work on
``[batch, ...]`` log-prob tensors in log space, with no host synchronisation and no loop over rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

#: ``--draft-k auto`` chooses each round's draft length in 1..AUTO_MAX_DRAFT (never 0: a row that
#: stopped drafting would never see its acceptance recover).
AUTO_MAX_DRAFT = 8
#: Who drafts for speculative sampling: pi_theta itself, or a small pair of models.
DRAFTERS: tuple[str, ...] = ("theta", "pair")
#: The most drafts per round: past a few, a draft is rarely reached (acceptance^k) and costs a forward.
MAX_DRAFT_K = 32
#: Prior of the auto policy's acceptance estimate: this many drafts, accepted at PRIOR_ACCEPTANCE.
PRIOR_DRAFTS, PRIOR_ACCEPTANCE = 4.0, 0.8
#: The auto policy's cost of a forward over n tokens (all rows and queries together), in one-token
#: forwards, by device type: 1 for one token, ``jump`` up to ``knee`` tokens (reading the weights
#: dominates), then ``jump * (n / knee) ** exponent``. CPU: fitted to the demo model's forwards on
#: this project's 2-core machine (1.3-1.9 from 2 to 16 tokens, 2.5 at 32, 3.9 at 64, 6.6 at 128;
#: ``benchmarks/RESULTS.md``). GPUs: assumed, not measured here (no GPU was at hand).
FORWARD_COST_CURVES: dict[str, tuple[float, float, float]] = {
    "cpu": (1.5, 16.0, 0.7),
    "cuda": (1.0, 64.0, 1.0),
    "mps": (1.0, 32.0, 1.0),
}


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def residual_logprobs(logp_target: Tensor, logp_draft: Tensor) -> Tensor:
    """``log normalise(max(0, r - p))`` per row; ``r`` itself where the residual has no mass.

    (A rejection happens only where ``r > p`` somewhere, so the fallback matters only when float
    rounding rejects a draft of a row with ``r == p``.)
    """
    above = logp_target > logp_draft  # False where r is 0
    gap = torch.where(above, logp_draft - logp_target, -1.0)
    log_residual = torch.where(above, logp_target + log1mexp(gap), -math.inf)
    log_z = torch.logsumexp(log_residual, dim=-1, keepdim=True)
    return torch.where(log_z == -math.inf, logp_target, log_residual - log_z)


def verify_drafts(logp_target: Tensor, logp_draft: Tensor, drafts: Tensor, draft_len: Tensor, u_accept: Tensor) -> tuple[Tensor, Tensor]:
    """Accept or reject each row's drafts: the number accepted and the distribution of the round's last token.

    ``logp_target``: ``[B, K+1, V]`` normalised log r at the K+1 positions of the round.
    ``logp_draft``: ``[B, K, V]`` the normalised log p each draft was drawn from.
    ``drafts``: ``[B, K]`` the draft ids; ``draft_len``: ``[B]`` how many of them a row made (its
    later entries are ignored). ``u_accept``: ``[B, K]`` uniforms in (0, 1).

    Returns ``(accepted, logp_last)``: ``[B]`` leading drafts accepted, and ``[B, V]`` the
    normalised log-distribution of the token at position ``accepted``: the residual after a
    rejection, r itself after all ``draft_len`` drafts were accepted.
    """
    batch, k = drafts.shape
    if k == 0:
        return torch.zeros_like(draft_len), logp_target[:, 0]
    picked = drafts.unsqueeze(-1)
    log_ratio = (logp_target[:, :k].gather(-1, picked) - logp_draft.gather(-1, picked)).squeeze(-1)
    # u < min(1, r/p)  <=>  log u < log r - log p  (p(x) > 0: x was drawn from p).
    ok = (torch.log(u_accept) < log_ratio) & (torch.arange(k, device=drafts.device) < draft_len.unsqueeze(-1))
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(batch, device=drafts.device)
    target_at = logp_target[rows, accepted]
    residual = residual_logprobs(target_at, logp_draft[rows, accepted.clamp(max=k - 1)])
    return accepted, torch.where((accepted < draft_len).unsqueeze(-1), residual, target_at)


def expected_tokens(acceptance: np.ndarray, draft_len: np.ndarray) -> np.ndarray:
    """Tokens a round emits on average with ``draft_len`` drafts, each accepted with ``acceptance``:
    ``1 + a + ... + a^k``."""
    a = np.clip(acceptance, 0.0, 1.0 - 1e-9)
    return (1.0 - a ** (draft_len + 1)) / (1.0 - a)


def forward_cost(tokens: np.ndarray, device_type: str) -> np.ndarray:
    """A forward over ``tokens`` tokens, in one-token forwards (:data:`FORWARD_COST_CURVES`)."""
    jump, knee, exponent = FORWARD_COST_CURVES.get(device_type, FORWARD_COST_CURVES["cuda"])
    n = np.asarray(tokens, dtype=np.float64)
    return np.where(n <= 1, 1.0, jump * np.maximum(1.0, n / knee) ** exponent)


def round_costs(drafter_size: float, scorers_size: float, rows: int, device_type: str) -> np.ndarray:
    """Cost of a round of ``k = 0..AUTO_MAX_DRAFT`` drafts per row in a batch of ``rows`` rows.

    The drafter's models run ``k + 1`` forwards of ``rows`` tokens, the scorers one forward of
    ``rows * (k + 1)``; a model's one-token forward costs in proportion to its size (parameters:
    at small batch a forward is bound by reading them).
    """
    k = np.arange(AUTO_MAX_DRAFT + 1)
    drafting = (k + 1) * drafter_size * forward_cost(rows, device_type)
    return drafting + scorers_size * forward_cost(rows * (k + 1), device_type)


def auto_draft_len(accepted: np.ndarray, tested: np.ndarray, room: np.ndarray, round_cost: np.ndarray) -> int:
    """``--draft-k auto``: the round's draft length (1 or more), maximising the batch's expected
    tokens per cost.

    ``accepted`` and ``tested`` are each row's drafts accepted and put to the test so far (drafts
    after a round's first rejection are not tested); each row's acceptance is estimated from them
    with a prior of :data:`PRIOR_DRAFTS` drafts at :data:`PRIOR_ACCEPTANCE`. ``room`` caps a row's
    drafts (its token budget). ``round_cost[k]`` is the cost of a round of ``k`` drafts
    (:func:`round_costs`). One length for the batch, since its rows run the drafter's forwards in
    lock step: the round costs what its longest draft costs.
    """
    acceptance = (accepted + PRIOR_DRAFTS * PRIOR_ACCEPTANCE) / (tested + PRIOR_DRAFTS)
    lengths = np.minimum(np.arange(1, len(round_cost))[None, :], room[:, None])
    tokens = expected_tokens(acceptance[:, None], lengths).sum(axis=0)
    return int((tokens / round_cost[1:]).argmax()) + 1


def check_draft_k(value: int | str) -> int:
    """A fixed draft length: an integer from 0 to :data:`MAX_DRAFT_K` (``auto`` is the caller's)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"draft_k must be an integer from 0 to {MAX_DRAFT_K} or auto, got {value!r}")
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"draft_k must be an integer from 0 to {MAX_DRAFT_K} or auto, got {value!r}") from None
    if not 0 <= k <= MAX_DRAFT_K:
        raise ValueError(f"draft_k must be an integer from 0 to {MAX_DRAFT_K} or auto, got {value!r}")
    return k
