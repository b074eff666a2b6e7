"""The round compiled with ``torch.compile`` (``--compile``): its mathematics and the models' decode forwards.

A round spends, besides the two forwards, several passes over ``[rows, vocab]`` log-probs: the
alpha solve (an ``exp`` and four dot products per iteration), the mixture, the diagnostics. Eager,
each pass is a kernel that reads and writes the whole tensor; compiled, they fuse, and the solve
takes a fifth of the time on a CPU (benchmarks/RESULTS.md). The functions are compiled once per
process with dynamic shapes (any rows; vocabularies and the alpha method specialise), and
:func:`warm_up` compiles them before a run so that the cost shows up front. Compiled results equal
eager ones to float rounding (a few 1e-7 in alpha), not bit for bit.

Each model's decode and verify forwards (a query or ``draft_k + 1`` per row; prefills stay eager)
go through :func:`compiled_forward`: dynamic shapes on the CPU; on CUDA ``mode="reduce-overhead"``,
CUDA graphs that replay a forward's hundreds of kernel launches as one, recorded once per shape,
so there the slot cache pads rows and attention width to buckets
(:class:`~qstar_cli.engine.slots.SlotCache` ``bucketed``, :func:`~qstar_cli.engine.slots.bucket`) and keeps its storage at fixed addresses.
"""

from __future__ import annotations

import functools
import os
import shutil
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha, token_diagnostics
from qstar_cli.errors import QstarInputError

#: The values of ``--compile``, in the order messages list them.
COMPILE_MODES = ("on", "off", "auto")


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


def check_compiler(device: torch.device) -> None:
    """Refuse ``--compile`` without the compiler it needs: on a CPU inductor writes C++, on CUDA
    Triton builds its kernel launchers as C extensions (a C compiler, found as Triton finds it, and
    Python's headers)."""
    if device.type == "cuda":
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if compiler is None or not headers.is_file():
            missing = "no C compiler (CC, gcc or clang)" if compiler is None else f"no Python headers ({headers})"
            raise QstarInputError(
                f"--compile on CUDA needs a C compiler and Python's headers to build Triton's launchers, and this machine has "
                f"{missing}: install them (apt install gcc python3-dev), name a compiler with CC, or use --compile off"
            )
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - inductor's InvalidCxxCompiler and whatever a broken one raises
        raise QstarInputError(
            f"--compile on a CPU needs a C++ compiler, and none works here ({str(err).splitlines()[0]}): install g++ "
            "(apt install g++), name one with CXX, or use --compile off"
        ) from None


def use_compile(mode: str, device: torch.device) -> bool:
    """``on``, ``off``, or ``auto``: on with CUDA (where kernel launches dominate), off elsewhere."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def warm_up_math(math: RoundMath, vocab: int, device: torch.device, alpha_method: str, alpha: float) -> float:
    """Compile ``math`` for this vocabulary (one row and several: sizes 1 specialise); seconds taken.

    The inputs are made as a round makes them (each a tensor of its own, in inference mode): a
    compiled function is specialised on what its first inputs share (sizes, storage offsets)."""
    started = time.perf_counter()
    for rows in (1, 3):
        logp_theta, logp_t = (torch.randn(rows, vocab, device=device).log_softmax(-1) for _ in range(2))
        a = math.solve_alpha(logp_theta, logp_t, method=alpha_method, alpha=alpha)
        logp_q = math.mixture_logprobs(logp_theta, logp_t, a)
        math.token_diagnostics(logp_theta, logp_t, logp_q)
    return time.perf_counter() - started


def graphed(model) -> bool:
    """Whether ``model``'s compiled forward runs as CUDA graphs (so its slot cache is bucketed)."""
    return model.device.type == "cuda"


#: Dynamo's compiled entries per code object. Every model's ``forward`` is one code object (the
#: class's), so pi_theta, pi_t and a draft pair share dynamo's limit (8), and each takes several
#: entries (one row and several, one query and ``draft_k + 1``, caches of one slot and several):
#: past the limit a forward silently runs eager. Four models of up to 8 entries each.
FORWARD_RECOMPILE_LIMIT = 32


def compiled_forward(model) -> Callable:
    """``model``'s forward compiled for decode and verify forwards (CUDA graphs on CUDA)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FORWARD_RECOMPILE_LIMIT)
    return torch.compile(model.forward, dynamic=True, mode="reduce-overhead" if graphed(model) else None)


def warm_up_forward(model, run: Callable, vocab: int, queries: int) -> None:
    """Compile ``run``, ``model``'s compiled forward, for decode forwards of several rows and one (in
    caches of several slots and of one: sizes 1 specialise), and verify forwards of ``queries`` per
    row (``draft_k + 1``) when that is above 1: every shape a run takes (sizes above 1 are symbols;
    the cache's head count and head size are static, so no size of the warm-up's pins another)."""
    from qstar_cli.engine.slots import SlotCache  # slots.py imports transformers' attention stack; the config's checks need none

    for slots, row_counts in ((11, (7, 1)), (1, (1,))):
        cache = SlotCache(model.config, slots, 16, compiled=True, bucketed=graphed(model))
        ids = torch.ones(row_counts[0], 6, dtype=torch.long, device=model.device)
        positions = torch.arange(6, device=model.device).expand(row_counts[0], 6)
        cache.forward(model, ids, positions, 0, 6, vocab)
        for rows in row_counts:
            for q in sorted({1, queries}):
                cache.forward(model, ids[:rows, :q], positions[:rows, :q] + 6, 0, 6 + q, vocab, every_query=q > 1, run=run)


@torch.inference_mode()  # as the sampler runs: a compiled function is specialised on the mode
def warm_up(sampler) -> float:
    """Compile a :class:`~qstar_cli.engine.sampler.DualModelSampler`'s round mathematics and its
    models' decode forwards before a run, so that the cost shows up front; seconds taken."""
    started = time.perf_counter()
    warm_up_math(sampler.math, sampler.vocab, sampler.theta.model.device, sampler.alpha_method, sampler.alpha)
    for role in sampler.roles.values():
        warm_up_forward(role.model, role.compiled, sampler.vocab, sampler.draft_k + 1)
    return time.perf_counter() - started
