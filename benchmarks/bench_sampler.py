"""Generation throughput: DualModelSampler against the floor, DynamicCache, one model's generate, the naive loop.

    python benchmarks/bench_sampler.py                        # demo + tiny models, batch 1 8 32, CPU
    python benchmarks/bench_sampler.py --models demo --batches 8 32 --new-tokens 32 --no-extras
    python benchmarks/bench_sampler.py --models demo --batches 8 --context 2000 --new-tokens 16 --repeats 1 --no-extras

For each model pair and batch size, all from one run, on the same prompts (``--context``: each padded
to about that many tokens) and the same number of new tokens per row (EOS is ignored so every
variant does the same work), alternating the variants ``--repeats`` times:

* floor: the two models' forward passes alone on the sampler's slot caches (prefill, then one cached
  forward each per step), feeding fixed tokens: the physical floor of exact two-model sampling
  without speculation;
* dynamic: the same forwards on transformers' ``DynamicCache`` (left-padded batch, which copies the
  whole cache at each step);
* qstar: ``DualModelSampler.generate`` (kl_symmetry alpha, diagnostics, sampling); ``bare``: the
  same with ``diagnostics="none"`` (the per-token diagnostics not computed);
* generate: one model's own ``generate`` (a single model's cost, for scale);
* naive: what a user would write from the design notes: per row, the two models one after the other,
  20-step bisection per token, ``torch.multinomial``.

The step columns are milliseconds per decode step (a round: both models' forwards plus, for qstar,
the mixture, diagnostics and draw), best of the repeats, the prefill left out: ``floor/dyn`` is
the slot cache's forwards against ``DynamicCache``'s, ``qstar/dyn`` a whole q* step against the two
forwards on ``DynamicCache``.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_alpha import bisection_alpha, demo_sampler, print_header, timed
from transformers import DynamicCache

from qstar_cli.distributions.mixture import mixture_logprobs
from qstar_cli.engine.compiled import warm_up
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.engine.slots import SlotCache
from qstar_cli.testing.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for writing clear code.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn.",
    "What is 17 times 23?",
    "Name three uses of a paperclip.",
    "How do I boil an egg?",
    "Summarise the plot of Romeo and Juliet in one line.",
]


def pair(name: str) -> tuple[LoadedModel, LoadedModel]:
    if name == "demo":
        sampler = demo_sampler()
        return sampler.theta, sampler.target
    tok = build_tiny_tokenizer()
    return (
        LoadedModel(build_tiny_model(tok, seed=1, hidden_size=256, num_layers=4), tok, "tiny-theta"),
        LoadedModel(build_tiny_model(tok, seed=2, hidden_size=256, num_layers=4), tok, "tiny-t"),
    )


def left_padded(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and their positions (-1 on padding), left-padded to the longest prompt."""
    width = max(map(len, ids))
    tokens = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    positions = torch.tensor([[-1] * (width - len(x)) + list(range(len(x))) for x in ids])
    return tokens, positions


def floor(sampler: DualModelSampler, prompts, new_tokens: int) -> float:
    """Both models' forwards alone on slot caches: prefill, then one cached step each per token.
    Returns the seconds spent in the decode steps."""
    decode = 0.0
    for side, loaded in enumerate((sampler.theta, sampler.target)):
        ids = [p[side] for p in prompts]
        cache = SlotCache(loaded.model.config, len(ids), max(map(len, ids)) + new_tokens)
        tokens, positions = left_padded(ids)
        cache.forward(loaded.model, tokens, positions, 0, tokens.shape[1], sampler.vocab)
        lengths = torch.tensor([len(x) for x in ids])
        feed = torch.full((len(ids), 1), 5, dtype=torch.long)
        started = time.perf_counter()
        for step in range(new_tokens - 1):
            longest = max(map(len, ids)) + step + 1
            cache.forward(loaded.model, feed, (lengths + step).unsqueeze(-1), 0, longest, sampler.vocab)
        decode += time.perf_counter() - started
    return decode


