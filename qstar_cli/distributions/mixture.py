"""The q* mathematics: pure, vectorised functions over ``[batch, vocab]`` log-probabilities.

Notation: ``a = log pi_theta``, ``b = log pi_t``, ``d = b - a`` and

    log q_alpha = alpha * a + (1 - alpha) * b - log Z_alpha.

``F(alpha) = E_q[d] = KL(q||pi_theta) - KL(q||pi_t)`` is non-increasing in alpha; its root alpha* is
the Chernoff point. Nothing here touches a model, a file, or the host: no ``.item()``, no Python loop
over rows or over the vocabulary. Entries equal to ``-inf`` (tokens a model cannot emit) never
produce NaN. Every function keeps the dtype it is given (float32 in the sampler, float64 in tests).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from qstar_cli.distributions.alpha_methods import ALPHA_METHODS, AlphaMethod, check_alpha_method

__all__ = ["AlphaMethod", "check_alpha_method", "mixture_logprobs", "solve_alpha", "token_diagnostics"]

#: Rows whose log-ratio ``d`` has variance below this (nats^2) under q are "the same distribution"
#: for the solver: alpha* is then ill-determined (float32 normalisation error alone moves it) and
#: every alpha gives the same q to within ~1e-7 nats, so they get alpha = 0.5.
DEGENERATE_VAR = 1e-6

#: The solver keeps alpha in [ALPHA_EPS, 1 - ALPHA_EPS]: at exactly 0 or 1, q would put mass on tokens
#: that the other model cannot emit (an infinite KL) whenever the supports differ.
ALPHA_EPS = 1e-6

#: Devices on which :func:`solve_kl_symmetry` reads whether any row still moves, to stop early.
EARLY_EXIT_DEVICES: tuple[str, ...] = ("cpu",)


def _common_support(logp_theta: Tensor, logp_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(d, b)``: d = b - a with 0 off the common support, b with -inf there.

    q is zero off the common support for every alpha in (0, 1), so the solver works on it alone.
    """
    raw = logp_t - logp_theta  # +-inf or NaN exactly off the common support
    d = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    return d, torch.where(d == raw, logp_t, -math.inf)


