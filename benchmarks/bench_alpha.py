"""Alpha solve: safeguarded Newton (qstar) against the design notes' 20-step bisection.

Both solvers are vectorised over the batch and share the same common-support handling; the bisection
does the least work a bisection step can (one fused softmax, one dot product). Rows are LM-like:
correlated Gaussian logits (std 3 and 4.5) with independent noise, so the two "models" agree on the
bulk of the distribution and disagree on details, as a base and an instruct model do.

    python benchmarks/bench_alpha.py                   # full grid, CPU
    python benchmarks/bench_alpha.py --device cuda
    python benchmarks/bench_alpha.py --batches 8 --vocabs 49152 --repeats 5

Prints, per (batch, vocab): median milliseconds of bisection, Newton and the entropy formula, the
speed-up of Newton over bisection, and the max |alpha - alpha_ref| of each against a float64
bisection run to 2^-45.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from qstar_cli.distributions.mixture import entropy_alpha, solve_kl_symmetry


def bisection_alpha(logp_theta: torch.Tensor, logp_t: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """The notes' algorithm: halve [0, 1] on the sign of F = E_q[d], ``steps`` times."""
    d = logp_t - logp_theta
    common = torch.isfinite(d)
    d = torch.where(common, d, 0.0)
    b = torch.where(common, logp_t, -math.inf)
    lo = torch.zeros(d.shape[:-1], dtype=d.dtype, device=d.device)
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        q = torch.softmax(torch.addcmul(b, mid.unsqueeze(-1), d, value=-1.0), dim=-1)
        above = torch.linalg.vecdot(q, d) > 0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def lm_like_rows(batch: int, vocab: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, vocab, generator=gen) * 3.0
    logp_theta = (z + torch.randn(batch, vocab, generator=gen)).log_softmax(-1)
    logp_t = (1.5 * z + torch.randn(batch, vocab, generator=gen)).log_softmax(-1)
    return logp_theta.to(device), logp_t.to(device)


def timed(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn()`` in milliseconds (after one warm-up call)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo_sampler(max_new_tokens: int = 512):
    """The demo pair on the CPU in float32 (pi_theta on the plain format, pi_t on chat), gradients off."""
    from qstar_cli.engine.sampler import DualModelSampler

    torch.set_grad_enabled(False)
    return DualModelSampler.from_pretrained(
        "demo", "demo", device="cpu", dtype="float32", theta_format="plain", t_format="chat", max_new_tokens=max_new_tokens
    )


def print_header(environment: str, columns: str) -> None:
    """The run's environment line, then the table's column line underlined."""
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} {environment}")
    print(columns)
    print("-" * len(columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 49152, 151936])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=None, help="Newton iterations (default: qstar's)")
    args = parser.parse_args()
    newton_kwargs = {} if args.max_iter is None else {"max_iter": args.max_iter}

    print_header(
        f"device={args.device}",
        f"{'batch':>5} {'vocab':>7} | {'bisect20 ms':>11} {'newton ms':>9} {'entropy ms':>10} | "
        f"{'speed-up':>8} | {'err bisect':>10} {'err newton':>10}",
    )
    for vocab in args.vocabs:
        for batch in args.batches:
            logp_theta, logp_t = lm_like_rows(batch, vocab, args.device)
            reference = bisection_alpha(logp_theta.double(), logp_t.double(), steps=45)
            t_bisect = timed(lambda: bisection_alpha(logp_theta, logp_t), args.repeats, args.device)
            t_newton = timed(lambda: solve_kl_symmetry(logp_theta, logp_t, **newton_kwargs), args.repeats, args.device)
            t_entropy = timed(lambda: entropy_alpha(logp_theta, logp_t), args.repeats, args.device)
            err_bisect = (bisection_alpha(logp_theta, logp_t).double() - reference).abs().max().item()
            err_newton = (solve_kl_symmetry(logp_theta, logp_t, **newton_kwargs).double() - reference).abs().max().item()
            print(
                f"{batch:>5} {vocab:>7} | {t_bisect:>11.3f} {t_newton:>9.3f} {t_entropy:>10.3f} | "
                f"{t_bisect / t_newton:>7.2f}x | {err_bisect:>10.1e} {err_newton:>10.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
