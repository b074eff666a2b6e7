"""The demo q* step of this tree against another release's, side by side: milliseconds per round at
each batch size, in fresh processes alternating ABBA between the two trees (the other release from a
git worktree outside the repository), so that both see the same machine.

    .venv/bin/python benchmarks/bench_step_against.py --baseline e37662e --batches 8 32 --repeats 4

Each process loads the demo pair (pi_theta on the plain format, pi_t on chat, float32, CPU), runs one
untimed ``generate`` per batch, then ``--runs`` timed ones of ``--new-tokens`` tokens (EOS ignored)
and reports its best step (``bench_sampler.qstar``: the rounds after the first). The table gives,
per batch, each tree's median over the processes and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: One process's measurement, run in a tree's root: that tree's package and benchmark helpers (the
#: installed, editable qstar would shadow another tree's package: its finder is dropped first).
MEASURE = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]
sys.path[:0] = ['.', 'benchmarks']
import qstar_cli
assert qstar_cli.__file__.startswith(sys.argv[1]), qstar_cli.__file__
from bench_alpha import demo_sampler
from bench_sampler import padded_prompts, qstar
new_tokens, runs = int(sys.argv[2]), int(sys.argv[3])
sampler = demo_sampler(new_tokens)
sampler.eos = set()
steps = {}
for batch in map(int, sys.argv[4:]):
    convs = padded_prompts(batch, 0)
    prompts = [sampler.encode_prompts(c) for c in convs]
    qstar(sampler, convs, prompts)
    steps[batch] = min(qstar(sampler, convs, prompts) for _ in range(runs)) * 1e3 / (new_tokens - 1)
print(json.dumps(steps))
"""


def measure(tree: Path, args) -> dict[str, float]:
    command = [sys.executable, "-c", MEASURE, str(tree), str(args.new_tokens), str(args.runs), *map(str, args.batches)]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="The commit to compare against.")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2, help="timed generates per process and batch (best kept)")
    parser.add_argument("--repeats", type=int, default=4, help="processes per tree, in ABBA order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(baseline), args.baseline], check=True)
        trees = {"this tree": REPO, args.baseline: baseline}
        steps: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        try:
            for repeat in range(args.repeats):
                for name in list(trees)[:: 1 if repeat % 2 == 0 else -1]:
                    steps[name].append(measure(trees[name], args))
                    print(f"{name}: {steps[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=True)
    print(f"demo step, ms per round, median of {args.repeats} processes (best of {args.runs} runs each), {args.new_tokens} tokens")
    print(f"{'batch':>5} | {'this tree':>9} {args.baseline:>9} | {'ratio':>6}")
    for batch in map(str, args.batches):
        this, base = (statistics.median(s[batch] for s in steps[name]) for name in trees)
        print(f"{batch:>5} | {this:>9.1f} {base:>9.1f} | {this / base:>6.3f}")


if __name__ == "__main__":
    main()
