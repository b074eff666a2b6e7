"""PNG plots of one run (``analyze --plots``) or several overlaid (``compare --plots``).

Figures are drawn with matplotlib's object API on the Agg canvas: no display, no pyplot state.
Token-level plots need level ``full`` sidecars; runs at level ``summary`` appear only in the
length and weight plots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from qstar_cli.analysis.statistics import ALPHA_BINS, RunAnalysis
from qstar_cli.runfiles.output import atomic_output

SCATTER_POINTS = 20_000


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_output(path) as out:
        fig.savefig(out, dpi=110, format="png")
    return path


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _left_out(count: int) -> str:
    return f", {count} non-finite left out" if count else ""


def _scatter(runs, labels, x: str, y: str, title: str, log: bool, path: Path) -> Path:
    fig, ax = _axes(title, x, y)
    lows, highs = [], []
    for run, label in zip(runs, labels):
        xs, ys = run.reservoir.column(x)[:SCATTER_POINTS], run.reservoir.column(y)[:SCATTER_POINTS]
        finite = np.isfinite(xs) & np.isfinite(ys)
        xs, ys = xs[finite], ys[finite]
        if not xs.size:
            continue
        if log:
            xs, ys = np.maximum(xs, 1e-8), np.maximum(ys, 1e-8)
        ax.scatter(xs, ys, s=3, alpha=0.35, label=label + _left_out(int((~finite).sum())), rasterized=True)
        lows.append(min(xs.min(), ys.min()))
        highs.append(max(xs.max(), ys.max()))
    lo, hi = (min(lows), max(highs)) if lows else (1e-8, 1.0)
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
    if log:
        ax.set(xscale="log", yscale="log")
    ax.legend(markerscale=4)
    return _save(fig, path)


def plot_runs(runs: list[RunAnalysis], labels: list[str], out_dir: str | Path) -> list[Path]:
    """Write the plots for ``runs`` into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    full = [(r, label) for r, label in zip(runs, labels) if r.reservoir is not None and r.tokens]
    if full:
        fig, ax = _axes("alpha per token", "alpha", "share of tokens")
        for run, label in full:
            ax.stairs(run.alpha_histogram / run.alpha_histogram.sum(), ALPHA_BINS, label=label, linewidth=1.5)
        ax.legend()
        written.append(_save(fig, out / "alpha_histogram.png"))

        fig, ax = _axes("mean alpha along the response", "response position (token)", "mean alpha")
        for run, label in full:
            ax.plot(np.arange(len(run.alpha_by_position)), run.alpha_by_position, label=label, linewidth=1.2)
        ax.set_ylim(0, 1)
        ax.legend()
        written.append(_save(fig, out / "alpha_by_position.png"))

        full_runs, full_labels = zip(*full)
        written.append(
            _scatter(full_runs, full_labels, "kl_theta", "kl_t", "KL(q||pi_theta) vs KL(q||pi_t) per token", True, out / "kl_scatter.png")
        )
        written.append(
            _scatter(full_runs, full_labels, "ess_theta", "ess_t", "ESS of pi_theta/q vs pi_t/q per token", False, out / "ess_scatter.png")
        )

    with_samples = [(r, label) for r, label in zip(runs, labels) if r.samples]
    if with_samples:
        fig, ax = _axes("response length", "tokens", "samples")
        top = max(r.lengths.max() for r, _ in with_samples)
        bins = np.linspace(0, top + 1, min(50, int(top) + 2))
        for run, label in with_samples:
            ax.hist(run.lengths, bins=bins, histtype="step", linewidth=1.5, label=label)
        ax.legend()
        written.append(_save(fig, out / "response_length.png"))

        fig, ax = _axes("sequence log importance weight", "log w = logp_theta_sum - logp_q_sum", "samples")
        for run, label in with_samples:
            finite = run.log_w[np.isfinite(run.log_w)]
            ess = run.summary["weights"]["ess_ratio"]
            ax.hist(finite, bins=40, histtype="step", linewidth=1.5,
                    label=f"{label} (ESS/n {ess:.3f}{_left_out(run.log_w.size - finite.size)})")  # fmt: skip
        ax.legend()
        written.append(_save(fig, out / "log_weights.png"))
    return written
