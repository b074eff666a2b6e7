"""q* on two 2-D Gaussians: alpha* in closed form and by ``solve_alpha`` on a grid (``qstar explain``).

When ``pi_theta = N(mu_theta, S_theta)`` and ``pi_t = N(mu_t, S_t)``, the geometric mixture
``q_alpha ~ pi_theta^alpha * pi_t^(1 - alpha)`` is Gaussian again: its precision is the
alpha-weighted sum of the two precisions, its mean the precision-weighted mean. The KLs between
Gaussians are closed-form too, so alpha* (the root of ``KL(q||pi_theta) = KL(q||pi_t)``)
needs only a scalar root finder, here a bisection vectorised over cases.

The same cases discretised on a fine grid, whose points play the vocabulary, go through the
product's own :func:`~qstar_cli.distributions.mixture.solve_alpha`: the two answers agree to ~2e-9 on the default
grid.

Everything is float64 torch, vectorised over cases (and over alphas where a function takes many).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal, kl_divergence

from qstar_cli.distributions.mixture import solve_alpha

Vector = tuple[float, float]
Matrix = tuple[Vector, Vector]

#: 2^-60 is below float64's resolution of alpha in [0, 1]: the bisection ends at the root.
BISECTION_STEPS = 60


@dataclass(frozen=True)
class GaussianCase:
    """One picture: ``pi_theta = N(mu_theta, cov_theta)`` and ``pi_t = N(mu_t, cov_t)`` in 2-D."""

    name: str
    mu_theta: Vector
    cov_theta: Matrix
    mu_t: Vector
    cov_t: Matrix


def _isotropic(variance: float) -> Matrix:
    return ((variance, 0.0), (0.0, variance))


#: The nine cases of ``q_star_behavior_2d.png``. The first five are the rows of the notes' table
#: (background notes, "problem 2"); the notes do not state their covariances, and these reproduce
#: all three of their numbers (alpha*, both KLs) in every row, in 2-D.
CASES: tuple[GaussianCase, ...] = (
    GaussianCase("equal shapes, means 4 apart", (-2.0, 0.0), _isotropic(1.0), (2.0, 0.0), _isotropic(1.0)),
    GaussianCase("theta narrow (sd 1), t wide (sd 2)", (0.0, 0.0), _isotropic(1.0), (0.0, 0.0), _isotropic(4.0)),
    GaussianCase("crossed axes (variances 4 and 1)", (0.0, 0.0), ((4.0, 0.0), (0.0, 1.0)), (0.0, 0.0), ((1.0, 0.0), (0.0, 4.0))),
    GaussianCase("theta much sharper (var 0.2 vs 3)", (0.0, 0.0), _isotropic(0.2), (0.0, 0.0), _isotropic(3.0)),
    GaussianCase("means 3 apart, var 0.5 vs 2", (-1.5, 0.0), _isotropic(0.5), (1.5, 0.0), _isotropic(2.0)),
    GaussianCase("theta wide (sd 2), t narrow (sd 1)", (0.0, 0.0), _isotropic(4.0), (0.0, 0.0), _isotropic(1.0)),
    GaussianCase("opposite correlations (+0.8, -0.8)", (0.0, 0.0), ((1.0, 0.8), (0.8, 1.0)), (0.0, 0.0), ((1.0, -0.8), (-0.8, 1.0))),
    GaussianCase("sharp theta in t's tail", (1.5, 1.5), _isotropic(0.1), (0.0, 0.0), _isotropic(1.5)),
    GaussianCase("tilted theta, flat t, shifted", (-1.0, -1.0), ((1.5, 1.2), (1.2, 1.5)), (1.0, 0.5), ((3.0, 0.0), (0.0, 0.4))),
)

#: The case of ``q_alpha_evolution.png``: means and shapes both differ.
EVOLUTION_CASE = 4


@dataclass(frozen=True)
class Grid:
    """The square ``[-half_width, half_width]^2`` sampled every ``step``: the "vocabulary".

    Sums over a uniform grid of a Gaussian density converge faster than any power of the step
    while the step stays below the smallest standard deviation, so normalising over the grid
    reproduces the continuous distributions; the width keeps the tails lost outside it negligible.
    """

    half_width: float = 12.0
    step: float = 0.05

    def axis(self) -> Tensor:
        count = round(self.half_width / self.step)
        return torch.arange(-count, count + 1, dtype=torch.float64) * self.step

    def points(self) -> Tensor:
        """``[V, 2]`` grid points, row-major over ``(y, x)`` so ``reshape(n, n)`` gives an image."""
        ys, xs = torch.meshgrid(self.axis(), self.axis(), indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def gaussians(cases: tuple[GaussianCase, ...] = CASES) -> tuple[MultivariateNormal, MultivariateNormal]:
    """``(pi_theta, pi_t)`` of every case, batched as ``[cases]`` float64 distributions."""

    def batch(mu: str, cov: str) -> MultivariateNormal:
        loc = torch.tensor([getattr(c, mu) for c in cases], dtype=torch.float64)
        return MultivariateNormal(loc, covariance_matrix=torch.tensor([getattr(c, cov) for c in cases], dtype=torch.float64))

    return batch("mu_theta", "cov_theta"), batch("mu_t", "cov_t")


def geometric_mixture(theta: MultivariateNormal, t: MultivariateNormal, alpha: Tensor) -> MultivariateNormal:
    """``q_alpha ~ theta^alpha * t^(1 - alpha)``; ``alpha`` broadcasts against the distributions' batch."""
    w = alpha[..., None, None]
    precision = w * theta.precision_matrix + (1 - w) * t.precision_matrix
    weighted = w * theta.precision_matrix @ theta.loc[..., None] + (1 - w) * t.precision_matrix @ t.loc[..., None]
    # The precision is positive definite by construction; validating it would cost most of the bisection's time.
    mean = torch.linalg.solve(precision, weighted)[..., 0]
    return MultivariateNormal(mean, precision_matrix=precision, validate_args=False)


