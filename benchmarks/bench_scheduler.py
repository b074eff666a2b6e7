"""Continuous batching against the static scheduler on a long-tailed prompt set: whole generate runs.

    python benchmarks/bench_scheduler.py                         # demo models, batch 8 and 32, CPU
    python benchmarks/bench_scheduler.py --batches 8 --prompts 32 --max-new-tokens 128

The prompts mix one-word answers with long essays, as reasoning data sets mix short and long
responses. For each batch size, both schedulers run ``run_generate`` (the Python API under ``qstar
generate``: schedule, sampler, writer, manifest) on the same prompts with the same loaded models, one
after the other in this process; the table gives tokens/s, slot utilisation (tokens / (steps x
slots)), the speed-up, and how many samples came out token-identical (float rounding differs with
batch composition, so a near-tie draw may differ).

    python benchmarks/bench_scheduler.py --baseline 0e31a90 --batches 8 --prompts 32

``--baseline COMMIT`` instead runs whole ``qstar generate`` processes, one after the other: that
commit's code (taken with ``git archive``), then this tree's with the continuous and the static
scheduler, on the same prompts and flags; tokens/s is each run's own (its manifest's), the
processes' wall time includes loading the models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from bench_alpha import demo_sampler, print_header

from qstar_cli import GenerateConfig, run_generate

SHORT = [
    "Answer with one word only: what is the capital of France?",
    "Reply with just a number: what is 7 times 8?",
    "Say only yes or no: is water wet?",
    "Give only the name: who wrote Hamlet?",
    "One word: what colour is the sky on a clear day?",
    "Answer with a single number: how many legs does a spider have?",
]
LONG = [
    "Write a long, detailed essay on the history of the Roman Empire, from its founding to its fall.",
    "Write a long story about a sailor who crosses the ocean alone, with many details about each day.",
]


def long_tailed_prompts(n: int) -> list[dict]:
    """Three short questions for each long essay, interleaved."""
    return [
        {"messages": [{"role": "user", "content": (LONG[(i // 4) % len(LONG)] if i % 4 == 3 else SHORT[i % len(SHORT)])}]} for i in range(n)
    ]


#: Runs the ``qstar`` CLI of the package directory given first, bypassing this tree's editable install.
LAUNCH = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]; "
    "sys.path.insert(0, sys.argv.pop(1)); from qstar_cli.cli import app; app(prog_name='qstar')"
)


def run_process(package: Path | None, flags: list[str], output: Path) -> tuple[float, float, list[list[int]]]:
    """One whole ``qstar generate`` process: (its tokens/s, wall seconds, each sample's tokens)."""
    launch = [sys.executable, "-c", LAUNCH, str(package)] if package else [sys.executable, "-m", "qstar_cli"]
    started = time.perf_counter()
    subprocess.run([*launch, "generate", *flags, "--output", str(output)], check=True, capture_output=True)
    wall = time.perf_counter() - started
    meta = orjson.loads(output.with_suffix(".meta.json").read_bytes())
    sidecar = output.with_suffix(".diagnostics.jsonl")
    tokens = [orjson.loads(line)["per_token"]["token_id"] for line in sidecar.open("rb")]
    return meta["sessions"][-1]["tokens_per_s"], wall, tokens


def against_baseline(commit: str, batch: int, n: int, max_new_tokens: int) -> None:
    """The previous release's process against this tree's, on the same long-tailed set."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = subprocess.run(["git", "archive", commit, "qstar_cli"], capture_output=True, check=True).stdout
        (root / "baseline").mkdir()
        subprocess.run(["tar", "-x", "-C", str(root / "baseline")], input=archive, check=True)
        data = root / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in long_tailed_prompts(n)))
        flags = ["--model-theta", "demo", "--model-t", "demo", "--theta-format", "plain", "--dataset", str(data),
                 "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
        base_rate, base_wall, base_tokens = run_process(root / "baseline", flags, root / "baseline.jsonl")
        print(f"{commit:>12} {batch:>5} {n:>7} | {base_rate:>8.1f} {base_wall:>7.1f} | {'1.00x':>8} | {'':>11}", flush=True)
        for scheduler in ("continuous", "static"):
            rate, wall, tokens = run_process(None, [*flags, "--scheduler", scheduler], root / f"{scheduler}.jsonl")
            same = sum(a == b for a, b in zip(base_tokens, tokens))
            print(
                f"{scheduler:>12} {batch:>5} {n:>7} | {rate:>8.1f} {wall:>7.1f} | {rate / base_rate:>7.2f}x | {same:>5}/{len(tokens):<5}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompts", type=int, nargs="+", default=None, help="prompts per batch size (default 4x the batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--baseline", metavar="COMMIT", help="whole processes: that commit's release against this tree")
    args = parser.parse_args()
    counts = args.prompts or [4 * b for b in args.batches]
    if args.baseline:
        print_header(
            f"demo models, max_new_tokens={args.max_new_tokens}, whole qstar generate processes",
            f"{'code':>12} {'batch':>5} {'prompts':>7} | {'tok/s':>8} {'wall s':>7} | {'speed-up':>8} | {'same tokens':>11}",
        )
        for batch, n in zip(args.batches, counts):
            against_baseline(args.baseline, batch, n, args.max_new_tokens)
        return
    sampler = demo_sampler(args.max_new_tokens)
    print_header(
        f"demo models, max_new_tokens={args.max_new_tokens}, whole run_generate runs",
        f"{'batch':>5} {'prompts':>7} | {'static tok/s':>12} {'util':>5} | {'contin. tok/s':>13} {'util':>5} | "
        f"{'speed-up':>8} | {'same tokens':>11}",
    )
    for batch, n in zip(args.batches, counts):
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "prompts.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in long_tailed_prompts(n)))
            runs = {}
            for scheduler in ("static", "continuous"):
                config = GenerateConfig(
                    model_theta="demo", model_t="demo", theta_format="plain", dataset=str(data),
                    output=str(Path(tmp) / f"{scheduler}.jsonl"), max_new_tokens=args.max_new_tokens,
                    batch_size=batch, scheduler=scheduler, device="cpu", dtype="float32",
                )  # fmt: skip
                summary = run_generate(config, sampler=sampler)
                meta = orjson.loads(summary.paths.meta.read_bytes())
                tokens = [orjson.loads(line)["per_token"]["token_id"] for line in summary.paths.diagnostics.open("rb")]
                runs[scheduler] = (summary.tokens_per_second, meta["sessions"][-1]["slot_utilisation"], tokens)
        (s_rate, s_util, s_tok), (c_rate, c_util, c_tok) = runs["static"], runs["continuous"]
        same = sum(a == b for a, b in zip(s_tok, c_tok))
        print(
            f"{batch:>5} {n:>7} | {s_rate:>12.1f} {s_util:>5.2f} | {c_rate:>13.1f} {c_util:>5.2f} | "
            f"{c_rate / s_rate:>7.2f}x | {same:>5}/{len(s_tok):<5}",
            flush=True,
        )


if __name__ == "__main__":
    main()
