"""Where the time of a decode forward goes: the slot cache against transformers' ``DynamicCache``,
per op (torch.profiler), for the same rows, one model (the demo model, pi_t's side).

    .venv/bin/python benchmarks/profile_slot_forward.py --batch 32 --prompt-tokens 32 --steps 24
    .venv/bin/python benchmarks/profile_slot_forward.py --batch 8 --prompt-tokens 2000 --steps 8

Both caches are prefilled with the same left-padded prompts, then run ``--steps`` one-token forwards
(feeding a fixed token), timed side by side, then once more under the profiler. The table lists the
ops with the most self CPU time in either, with their share of the forward.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from bench_alpha import demo_sampler
from bench_sampler import left_padded

from qstar_cli.engine.slots import SlotCache


def slot_steps(model, vocab, tokens, positions, lengths, steps: int, cache: SlotCache | None = None) -> SlotCache:
    """Prefill a slot cache (unless given), then ``steps`` one-token forwards."""
    rows, width = tokens.shape
    if cache is None:
        cache = SlotCache(model.config, rows, width + 2 * steps + 2)
        cache.forward(model, tokens, positions, 0, width, vocab)
    feed = torch.full((rows, 1), 5, dtype=torch.long)
    for step in range(steps):
        cache.forward(model, feed, (lengths + step).unsqueeze(-1), 0, width + step + 1, vocab)
    return cache


def dynamic_prefill(model, tokens, positions) -> tuple[DynamicCache, torch.Tensor]:
    mask = (positions >= 0).long()
    cache = DynamicCache(config=model.config)
    model(input_ids=tokens, attention_mask=mask, position_ids=positions.clamp_min(0), cache=cache, logits_to_keep=1)
    return cache, mask


def dynamic_steps(model, vocab, positions, state: tuple[DynamicCache, torch.Tensor], steps: int) -> None:
    """``steps`` one-token forwards on a prefilled ``DynamicCache`` (which concatenates at each step)."""
    cache, mask = state
    feed = torch.full((len(positions), 1), 5, dtype=torch.long)
    next_position = positions[:, -1:] + 1
    for step in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(positions), 1)], dim=1)
        out = model(input_ids=feed, attention_mask=mask, position_ids=next_position + step, cache=cache, logits_to_keep=1)
        out.logits[:, -1, :vocab].float().log_softmax(-1)


def ops(run) -> dict[str, float]:
    """Self CPU milliseconds per op of one call of ``run`` under the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    sampler = demo_sampler()
    model, vocab = sampler.target.model, sampler.vocab
    base = sampler.target.tokenizer("The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 10 + 1))["input_ids"]
    prompts = [base[: args.prompt_tokens - (i % 4)] for i in range(args.batch)]  # ragged, as real prompts are
    tokens, positions = left_padded(prompts)
    lengths = torch.tensor([len(p) for p in prompts])

    # The decode steps alone: the prefill is done once per cache, outside the timed part.
    slot = slot_steps(model, vocab, tokens, positions, lengths, 0)
    timings = {"slot": [], "dynamic": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        slot_steps(model, vocab, tokens, positions, lengths, args.steps, cache=slot)
        timings["slot"].append((time.perf_counter() - started) / args.steps)
        state = dynamic_prefill(model, tokens, positions)
        started = time.perf_counter()
        dynamic_steps(model, vocab, positions, state, args.steps)
        timings["dynamic"].append((time.perf_counter() - started) / args.steps)
    slot_ms, dyn_ms = 1e3 * min(timings["slot"]), 1e3 * min(timings["dynamic"])
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} prompt~{args.prompt_tokens} steps={args.steps}")
    print(f"decode forward: slot cache {slot_ms:.2f} ms, DynamicCache {dyn_ms:.2f} ms, ratio {slot_ms / dyn_ms:.3f}x (best of {args.repeats})")

    slot_ops = ops(lambda: slot_steps(model, vocab, tokens, positions, lengths, args.steps, cache=slot))
    state = dynamic_prefill(model, tokens, positions)
    dyn_ops = ops(lambda: dynamic_steps(model, vocab, positions, state, args.steps))
    total_slot, total_dyn = sum(slot_ops.values()) / args.steps, sum(dyn_ops.values()) / args.steps
    names = sorted(set(slot_ops) | set(dyn_ops), key=lambda k: -max(slot_ops.get(k, 0.0), dyn_ops.get(k, 0.0)))[: args.top]
    print(f"{'op (self CPU per forward)':<34} {'slot ms':>8} {'share':>6} {'dynamic ms':>11} {'share':>6}")
    for name in names:
        s, d = slot_ops.get(name, 0.0) / args.steps, dyn_ops.get(name, 0.0) / args.steps
        print(f"{name[:34]:<34} {s:8.3f} {s / total_slot:6.1%} {d:11.3f} {d / total_dyn:6.1%}")
    print(f"{'all ops':<34} {total_slot:8.3f} {'':>6} {total_dyn:11.3f}")


if __name__ == "__main__":
    main()
