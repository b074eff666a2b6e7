"""K responses per prompt: ``--samples-per-prompt K`` against the same prompts duplicated K times.

    python benchmarks/bench_samples_per_prompt.py                 # demo models, K=4, batch 8, CPU

Both runs go through ``run_generate`` with the same loaded models, slots and prompts, one after the
other in this process; with K the prompt of each row is prefilled once per model and shared by its
K slots, with duplicated rows it is prefilled K times. The table gives tokens/s of each, prompts
prefilled, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import orjson
from bench_alpha import demo_sampler, print_header

from qstar_cli import GenerateConfig, run_generate

#: Problems of a few sentences each, as reasoning data sets have (their prompts are what is shared).
PROBLEMS = [
    "A train leaves a station at 9:00 and travels at 60 km/h. A second train leaves the same station at "
    "10:00 on the same track and travels at 90 km/h. At what time does the second train catch up with the "
    "first one, and how far from the station are they then? Explain each step.",
    "A rectangle has a perimeter of 46 cm and its length is 5 cm more than its width. Find its area, and "
    "say how the answer changes if both sides are doubled. Explain each step.",
    "In a class of 30 students, 18 play football, 12 play chess and 5 play both. How many students play "
    "neither game? Draw the reasoning as a Venn diagram in words and explain each step.",
    "The sum of three consecutive odd numbers is 147. Find the numbers, then check the answer by adding "
    "them again, and explain why the middle number is the average of the three.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    sampler = demo_sampler(args.max_new_tokens)
    print_header(
        f"demo models, K={args.k}, batch {args.batch_size}, {args.prompts} prompts, max_new_tokens={args.max_new_tokens}",
        f"{'run':>22} | {'samples':>7} {'tokens':>6} {'prefilled':>9} {'tok/s':>6}",
    )
    rows = [{"messages": [{"role": "user", "content": PROBLEMS[i % len(PROBLEMS)]}]} for i in range(args.prompts)]
    variants = {"duplicated rows": ([r for r in rows for _ in range(args.k)], 1), f"samples_per_prompt={args.k}": (rows, args.k)}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, k) in variants.items():
            path = Path(tmp) / f"{k}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in data))
            config = GenerateConfig(
                model_theta="demo", model_t="demo", theta_format="plain", dataset=str(path), output=str(Path(tmp) / f"out{k}.jsonl"),
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples_per_prompt=k, device="cpu", dtype="float32",
            )  # fmt: skip
            summary = run_generate(config, sampler=sampler)
            session = orjson.loads(summary.paths.meta.read_bytes())["sessions"][-1]
            rates[name] = summary.tokens_per_second
            print(
                f"{name:>22} | {summary.done:>7} {summary.new_tokens:>6} {session['prompts_prefilled']:>9} {rates[name]:>6.1f}",
                flush=True,
            )
    print(f"speed-up of samples_per_prompt over duplicated rows: {rates[f'samples_per_prompt={args.k}'] / rates['duplicated rows']:.2f}x")


if __name__ == "__main__":
    main()
