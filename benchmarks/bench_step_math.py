"""Where a generation step's mathematics spends its time, per function, on LM-like rows.

cd benchmarks && python bench_step_math.py --batch 32 --vocab 49152
"""

from __future__ import annotations

import argparse

import torch
from bench_alpha import lm_like_rows, timed

from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha, token_diagnostics
from qstar_cli.distributions.sampling import SamplingParams
from qstar_cli.distributions.token_choice import choose_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logp_theta, logp_t = lm_like_rows(args.batch, args.vocab, "cpu")
    alpha = solve_alpha(logp_theta, logp_t)
    logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
    rows = torch.arange(args.batch)
    no_drafts = rows.new_zeros(args.batch, 0), logp_q.new_empty(args.batch, 0, args.vocab), rows.new_zeros(args.batch)
    parts = {
        "solve_alpha": lambda: solve_alpha(logp_theta, logp_t),
        "mixture_logprobs": lambda: mixture_logprobs(logp_theta, logp_t, alpha),
        "token_diagnostics": lambda: token_diagnostics(logp_theta, logp_t, logp_q),
        "choose_tokens": lambda: choose_tokens(logp_theta, logp_t, logp_q, *no_drafts, rows, torch.zeros_like(rows), 0, SamplingParams()),
    }
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} vocab={args.vocab}")
    for name, fn in parts.items():
        print(f"{name:>18}: {timed(fn, args.repeats, 'cpu'):7.2f} ms")


if __name__ == "__main__":
    main()