def entropy(logp: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of a normalised log-probability tensor."""
    return -_expectation(logp.exp(), logp)


def solve_kl_symmetry(logp_theta: Tensor, logp_t: Tensor, tol: float = 1e-5, max_iter: int = 5, **_) -> Tensor:
    """Root alpha* of ``F(alpha) = E_q[d]`` in [0, 1], per row.

    F is solved through the equivalent equation ``G(alpha) = log P - log N = 0`` with
    ``P = E_q[max(d, 0)]`` and ``N = E_q[max(-d, 0)]`` (F = P - N). G is strictly decreasing, its
    normaliser cancels, and it is *exactly linear* in alpha when q is carried by two tokens, the
    regime (two peaked, disagreeing models) where Newton on F itself crawls along F's flat tails.
    ``G' = -(E_q[d+^2]/P + E_q[d-^2]/N)`` comes from the same pass.

    Each iteration is one pass over the vocabulary (one ``exp``) plus the four moments' expectations
    (:func:`_moments_under`). Newton steps are safeguarded by the bracket [lo, hi] that F's sign maintains; a step
    leaving it is replaced by bisection. Rows whose last step was below ``tol`` stop changing. The
    iteration count is fixed (no host sync); ``max_iter=5`` reaches |alpha - alpha*| < 1e-5 on
    LM-like and adversarially peaked rows alike (see tests/distributions/test_mixture.py and
    benchmarks/bench_alpha.py).

    On devices in :data:`EARLY_EXIT_DEVICES` (the CPU, where reading a flag costs nothing) the loop
    stops once no row moved in an iteration: every later iteration would repeat it exactly (same
    alpha, same q, zero step), so the result is bit-identical to the full count.
    """
    d, b = _common_support(logp_theta, logp_t)
    # [4, B, V]: d+, d-, d+^2, d-^2, read by dot products (no [4, B, V] temporary per step). Each a
    # contiguous [B, V] block, written in place (torch.compile traces out= only into contiguous tensors).
    moments = d.new_empty((4,) + d.shape)
    d_pos, d_neg = moments[0], moments[1]
    torch.clamp_min(d, 0.0, out=d_pos)
    torch.sub(d_pos, d, out=d_neg)
    torch.mul(d_pos, d_pos, out=moments[2])
    torch.mul(d_neg, d_neg, out=moments[3])

    alpha = torch.full(d.shape[:-1], 0.5, dtype=d.dtype, device=d.device)
    # Bracket [lo, hi] and G at its ends (NaN until evaluated there).
    lo, hi = torch.zeros_like(alpha), torch.ones_like(alpha)
    g_lo, g_hi = torch.full_like(alpha, math.nan), torch.full_like(alpha, math.nan)
    step = torch.ones_like(alpha)
    for _ in range(max_iter):
        q = torch.softmax(torch.addcmul(b, alpha.unsqueeze(-1), d, value=-1.0), dim=-1)
        p1, n1, p2, n2 = _moments_under(moments, q)
        g = torch.log(p1 / n1)
        # G > 0 <=> F > 0 <=> the root lies above alpha.
        above = g > 0
        lo, g_lo = torch.where(above, alpha, lo), torch.where(above, g, g_lo)
        hi, g_hi = torch.where(above, hi, alpha), torch.where(above, g_hi, g)
        newton = alpha + g / (p2 / p1 + n2 / n1)
        # Fallbacks when Newton leaves the bracket: a step past an end point not yet evaluated
        # (0 or 1) tries that end (roots at an end, possible when the supports differ, are then
        # found at once); else the secant through both ends (G is nearly linear); else bisection.
        secant = lo + g_lo * (hi - lo) / (g_lo - g_hi)
        fallback = torch.where((secant > lo) & (secant < hi), secant, 0.5 * (lo + hi))
        fallback = torch.where((newton > hi) & g_hi.isnan(), hi, fallback)
        fallback = torch.where((newton < lo) & g_lo.isnan(), lo, fallback)
        # (NaN Newton steps, where P or N is 0, compare False and fall back.)
        proposal = torch.where((newton >= lo) & (newton <= hi), newton, fallback)
        step = torch.where(step.abs() <= tol, 0.0, proposal - alpha)
        alpha = alpha + step
        if d.device.type in EARLY_EXIT_DEVICES and not torch.compiler.is_compiling() and not step.any():
            break
    var = (p2 + n2) - (p1 - n1).square()

    # d has one sign on the whole support: F keeps that sign and the root is an end point.
    alpha = torch.where((p1 > 0) & (n1 == 0), 1.0, alpha)
    alpha = torch.where((n1 > 0) & (p1 == 0), 0.0, alpha)
    alpha = alpha.clamp(ALPHA_EPS, 1.0 - ALPHA_EPS)
    alpha = torch.where(var <= DEGENERATE_VAR, 0.5, alpha)
    # No token both models can emit (q was all NaN): no geometric mixture exists; fall back to
    # the target.
    return torch.where(p1.isnan(), 0.0, alpha)


def entropy_alpha(logp_theta: Tensor, logp_t: Tensor, **_) -> Tensor:
    """``H(pi_theta) / (H(pi_theta) + H(pi_t))``; 0.5 where both entropies are 0."""
    h_theta, h_t = entropy(logp_theta), entropy(logp_t)
    total = h_theta + h_t
    return torch.where(total > 0, h_theta / torch.where(total > 0, total, 1.0), 0.5)


def fixed_alpha(logp_theta: Tensor, logp_t: Tensor, alpha: float, **_) -> Tensor:
    """The constant ``alpha`` for every row."""
    return torch.full(logp_theta.shape[:-1], alpha, dtype=logp_theta.dtype, device=logp_theta.device)


def solve_alpha(
    logp_theta: Tensor,
    logp_t: Tensor,
    method: AlphaMethod = "kl_symmetry",
    alpha: float = 0.5,
    tol: float = 1e-5,
    max_iter: int = 5,
) -> Tensor:
    """The mixture exponent for each row of ``[batch, vocab]`` log-probs, as a ``[batch]`` tensor, by
    the solver of ``method`` in :data:`~qstar_cli.distributions.alpha_methods.ALPHA_METHODS`
    (``kl_symmetry``, the default: :func:`solve_kl_symmetry`; ``entropy``: :func:`entropy_alpha`;
    ``fixed``: the constant ``alpha``).
    """
    check_alpha_method(method, alpha)
    solver = ALPHA_METHODS[method].solver
    solve = getattr(sys.modules[__name__], solver) if isinstance(solver, str) else solver
    return solve(logp_theta, logp_t, alpha=alpha, tol=tol, max_iter=max_iter)


def mixture_logprobs(logp_theta: Tensor, logp_t: Tensor, alpha: Tensor) -> Tensor:
    """Normalised ``log q_alpha`` for ``[batch]`` alphas.

    alpha = 1 gives exactly ``logp_theta`` and alpha = 0 exactly ``logp_t`` (a zero weight keeps a
    ``-inf`` entry of the other model from turning into NaN). A row whose two distributions share
    no token, where q is undefined for alpha in (0, 1), falls back to ``logp_t``.
    """
    w = alpha.unsqueeze(-1)
    # At the end points a zero weight would meet -inf (NaN): mix at 0.5 there and select the model below.
    inner = torch.where((w > 0) & (w < 1), w, 0.5)
    unnorm = torch.addcmul(logp_t * (1.0 - inner), logp_theta, inner)
    log_z = torch.logsumexp(unnorm, dim=-1, keepdim=True)
    mixed = unnorm.sub_(log_z)
    target = (w == 0) | (log_z == -math.inf)
    return torch.where(target, logp_t, torch.where(w == 1, logp_theta, mixed))


def _moments_under(moments: Tensor, q: Tensor) -> tuple[Tensor, ...]:
    """The expectations under ``q`` ``[B, V]`` of the four moments ``[4, B, V]``. On a CPU four dot
    products: one batched product of the strided ``[B, 4, V]`` by q runs there as B small matrix
    products, 3-5 times slower (benchmarks/RESULTS.md). Elsewhere one batched product, which reads q
    once instead of four times."""
    if q.device.type == "cpu":
        return tuple(torch.linalg.vecdot(moment, q) for moment in moments)
    return torch.matmul(moments.transpose(0, 1), q.unsqueeze(-1)).squeeze(-1).unbind(-1)


def _expectation(p: Tensor, values: Tensor) -> Tensor:
    """``sum_y p(y) * values(y)`` per row, with terms where ``p`` is 0 counting 0 (whatever ``values`` is)."""
    return torch.linalg.vecdot(p, torch.where(p > 0, values, 0.0))


def _ess(logp_q: Tensor, logp_other: Tensor) -> Tensor:
    # 1 / sum p^2 / q in log space: p = 0 terms (-inf - -inf = NaN) vanish, p > 0 = q terms make ESS 0.
    log_terms = torch.nan_to_num(2 * logp_other - logp_q, nan=-math.inf, posinf=math.inf)
    return torch.exp(-torch.logsumexp(log_terms, dim=-1))


def token_diagnostics(logp_theta: Tensor, logp_t: Tensor, logp_q: Tensor) -> dict[str, Tensor]:
    """Per-row diagnostics for the full (untempered) mixture ``logp_q``.

    Returns ``[batch]`` tensors keyed by the sidecar's ``DIAGNOSTIC_FIELDS``
    (:mod:`qstar_cli.runfiles.format`), in their order. Each KL and entropy is one
    masked dot product over the vocabulary (a token q cannot draw adds 0; one it can draw but a
    model cannot emit makes that KL +inf).
    """
    q = logp_q.exp()
    ess_theta = _ess(logp_q, logp_theta)
    ess_t = _ess(logp_q, logp_t)
    # Both 0 (each model has mass where q has none): equally degenerate, ratio 1 rather than 0/0.
    ess_ratio = torch.where(ess_t > 0, ess_theta / ess_t, torch.where(ess_theta > 0, math.inf, 1.0))
    return {
        "kl_theta": _expectation(q, logp_q - logp_theta),
        "kl_t": _expectation(q, logp_q - logp_t),
        "ess_theta": ess_theta,
        "ess_t": ess_t,
        "ess_ratio": ess_ratio,
        "entropy_theta": entropy(logp_theta),
        "entropy_t": entropy(logp_t),
        "entropy_q": -_expectation(q, logp_q),
    }
