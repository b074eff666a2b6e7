"""What ``--teacher-topk K`` costs: the demo q* step with and without pi_t's top-K, and its bytes per token.

    python benchmarks/bench_teacher_topk.py                       # demo pair, batch 8 and 32, K = 20
    python benchmarks/bench_teacher_topk.py --batches 32 --k 20 64 --repeats 5

For each batch, alternating the variants ``--repeats`` times on the same prompts (EOS ignored, so
every variant does the same work): ``DualModelSampler.generate`` at diagnostics ``full`` with
``teacher_topk`` 0 and each K, in ABBA order. Step: milliseconds per round after the first (median of the
repeats). Bytes per token: the sidecar's ``teacher_topk`` field of a sample, over its tokens.
"""

from __future__ import annotations

import argparse
import statistics

import orjson
import torch
from bench_alpha import demo_sampler, print_header
from bench_sampler import padded_prompts, qstar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--k", type=int, nargs="+", default=[20])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    sampler = demo_sampler()
    sampler.max_new_tokens = args.new_tokens
    sampler.eos = set()  # every row runs the full length in every variant
    print_header(
        f"demo pair, new_tokens={args.new_tokens}, repeats={args.repeats} (medians)",
        f"{'batch':>5} {'K':>3} | {'step ms':>8} {'K=0 ms':>8} {'ratio':>6} | {'bytes/token':>11}",
    )
    for batch in args.batches:
        convs = padded_prompts(batch, 0)
        prompts = [sampler.encode_prompts(c) for c in convs]
        steps: dict[int, list[float]] = {k: [] for k in (0, *args.k)}
        for repeat in range(args.repeats):
            for k in list(steps)[:: 1 if repeat % 2 == 0 else -1]:  # ABBA: drift in the machine's load cancels
                sampler.teacher_topk = k
                steps[k].append(1e3 * qstar(sampler, convs, prompts) / (args.new_tokens - 1))
        base = statistics.median(steps[0])
        for k in args.k:
            sampler.teacher_topk = k
            [result] = sampler.generate(convs[:1], prompt_ids=prompts[:1])
            per_token = len(orjson.dumps(result.teacher_topk.to_record())) / len(result.token_ids)
            step = statistics.median(steps[k])
            print(f"{batch:>5} {k:>3} | {step:>8.1f} {base:>8.1f} {step / base:>6.3f} | {per_token:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