def mixture_kls(theta: MultivariateNormal, t: MultivariateNormal, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """``(KL(q_alpha||theta), KL(q_alpha||t))`` in closed form."""
    q = geometric_mixture(theta, t, alpha)
    return kl_divergence(q, theta), kl_divergence(q, t)


def closed_form_alpha(theta: MultivariateNormal, t: MultivariateNormal) -> Tensor:
    """alpha* per case: bisection on ``F = KL(q||theta) - KL(q||t)``, which falls from F(0) >= 0 to F(1) <= 0."""
    lo = torch.zeros(theta.batch_shape, dtype=torch.float64)
    hi = torch.ones_like(lo)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        kl_theta, kl_t = mixture_kls(theta, t, mid)
        gap = kl_theta - kl_t
        # A mid point with F = 0 exactly is the root: both ends move onto it.
        lo, hi = torch.where(gap >= 0, mid, lo), torch.where(gap <= 0, mid, hi)
    return 0.5 * (lo + hi)


def grid_logprobs(dist: MultivariateNormal, grid: Grid) -> Tensor:
    """``[cases, V]`` log-probabilities of ``dist`` normalised over the grid points."""
    return torch.log_softmax(dist.log_prob(grid.points()[:, None, :]).T, dim=-1)


#: The per-case numbers of :class:`Explanation`, in the order of the table and the JSON.
RESULT_FIELDS = ("alpha_star", "alpha_star_grid", "kl_theta_t", "kl_t_theta", "kl_q")


@dataclass(frozen=True)
class Explanation:
    """alpha* and the KLs of every case, with the grid log-probs the figures draw."""

    cases: tuple[GaussianCase, ...]
    grid: Grid
    alpha_star: Tensor  # [cases] closed form
    alpha_star_grid: Tensor  # [cases] solve_alpha on the grid
    kl_theta_t: Tensor  # KL(pi_theta||pi_t)
    kl_t_theta: Tensor  # KL(pi_t||pi_theta)
    kl_q: Tensor  # KL(q*||pi_theta) = KL(q*||pi_t) at the closed-form alpha*
    logp_theta: Tensor  # [cases, V]
    logp_t: Tensor  # [cases, V]

    def records(self) -> list[dict]:
        """One JSON-ready dict per case (the ``cases`` list of ``qstar explain --json``)."""
        values = {name: getattr(self, name).tolist() for name in RESULT_FIELDS}
        return [
            {
                "name": case.name,
                **{name: column[i] for name, column in values.items()},
                "mu_theta": list(case.mu_theta),
                "cov_theta": [list(row) for row in case.cov_theta],
                "mu_t": list(case.mu_t),
                "cov_t": [list(row) for row in case.cov_t],
            }
            for i, case in enumerate(self.cases)
        ]


def explain_cases(cases: tuple[GaussianCase, ...] = CASES, grid: Grid = Grid()) -> Explanation:
    """alpha* of every case twice: in closed form, and by ``solve_alpha`` on the grid discretisation."""
    theta, t = gaussians(cases)
    alpha_star = closed_form_alpha(theta, t)
    kl_q, _ = mixture_kls(theta, t, alpha_star)
    logp_theta, logp_t = grid_logprobs(theta, grid), grid_logprobs(t, grid)
    return Explanation(
        cases=cases,
        grid=grid,
        alpha_star=alpha_star,
        alpha_star_grid=solve_alpha(logp_theta, logp_t),
        kl_theta_t=kl_divergence(theta, t),
        kl_t_theta=kl_divergence(t, theta),
        kl_q=kl_q,
        logp_theta=logp_theta,
        logp_t=logp_t,
    )
