"""How long qstar takes to start and to end: ``qstar --help`` and friends (the package imports torch only
when a command needs it), and a whole 1-token ``generate`` of the tiny models (imports, loading, one
round, writing, and the process's end). Median of ``--repeats`` fresh processes per command.

With ``--baseline COMMIT`` the 1-token run of that release (a git worktree outside the repository)
runs interleaved with this one's, so that both see the same machine.

    .venv/bin/python benchmarks/bench_startup.py --repeats 5 --baseline 6efac2c
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (["--help"], ["analyze", "--help"], ["generate", "--help"], ["--version"])


def seconds(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, capture_output=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def tiny_run(root: Path) -> list[str]:
    """The arguments of a 1-token generate of the tiny pair (built once under ``root``)."""
    from qstar_cli.testing.tiny import save_tiny_model

    theta, target, data = root / "theta", root / "target", root / "prompts.jsonl"
    save_tiny_model(theta, seed=1, sharpness=4.0)
    save_tiny_model(target, seed=2, sharpness=4.0)
    data.write_text(json.dumps({"prompt": "Say one word."}) + "\n")
    return ["generate", "--model-theta", str(theta), "--model-t", str(target), "--theta-format", "plain", "--dataset", str(data),
            "--max-new-tokens", "1", "--device", "cpu", "--overwrite", "--output", str(root / "out.jsonl")]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="A commit to time the 1-token run of, side by side.")
    args = parser.parse_args()
    imports = "import sys, qstar_cli.cli; print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    print(f"heavy modules imported by qstar_cli.cli: {heavy}")
    qstar = [sys.executable, "-m", "qstar_cli"]
    for command in COMMANDS:
        times = [seconds([*qstar, *command], REPO) for _ in range(args.repeats)]
        print(f"qstar {' '.join(command):<16} {statistics.median(times):.3f} s (median of {args.repeats})")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = tiny_run(root)
        trees = {"this tree": REPO}
        if args.baseline:
            trees[args.baseline] = root / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(root / "baseline"), args.baseline], check=True)
        try:
            times: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    times[name].append(seconds([*qstar, *run], tree))
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / "baseline")], check=True)
        for name, values in times.items():
            print(f"1-token tiny generate, {name:<10} {statistics.median(values):.3f} s (median of {args.repeats}; "
                  f"min {min(values):.3f}, max {max(values):.3f})")  # fmt: skip
        if args.baseline:
            ratio = statistics.median(times["this tree"]) / statistics.median(times[args.baseline])
            print(f"this tree / {args.baseline}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
