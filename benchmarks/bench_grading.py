"""Grading off the decode path: the demo run ungraded, with ``--grader math``, and with a custom grader
that sleeps 0.2 s per sample, as separate ``qstar generate`` processes, interleaved round by round.

    python benchmarks/bench_grading.py --rounds 3 --num-samples 16 --max-new-tokens 96

Prints each run's tokens/s (the manifest's session figure: new tokens over the time from the first
round to the last commit, so the wait for the last grades counts) and, per round, the graded runs'
ratios to the ungraded run of that round; then checks that the three runs sampled the same responses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLEEPY = "import time\n\n\ndef sleepy(response, row):\n    time.sleep(0.2)\n    return True\n"


def run(work: Path, name: str, grader: str, args: argparse.Namespace) -> float:
    out = work / f"{name}.jsonl"
    command = [sys.executable, "-m", "qstar_cli", "generate", "--config", str(ROOT / "configs/demo.yaml"), "--output", str(out),
               "--overwrite", "--grader", grader, "--num-samples", str(args.num_samples), "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    session = json.loads(out.with_suffix(".meta.json").read_text())["sessions"][-1]
    print(f"  {name:>6}: {session['new_tokens']} tokens in {session['seconds']:.1f} s, {session['tokens_per_s']:.1f} tok/s"
          + (f", grades {session['grades']}" if "grades" in session else ""), flush=True)  # fmt: skip
    return session["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_grading_"))
    (work / "sleepy.py").write_text(SLEEPY)
    variants = {"none": "none", "math": "math", "sleepy": f"{work / 'sleepy.py'}:sleepy"}
    ratios: dict[str, list[float]] = {"math": [], "sleepy": []}
    for i in range(args.rounds):
        print(f"round {i + 1}", flush=True)
        rates = {name: run(work, name, grader, args) for name, grader in variants.items()}
        for name in ratios:
            ratios[name].append(rates[name] / rates["none"])
    for name, values in ratios.items():
        shown = ", ".join(f"{r:.3f}" for r in values)
        print(f"{name} / none tokens/s: median {statistics.median(values):.3f}x (rounds: {shown})")
    texts = {name: [json.loads(line)["messages"][-1]["content"] for line in open(work / f"{name}.jsonl")] for name in variants}
    print("same responses in all three runs:", texts["none"] == texts["math"] == texts["sleepy"])


if __name__ == "__main__":
    main()
