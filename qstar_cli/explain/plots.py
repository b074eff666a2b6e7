"""The figures and table of ``qstar explain`` (the math is in :mod:`qstar_cli.explain.cases`).

Figures are drawn with matplotlib's object API on the Agg canvas, as in :mod:`qstar_cli.analysis.plots`.
Contours are drawn from the grid log-probabilities, q_alpha by the product's own
:func:`~qstar_cli.distributions.mixture.mixture_logprobs`; the numbers in titles and table are the closed form's
beside ``solve_alpha``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from rich import box
from rich.table import Table

from qstar_cli.distributions.mixture import mixture_logprobs, token_diagnostics
from qstar_cli.explain.cases import EVOLUTION_CASE, Explanation, gaussians, geometric_mixture, mixture_kls
from qstar_cli.runfiles.output import atomic_output

BEHAVIOR_PNG = "q_star_behavior_2d.png"
EVOLUTION_PNG = "q_alpha_evolution.png"
THETA_COLOR, T_COLOR, Q_COLOR = "tab:blue", "tab:red", "tab:green"
#: Contours at Mahalanobis radius 2 (dashed) and 1 (solid): a Gaussian's log-density is max - r^2 / 2 there.
SIGMA_LEVELS, SIGMA_STYLES = [-2.0, -0.5], ["dashed", "solid"]
VIEW = 5.0  # every case's 2-sigma contours fit in [-VIEW, VIEW]^2
EVOLUTION_ALPHAS = 11  # q_alpha contours (and grid KL dots) at alpha = 0, 0.1, ..., 1


def _image(logp: torch.Tensor, side: int) -> torch.Tensor:
    """A grid log-prob row as a ``[side, side]`` image relative to its peak (0 at the mode)."""
    return (logp - logp.max()).reshape(side, side)


def _contour(ax, explanation: Explanation, logp: torch.Tensor, color, width: float = 1.2, one_sd: bool = False) -> None:
    """Contours of one grid distribution at 1 and 2 standard deviations (``one_sd``: at 1 only)."""
    axis = explanation.grid.axis().numpy()
    levels, styles = (SIGMA_LEVELS[1:], SIGMA_STYLES[1:]) if one_sd else (SIGMA_LEVELS, SIGMA_STYLES)
    ax.contour(axis, axis, _image(logp, len(axis)).numpy(), levels=levels, colors=[color], linestyles=styles, linewidths=width)


def _square(ax) -> None:
    ax.set(xlim=(-VIEW, VIEW), ylim=(-VIEW, VIEW), aspect="equal")
    ax.grid(alpha=0.3)


def behavior_figure(explanation: Explanation, path: Path) -> Path:
    """Nine panels: pi_theta, pi_t and q* (1- and 2-sigma contours), alpha* both ways in each title."""
    q_star = mixture_logprobs(explanation.logp_theta, explanation.logp_t, explanation.alpha_star_grid)
    fig = Figure(figsize=(12.5, 13.5), layout="constrained")
    axes = fig.subplots(3, 3, sharex=True, sharey=True).flatten()
    for i, ax in enumerate(axes):
        _contour(ax, explanation, explanation.logp_theta[i], THETA_COLOR)
        _contour(ax, explanation, explanation.logp_t[i], T_COLOR)
        _contour(ax, explanation, q_star[i], Q_COLOR, width=2.4)
        _square(ax)
        ax.set_title(
            f"{i + 1}. {explanation.cases[i].name}\n"
            f"$\\alpha^*$ = {explanation.alpha_star[i]:.3f}  (solve_alpha on the grid: {explanation.alpha_star_grid[i]:.3f})",
            fontsize=10.5,
        )
    handles = [
        Line2D([], [], color=THETA_COLOR, label=r"$\pi_\theta$"),
        Line2D([], [], color=T_COLOR, label=r"$\pi_t$"),
        Line2D([], [], color=Q_COLOR, linewidth=2.4, label=r"$q^* \propto \pi_\theta^{\alpha^*} \pi_t^{1-\alpha^*}$"),
    ]
    fig.legend(
        handles=handles, loc="outside upper center", ncols=3, fontsize=12, title="contours at 1 (solid) and 2 (dashed) standard deviations"
    )
    return _save(fig, path)


def _star(ax, x: float, y: float, label: str) -> None:
    ax.plot([x], [y], marker="*", markersize=17, color=Q_COLOR, markeredgecolor="black", linestyle="none", label=label)


def evolution_figure(explanation: Explanation, path: Path, case: int = EVOLUTION_CASE) -> Path:
    """One case: q_alpha for alpha in [0, 1] (left) and both KLs against alpha, crossing at alpha* (right)."""
    alpha_star, alpha_grid, kl_q = (v[case] for v in (explanation.alpha_star, explanation.alpha_star_grid, explanation.kl_q))
    theta, t = gaussians(explanation.cases[case : case + 1])
    dots = torch.linspace(0, 1, EVOLUTION_ALPHAS, dtype=torch.float64)
    logp_theta = explanation.logp_theta[case].expand(len(dots), -1)
    logp_t = explanation.logp_t[case].expand(len(dots), -1)
    q_alpha = mixture_logprobs(logp_theta, logp_t, dots)
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.15])

    colors = LinearSegmentedColormap.from_list("t_to_theta", [T_COLOR, THETA_COLOR])  # alpha 0 is pi_t, 1 is pi_theta
    for alpha, logp in zip(dots.tolist(), q_alpha):
        _contour(left, explanation, logp, colors(alpha), width=2.2 if alpha in (0.0, 1.0) else 1.0, one_sd=True)
    q_star = mixture_logprobs(logp_theta[:1], logp_t[:1], alpha_grid[None])[0]
    _contour(left, explanation, q_star, Q_COLOR, width=2.6, one_sd=True)
    _star(left, *geometric_mixture(theta, t, alpha_star[None]).loc[0].tolist(), label=f"$q^*$, $\\alpha^*$ = {alpha_star:.3f}")
    _square(left)
    left.set(xlim=(-4, 4), ylim=(-4, 4))
    left.legend(loc="upper left")
    title = f"{explanation.cases[case].name}: 1-sd contour of $q_\\alpha$\n$\\alpha$ = 0 is $\\pi_t$, $\\alpha$ = 1 is $\\pi_\\theta$, steps of 0.1"
    left.set_title(title)
    fig.colorbar(ScalarMappable(Normalize(0, 1), colors), ax=left, label=r"$\alpha$", shrink=0.85)

    curve = torch.linspace(0, 1, 201, dtype=torch.float64)
    kl_theta, kl_t = mixture_kls(theta, t, curve)
    grid_kls = token_diagnostics(logp_theta, logp_t, q_alpha)
    right.plot(curve, kl_theta, color=THETA_COLOR, label=r"KL($q_\alpha$ || $\pi_\theta$), closed form")
    right.plot(curve, kl_t, color=T_COLOR, label=r"KL($q_\alpha$ || $\pi_t$), closed form")
    right.plot(dots, grid_kls["kl_theta"], "o", color=THETA_COLOR, markerfacecolor="none", label="dots: the same on the grid")
    right.plot(dots, grid_kls["kl_t"], "o", color=T_COLOR, markerfacecolor="none")
    right.axvline(alpha_grid, color="black", linestyle=":", label=f"solve_alpha on the grid: {alpha_grid:.4f}")
    _star(right, alpha_star, kl_q, label=f"$\\alpha^*$ = {alpha_star:.4f}, both KLs {kl_q:.3f}")
    right.set(
        xlabel=r"$\alpha$", ylabel="nats", xlim=(0, 1), ylim=(0, None), title=r"$\alpha^*$ is where the two KLs cross (the Chernoff point)"
    )
    right.grid(alpha=0.3)
    right.legend()
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_output(path) as out:
        fig.savefig(out, dpi=90, format="png")
    return path


def write_figures(explanation: Explanation, out_dir: Path) -> list[Path]:
    """Both PNGs into ``out_dir`` (which must exist); returns their paths."""
    return [behavior_figure(explanation, out_dir / BEHAVIOR_PNG), evolution_figure(explanation, out_dir / EVOLUTION_PNG)]


#: The table's columns: record key, header, decimals.
TABLE_COLUMNS = (
    ("alpha_star", "alpha*", 4),
    ("alpha_star_grid", "alpha* by\nsolve_alpha", 4),
    ("kl_theta_t", "KL(theta||t)", 3),
    ("kl_t_theta", "KL(t||theta)", 3),
    ("kl_q", "KL(q*||theta)\n= KL(q*||t)", 3),
)


def explain_table(explanation: Explanation) -> Table:
    """The notes' table: alpha* both ways and the three KLs of every case."""
    table = Table(
        title="alpha* for 2-D Gaussians pi_theta, pi_t: closed form and solve_alpha on a grid (KLs in nats)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("case", no_wrap=True)
    for _, header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    for record in explanation.records():
        table.add_row(record["name"], *(f"{record[key]:.{digits}f}" for key, _, digits in TABLE_COLUMNS))
    return table
