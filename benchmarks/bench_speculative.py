"""Speculative q* sampling (``--draft-k``) against plain sampling, in whole ``run_generate`` runs.

    python benchmarks/bench_speculative.py                          # demo + tiny pair, batch 1, 4, 16, CPU
    python benchmarks/bench_speculative.py --pairs demo --batch-sizes 1 --repeats 3
    python benchmarks/bench_speculative.py --device cuda

Pairs: ``demo`` (SmolLM2-135M on both sides: pi_theta costs what pi_t costs) and ``tiny``, a
random pi_theta of 2 layers and a pi_t that is the same model with 10 more layers whose residual
branches are scaled down (several times costlier, close in output). Each (pair, batch size) runs
plain sampling and ``--draft-k`` 1, 2, 3, 4 and auto on the same prompts, one after the other in
this process with the same loaded models (``--repeats`` times, interleaved; the median is shown).

Printed per run: tokens/s, speed-up over ``--draft-k 0``, acceptance rate, pi_t forwards per emitted
token. Then the forward costs measured on this device (a (k+1)-token forward over a one-token one,
and pi_theta's one-token forward over pi_t's) and, from the demo's measured acceptance and forward
costs, the speed-up a pair with pi_theta 5x cheaper than pi_t would get (a projection, labelled so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import orjson
import torch
from bench_alpha import demo_sampler, print_header, timed
from bench_samples_per_prompt import PROBLEMS

from qstar_cli import GenerateConfig, run_generate
from qstar_cli.distributions.speculative import expected_tokens
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.engine.slots import SlotCache
from qstar_cli.testing.tiny import build_tiny_model, build_tiny_tokenizer, deepened_model

DRAFT_KS: tuple[int | str, ...] = (0, 1, 2, 3, 4, "auto")


def tiny_pair(root: Path) -> tuple[str, str]:
    """A 2-layer pi_theta and a 12-layer pi_t near it, saved as model directories."""
    tokenizer = build_tiny_tokenizer()
    theta = build_tiny_model(tokenizer, seed=1, hidden_size=384, num_layers=2, sharpness=4.0)
    target = deepened_model(theta, extra_layers=10, residual_scale=0.05, seed=2)
    dirs = []
    for name, model in (("theta", theta), ("target", target)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]


def forward_ms(loaded: LoadedModel, batch: int, queries: int, vocab: int, repeats: int, device: str) -> float:
    """Median ms of one slot-cache forward of ``batch`` rows x ``queries`` tokens after 64 cached ones."""
    cache = SlotCache(loaded.model.config, batch, 128)
    ids = torch.zeros(batch, 64, dtype=torch.long, device=loaded.model.device)
    cache.forward(loaded.model, ids, torch.arange(64, device=ids.device).expand(batch, -1), 0, 64, vocab)
    ids = ids[:, :queries]
    positions = (64 + torch.arange(queries, device=ids.device)).expand(batch, -1)
    return timed(lambda: cache.forward(loaded.model, ids, positions, 0, 64 + queries, vocab, every_query=True), repeats, device)


def run(base: DualModelSampler, config: GenerateConfig, draft_k) -> tuple[float, dict]:
    sampler = DualModelSampler(
        base.theta, base.target, theta_format="plain", t_format="chat", max_new_tokens=config.max_new_tokens, draft_k=draft_k
    )
    summary = run_generate(config, sampler=sampler)
    session = orjson.loads(summary.paths.meta.read_bytes())["sessions"][-1]
    return summary.tokens_per_second, session.get("speculative", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["demo", "tiny"], choices=["demo", "tiny"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompts-per-slot", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--draft-ks", nargs="+", default=[str(k) for k in DRAFT_KS], help="0 (plain, always run), 1, 2, ... or auto")
    args = parser.parse_args()
    draft_ks = [0] + [k if k == "auto" else int(k) for k in args.draft_ks if k != "0"]
    first_drafting = draft_ks[1] if len(draft_ks) > 1 else None
    torch.set_grad_enabled(False)
    print_header(
        f"device={args.device} max_new_tokens={args.max_new_tokens} prompts={args.prompts_per_slot} x batch",
        f"{'pair':>5} {'batch':>5} {'draft_k':>7} | {'tok/s':>7} {'vs k=0':>7} {'accept':>6} {'t fwd/tok':>9}",
    )
    measured: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for pair in args.pairs:
            if pair == "demo":
                base = demo_sampler(args.max_new_tokens)
                specs = ("demo", "demo")
            else:
                specs = tiny_pair(root / "tiny")
                base = DualModelSampler.from_pretrained(*specs, device=args.device, dtype="float32", theta_format="plain", t_format="chat")
            measured[pair] = {"base": base, "acceptance": []}
            for batch in args.batch_sizes:
                rows = [
                    {"messages": [{"role": "user", "content": PROBLEMS[i % len(PROBLEMS)]}]} for i in range(args.prompts_per_slot * batch)
                ]
                data = root / f"{pair}-{batch}.jsonl"
                data.write_text("".join(json.dumps(r) + "\n" for r in rows))
                rates: dict = {k: [] for k in draft_ks}
                spec: dict = {}
                for repeat in range(args.repeats):
                    for k in draft_ks:
                        config = GenerateConfig(
                            model_theta=specs[0], model_t=specs[1], theta_format="plain", dataset=str(data),
                            output=str(root / f"out-{pair}-{batch}-{k}-{repeat}.jsonl"), max_new_tokens=args.max_new_tokens,
                            batch_size=batch, device=args.device, dtype="float32", draft_k=k,
                        )  # fmt: skip
                        rate, spec[k] = run(base, config, k)
                        rates[k].append(rate)
                plain = statistics.median(rates[0])
                for k in draft_ks:
                    rate = statistics.median(rates[k])
                    accept = f"{spec[k]['acceptance_rate']:.3f}" if k else "-"
                    t_fwd = spec[k].get("verify_forwards_per_token", 1.0)
                    print(f"{pair:>5} {batch:>5} {k!s:>7} | {rate:>7.1f} {rate / plain:>6.2f}x {accept:>6} {t_fwd:>9.3f}", flush=True)
                    if k == first_drafting and batch == args.batch_sizes[0]:  # the acceptance per draft tested
                        measured[pair]["acceptance"] = spec[k]["acceptance_rate"]

        print("\nforward costs on this device (median ms; ratios in brackets)")
        for pair, info in measured.items():
            base = info["base"]
            for batch in args.batch_sizes:
                one = forward_ms(base.target, batch, 1, base.vocab, 20, args.device)
                five = forward_ms(base.target, batch, 5, base.vocab, 20, args.device)
                theta = forward_ms(base.theta, batch, 1, base.vocab, 20, args.device)
                info.setdefault("verify_ratio", five / one)
                print(
                    f"{pair:>5} batch {batch:>3}: pi_t 1 token {one:.2f}, 5 tokens {five:.2f} [{five / one:.2f}x]; "
                    f"pi_theta 1 token {theta:.2f} [pi_theta / pi_t {theta / one:.2f}]",
                    flush=True,
                )

    if "demo" in measured and measured["demo"]["acceptance"]:
        a, ratio = measured["demo"]["acceptance"], measured["demo"]["verify_ratio"]
        extra = (ratio - 1) / 4  # per extra token, from the 5-token / 1-token ratio
        print(f"\nPROJECTION (not measured): pi_theta 5x cheaper than pi_t, the demo's acceptance {a:.3f} per draft,")
        print(f"a (k+1)-token pi_t forward costing 1 + {extra:.3f} k one-token ones (batch {args.batch_sizes[0]})")
        for k in range(1, 7):
            round_cost = (k + 1) * 0.2 + 1 + extra * k
            speed = float(expected_tokens(np.array(a), np.array(k))) / round_cost * 1.2
            print(f"  draft_k={k}: {speed:.2f}x plain sampling")


if __name__ == "__main__":
    main()
