"""Two tried and rejected routes to a faster alpha solve: a vocabulary subset, and torch.compile.

Kept to document a negative result (benchmarks/RESULTS.md). The subset is the top-k tokens by
max(log pi_theta, log pi_t), plus one bucket holding each model's remaining mass; Newton runs on
those k + 1 columns (negligible cost), then ``polishes`` full-vocabulary Newton steps on G correct
the subset's bias. One polish is fast but not accurate enough (the subset misses much of q's mass
on flat rows); two are accurate but no faster than the plain solver.

``--compile`` instead times ``torch.compile`` (inductor, dynamic shapes) of the Newton solver and of
the bisection at batch 8, V = 151936, with the compile time.

    PYTHONPATH=. python benchmarks/alpha_subset_experiment.py
    PYTHONPATH=. python benchmarks/alpha_subset_experiment.py --compile
"""

from __future__ import annotations

import sys
import time

import torch
from bench_alpha import bisection_alpha, lm_like_rows, timed

from qstar_cli.distributions.mixture import ALPHA_EPS, DEGENERATE_VAR, _common_support, solve_kl_symmetry
from tests.distributions.test_mixture import KINDS, make_rows, reference_alpha


def subset_then_polish(logp_theta, logp_t, k: int = 256, polishes: int = 1):
    idx = torch.maximum(logp_theta, logp_t).topk(k, dim=-1, sorted=False).indices
    cols = []
    for logp in (logp_theta, logp_t):
        top = logp.gather(-1, idx)
        rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1.0))
        cols.append(torch.cat([top, rest], dim=-1))
    alpha = solve_kl_symmetry(*cols)
    d, b = _common_support(logp_theta, logp_t)
    d_pos = d.clamp_min(0.0)
    d_neg = d_pos - d
    for _ in range(polishes):
        q = torch.softmax(torch.addcmul(b, alpha.unsqueeze(-1), d, value=-1.0), dim=-1)
        p1, n1 = torch.linalg.vecdot(q, d_pos), torch.linalg.vecdot(q, d_neg)
        p2, n2 = torch.linalg.vecdot(q, d_pos * d_pos), torch.linalg.vecdot(q, d_neg * d_neg)
        newton = alpha + torch.log(p1 / n1) / (p2 / p1 + n2 / n1)
        alpha = torch.where(torch.isfinite(newton), newton.clamp(0.0, 1.0), alpha)
    var = (p2 + n2) - (p1 - n1).square()
    alpha = alpha.clamp(ALPHA_EPS, 1.0 - ALPHA_EPS)
    return torch.where(var <= DEGENERATE_VAR, 0.5, alpha)


def compiled() -> None:
    logp_theta, logp_t = lm_like_rows(8, 151936, "cpu")
    ref = bisection_alpha(logp_theta.double(), logp_t.double(), steps=45)
    row = []
    for name, fn in (("newton", solve_kl_symmetry), ("bisect20", bisection_alpha)):
        start = time.perf_counter()
        fast = torch.compile(fn, dynamic=True)
        err = (fast(logp_theta, logp_t).double() - ref).abs().max().item()
        row.append(f"{name}: compile {time.perf_counter() - start:.0f} s, eager {timed(lambda: fn(logp_theta, logp_t), 5, 'cpu'):.1f} ms, "
                   f"compiled {timed(lambda: fast(logp_theta, logp_t), 5, 'cpu'):.1f} ms, err {err:.1e}")  # fmt: skip
    print("batch 8, V 151936:", *row, sep="\n  ")


def main() -> None:
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    if "--compile" in sys.argv:
        compiled()
        return
    print("max |alpha - alpha_ref| on the test suite's row kinds (64 rows, V = 49152, Var > 1e-5):")
    for kind in KINDS:
        logp_theta, logp_t = make_rows(kind, 64, 49152, torch.Generator().manual_seed(7))
        ref, var = reference_alpha(logp_theta, logp_t)
        regular = var > 1e-5
        errors = [
            (subset_then_polish(logp_theta, logp_t, polishes=p).double() - ref).abs()[regular].max().item()
            if regular.any()
            else float("nan")
            for p in (1, 2)
        ]
        print(f"  {kind:>16}: 1 polish {errors[0]:.1e}   2 polishes {errors[1]:.1e}")
    print("speed on LM-like rows (median ms):")
    for batch, vocab in [(8, 49152), (8, 151936), (64, 151936)]:
        logp_theta, logp_t = lm_like_rows(batch, vocab, "cpu")
        t_bisect = timed(lambda: bisection_alpha(logp_theta, logp_t), 3, "cpu")
        t_newton = timed(lambda: solve_kl_symmetry(logp_theta, logp_t), 3, "cpu")
        row = f"  batch {batch:>3} V {vocab:>6}: bisect20 {t_bisect:8.1f}  newton {t_newton:8.1f}"
        for p in (1, 2):
            t = timed(lambda: subset_then_polish(logp_theta, logp_t, polishes=p), 3, "cpu")
            row += f"  subset+{p} polish {t:7.1f} ({t_bisect / t:.2f}x)"
        print(row, flush=True)


if __name__ == "__main__":
    main()
