"""What a q* round does besides the two forwards, per function, at batch 8, 32 and 128 (demo pair).

    .venv/bin/python benchmarks/profile_step.py --batches 8 32 128 --new-tokens 16

Each step of the round (the forwards, the solve, the mixture, the diagnostics, the token choice,
the host transfer, the rows' bookkeeping on the device and the host) is wrapped with a timer; a warm-up run, then one timed ``generate`` per
batch (EOS ignored). Milliseconds per round, and each item's share of the round. ``--diagnostics
none`` shows the round without the per-token diagnostics.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import torch
from bench_alpha import demo_sampler
from bench_sampler import padded_prompts

import qstar_cli.engine.sampler as sampler_module
from qstar_cli.engine.compiled import EAGER, RoundMath, compiled_math, warm_up_math
from qstar_cli.engine.rows import DeviceRows, HostRows
from qstar_cli.engine.slots import SlotCache

TIMES: dict[str, float] = collections.defaultdict(float)
#: Rounds in progress: everything but the round itself is timed only inside one (not the prefill).
INSIDE: list[bool] = []
#: (owner, attribute, label) of every timed function: the round's numbered steps
#: (:meth:`~qstar_cli.engine.sampler.DualModelSampler._round`) and the round itself.
TIMED = [
    (SlotCache, "forward", "forwards"),
    (sampler_module.DualModelSampler, "_feed", "1. feed"),
    (sampler_module, "choose_tokens", "5. accept and draw (choose_tokens)"),
    (DeviceRows, "advance", "6. advance on the device"),
    (sampler_module, "to_host", "7. the one transfer"),
    (HostRows, "advance", "7. advance on the host"),
    (sampler_module.DualModelSampler, "_record", "8. record (incl. token_diagnostics)"),
    (sampler_module.DualModelSampler, "_round", "round"),
]


def timed(owner, name: str, label: str) -> None:
    setattr(owner, name, timer(getattr(owner, name), label, isinstance(getattr(owner, "__dict__", {}).get(name), staticmethod)))


def timer(function, label: str, static: bool = False):
    """``function`` timed into ``TIMES[label]`` (inside a round only, but for the round itself)."""

    def wrapper(*args, **kwargs):
        if label == "round":
            INSIDE.append(True)
        elif not INSIDE:
            return function(*args, **kwargs)
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - started
            if label == "round":
                INSIDE.pop()

    return staticmethod(wrapper) if static else wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--diagnostics", default="full")
    parser.add_argument("--compile", action="store_true", help="the round's mathematics compiled (--compile on)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    sampler = demo_sampler(args.new_tokens)
    sampler.eos = set()
    math = compiled_math() if args.compile else EAGER
    warm_up_math(math, sampler.vocab, sampler.theta.model.device, sampler.alpha_method, sampler.alpha)
    sampler.math = RoundMath(*(timer(getattr(math, f.name), f.name) for f in dataclasses.fields(RoundMath)))
    for owner, name, label in TIMED:
        timed(owner, name, label)
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()} new_tokens={args.new_tokens} diagnostics={args.diagnostics} compile={args.compile}"
    )
    for batch in args.batches:
        convs = padded_prompts(batch, 0)
        prompts = [sampler.encode_prompts(c) for c in convs]
        sampler.generate(convs[:2], prompt_ids=prompts[:2], diagnostics=args.diagnostics)
        TIMES.clear()
        sampler.generate(convs, prompt_ids=prompts, diagnostics=args.diagnostics)
        rounds = args.new_tokens
        round_ms = 1e3 * TIMES["round"] / rounds
        print(f"batch {batch}: {round_ms:.1f} ms per round (the prefill left out)")
        for label, seconds in sorted(TIMES.items(), key=lambda item: -item[1]):
            if label != "round":
                ms = 1e3 * seconds / rounds
                print(f"  {label:<24} {ms:8.2f} ms  {ms / round_ms:6.1%}")


if __name__ == "__main__":
    main()
