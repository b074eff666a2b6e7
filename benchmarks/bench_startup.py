"""How long ``qstar --help`` and friends take to start (the package imports torch only when a
command needs it). Median of ``--repeats`` fresh processes per command.

    .venv/bin/python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["analyze", "--help"], ["generate", "--help"], ["--version"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    imports = "import sys, qstar_cli.cli; print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, check=True).stdout.strip()
    print(f"heavy modules imported by qstar_cli.cli: {heavy}")
    for command in COMMANDS:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "qstar_cli", *command], capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        print(f"qstar {' '.join(command):<16} {statistics.median(times):.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
