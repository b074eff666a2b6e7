"""The round's mathematics compiled with ``torch.compile`` (``--compile``).

A round spends, besides the two forwards, several passes over ``[rows, vocab]`` log-probs: the
alpha solve (an ``exp`` and four dot products per iteration), the mixture, the diagnostics. Eager,
each pass is a kernel that reads and writes the whole tensor; compiled, they fuse, and the solve
takes a fifth of the time on a CPU (benchmarks/RESULTS.md). The functions are compiled once per
process with dynamic shapes (any rows; vocabularies and the alpha method specialise), and
:func:`warm_up` compiles them before a run so that the cost shows up front. Compiled results equal
eager ones to float rounding (a few 1e-7 in alpha), not bit for bit.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha, token_diagnostics

COMPILE_MODES = ("off", "on", "auto")


@dataclass(frozen=True)
class RoundMath:
    """The pure functions a round calls on ``[rows, vocab]`` log-probs."""

    solve_alpha: Callable
    mixture_logprobs: Callable
    token_diagnostics: Callable


EAGER = RoundMath(solve_alpha, mixture_logprobs, token_diagnostics)


@functools.cache
def compiled_math() -> RoundMath:
    return RoundMath(*(torch.compile(f, dynamic=True) for f in (solve_alpha, mixture_logprobs, token_diagnostics)))


def use_compile(mode: str, device: torch.device) -> bool:
    """``on``, ``off``, or ``auto``: on with CUDA (where kernel launches dominate), off elsewhere."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def warm_up(math: RoundMath, vocab: int, device: torch.device, alpha_method: str, alpha: float) -> float:
    """Compile ``math`` for this vocabulary (one row and several: sizes 1 specialise); seconds taken."""
    started = time.perf_counter()
    for rows in (1, 2):
        logp = torch.randn(2, rows, vocab, device=device).log_softmax(-1)
        a = math.solve_alpha(logp[0], logp[1], method=alpha_method, alpha=alpha)
        logp_q = math.mixture_logprobs(logp[0], logp[1], a)
        math.token_diagnostics(logp[0], logp[1], logp_q)
    return time.perf_counter() - started