def dynamic(sampler: DualModelSampler, prompts, new_tokens: int) -> float:
    """The same forwards on DynamicCache (concatenating the cache at every step); decode seconds."""
    decode = 0.0
    for side, loaded in enumerate((sampler.theta, sampler.target)):
        tokens, positions = left_padded([p[side] for p in prompts])
        mask = (positions >= 0).long()
        cache = DynamicCache(config=loaded.model.config)
        loaded.model(input_ids=tokens, attention_mask=mask, position_ids=positions.clamp_min(0), cache=cache, logits_to_keep=1)
        feed = torch.full((len(prompts), 1), 5, dtype=torch.long)
        next_position = positions[:, -1:] + 1
        started = time.perf_counter()
        for step in range(new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            out = loaded.model(input_ids=feed, attention_mask=mask, position_ids=next_position + step, cache=cache, logits_to_keep=1)
            out.logits[:, -1, : sampler.vocab].float().log_softmax(-1)
        decode += time.perf_counter() - started
    return decode


def qstar(sampler: DualModelSampler, convs, prompts, diagnostics: str = "full") -> float:
    """``DualModelSampler.generate``; the seconds after its first round (prefill and first token)."""
    first: list[float] = []
    on_round = lambda _: first or first.append(time.perf_counter())  # noqa: E731
    sampler.generate(convs, prompt_ids=prompts, on_round=on_round, diagnostics=diagnostics)
    return time.perf_counter() - first[0]


def naive(sampler: DualModelSampler, prompts, new_tokens: int) -> None:
    """Per row: the two models one after the other, 20-step bisection, multinomial."""
    for ids_theta, ids_t in prompts:
        caches = [DynamicCache(), DynamicCache()]
        inputs = [torch.tensor([ids_theta]), torch.tensor([ids_t])]
        for _ in range(new_tokens):
            logps = []
            for i, loaded in enumerate((sampler.theta, sampler.target)):
                out = loaded.model(input_ids=inputs[i], cache=caches[i], use_cache=True)
                logps.append(out.logits[:, -1, : sampler.vocab].float().log_softmax(-1))
            alpha = bisection_alpha(logps[0], logps[1])
            token = torch.multinomial(mixture_logprobs(logps[0], logps[1], alpha).exp(), 1)
            inputs = [token, token]


def hf_generate(sampler: DualModelSampler, prompts, new_tokens: int) -> None:
    tok = sampler.target.tokenizer
    ids = [p[1] for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    sampler.target.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        pad_token_id=pad,
    )


def padded_prompts(n: int, context: int) -> list[list[dict]]:
    """``n`` conversations; with ``context``, each question follows about that many tokens of text."""
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
    return [[{"role": "user", "content": (text * (context // 16) if context else "") + PROMPTS[i % len(PROMPTS)]}] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=0, help="prompt tokens per row, about (default: the short prompts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    parser.add_argument("--no-extras", action="store_true", help="skip generate and the naive loop")
    parser.add_argument("--compile", action="store_true", help="q* compiled (--compile on: the round's mathematics and decode forwards)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print_header(
        f"new_tokens={args.new_tokens} context~{args.context or 'short'} repeats={args.repeats} compile={args.compile}",
        f"{'models':>6} {'batch':>5} {'prompt':>6} | {'floor ms':>8} {'dyn ms':>8} {'qstar ms':>8} {'bare ms':>8} | {'floor/dyn':>9} "
        f"{'qstar/dyn':>9} {'bare/dyn':>9} {'qstar/floor':>11} | {'qstar tok/s':>11} | {'generate s':>10} {'naive s':>8}",
    )
    for name in args.models:
        theta, target = pair(name)
        sampler = DualModelSampler(
            theta, target, theta_format="plain", t_format="chat", max_new_tokens=args.new_tokens, compile=args.compile
        )
        sampler.eos = set()  # every row runs the full length in every variant
        if args.compile:
            print(f"compiled in {warm_up(sampler):.1f} s", flush=True)
        for batch in args.batches:
            convs = padded_prompts(batch, args.context)
            prompts = [sampler.encode_prompts(c) for c in convs]
            steps = {"floor": [], "dynamic": [], "qstar": [], "bare": []}
            for _ in range(args.repeats):
                steps["floor"].append(floor(sampler, prompts, args.new_tokens))
                steps["dynamic"].append(dynamic(sampler, prompts, args.new_tokens))
                steps["qstar"].append(qstar(sampler, convs, prompts))
                steps["bare"].append(qstar(sampler, convs, prompts, "none"))
            t_floor, t_dyn, t_qstar, t_bare = (1e3 * min(v) / (args.new_tokens - 1) for v in steps.values())
            t_gen = t_naive = float("nan")
            if not args.no_extras:
                # bench_alpha.timed gives median milliseconds; these columns are in seconds.
                t_gen = timed(lambda: hf_generate(sampler, prompts, args.new_tokens), args.repeats, "cpu") / 1e3
                if not args.no_naive:
                    t_naive = timed(lambda: naive(sampler, prompts, args.new_tokens), 1, "cpu") / 1e3
            prompt = max(len(p[1]) for p in prompts)
            print(
                f"{name:>6} {batch:>5} {prompt:>6} | {t_floor:>8.1f} {t_dyn:>8.1f} {t_qstar:>8.1f} {t_bare:>8.1f} | {t_floor / t_dyn:>8.3f}x "
                f"{t_qstar / t_dyn:>8.3f}x {t_bare / t_dyn:>8.3f}x {t_qstar / t_floor:>10.3f}x | {batch * 1e3 / t_qstar:>11.1f} | "
                f"{t_gen:>10.3f} {t_naive:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
