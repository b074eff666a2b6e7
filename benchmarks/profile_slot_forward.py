"""Where the time of a decode forward goes: the slot cache against transformers' ``DynamicCache``,
per op (torch.profiler), for the same rows, one model (the demo model, pi_t's side).

    .venv/bin/python benchmarks/profile_slot_forward.py --batch 32 --context 40
    .venv/bin/python benchmarks/profile_slot_forward.py --batch 8 --context 2000
    .venv/bin/python benchmarks/profile_slot_forward.py --batch 8 --context 2000 --queries 5   # a verify forward

Both caches start holding ``--context`` random keys and values per row (ragged by up to 3 tokens,
left-padded for ``DynamicCache``; attention costs the same for any values, and no prefill is
timed), then run ``--steps`` forwards of ``--queries`` tokens each, timed side by side, alternating,
best of ``--repeats``; then once more each under the profiler. The table lists the ops with the
most self CPU time in either, per forward.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_alpha import demo_sampler
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from qstar_cli.engine.slots import SLOT_ATTENTION, SlotCache


def slot_run(model, vocab, rows: int, context: int, steps: int, queries: int):
    """A slot cache holding ``context`` random columns per row; returns the timed part."""
    config = model.config
    cache = SlotCache(config, rows, context + steps * queries + 1)
    shape = (rows, config.num_key_value_heads, cache.capacity, config.hidden_size // config.num_attention_heads)
    for layer in cache.layers:
        layer.keys, layer.values, layer.is_initialized = torch.randn(shape), torch.randn(shape), True
    lengths = context - torch.arange(rows) % 4
    feed = torch.full((rows, queries), 5, dtype=torch.long)

    def run() -> None:
        model.set_attn_implementation(SLOT_ATTENTION)
        for step in range(steps):
            positions = (lengths + step * queries).unsqueeze(-1) + torch.arange(queries)
            cache.forward(model, feed, positions, 0, context + (step + 1) * queries, vocab, every_query=queries > 1)

    return run


def dynamic_run(model, vocab, rows: int, context: int, steps: int, queries: int):
    """A ``DynamicCache`` holding the same (left-padded) history; returns the timed part."""
    config = model.config
    cache = DynamicCache(config=config)
    shape = (rows, config.num_key_value_heads, context, config.hidden_size // config.num_attention_heads)
    for i in range(config.num_hidden_layers):
        cache.update(torch.randn(shape), torch.randn(shape), i)
    lengths = context - torch.arange(rows) % 4
    first = (torch.arange(context) >= (context - lengths).unsqueeze(-1)).long()
    feed = torch.full((rows, queries), 5, dtype=torch.long)

    def run() -> None:
        model.set_attn_implementation("sdpa")
        mask = first
        for step in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, queries)], dim=1)
            positions = (lengths + step * queries).unsqueeze(-1) + torch.arange(queries)
            out = model(input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=queries)
            out.logits[..., :vocab].float().log_softmax(-1)

    return run


def ops(run) -> dict[str, float]:
    """Self CPU milliseconds per op of one call of ``run`` under the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=40)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    sampler = demo_sampler()
    model, vocab = sampler.target.model, sampler.vocab
    shape = (args.batch, args.context, args.steps, args.queries)
    timings = {"slot": [], "dynamic": []}
    for _ in range(args.repeats):
        for name, make in (("slot", slot_run), ("dynamic", dynamic_run)):
            run = make(model, vocab, *shape)
            started = time.perf_counter()
            run()
            timings[name].append((time.perf_counter() - started) / args.steps)
    slot_ms, dyn_ms = 1e3 * min(timings["slot"]), 1e3 * min(timings["dynamic"])
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} context~{args.context} queries={args.queries}")
    print(f"forward: slot cache {slot_ms:.2f} ms, DynamicCache {dyn_ms:.2f} ms, ratio {slot_ms / dyn_ms:.3f}x (best of {args.repeats})")
    if args.top:
        slot_ops, dyn_ops = ops(slot_run(model, vocab, *shape)), ops(dynamic_run(model, vocab, *shape))
        total_slot, total_dyn = sum(slot_ops.values()) / args.steps, sum(dyn_ops.values()) / args.steps
        names = sorted(set(slot_ops) | set(dyn_ops), key=lambda k: -max(slot_ops.get(k, 0.0), dyn_ops.get(k, 0.0)))[: args.top]
        print(f"{'op (self CPU per forward)':<34} {'slot ms':>8} {'share':>6} {'dynamic ms':>11} {'share':>6}")
        for name in names:
            s, d = slot_ops.get(name, 0.0) / args.steps, dyn_ops.get(name, 0.0) / args.steps
            print(f"{name[:34]:<34} {s:8.3f} {s / total_slot:6.1%} {d:11.3f} {d / total_dyn:6.1%}")
        print(f"{'all ops':<34} {total_slot:8.3f} {'':>6} {total_dyn:11.3f}")


if __name__ == "__main__":
    main()
