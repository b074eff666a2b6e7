"""Scale: tokens/s of ``--engine ray`` with 1 and 2 local replicas, beside one local process.

    PYTHONPATH=. python benchmarks/bench_replicas.py                 # tiny models, 64 prompts, CPU
    PYTHONPATH=. python benchmarks/bench_replicas.py --replicas 1 2 4 --device cuda   # GPUs at hand

All from one run, on the same prompts, models and settings (``run_generate`` as the CLI calls it),
against one local Ray started here with one CPU per replica (or one GPU each on a GPU machine):

* wall tok/s: the run's new tokens over its whole time, replica start-up (process, imports, model
  load) included, as a user sees it;
* busy tok/s: the sum over replicas of tokens over the time each spent generating, start-up left out;
* local: one process without Ray, at 1 thread and at the machine's thread count, for scale.

The machine's load average is printed before and after: replicas only scale into free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from bench_alpha import print_header

from qstar_cli import GenerateConfig, run_generate
from qstar_cli.testing.tiny import save_tiny_model


def write_prompts(path: Path, count: int) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about the number {i}. " * (1 + i % 5)}]} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(settings: dict, output: Path, **overrides) -> tuple[float, float, int]:
    """(wall tok/s, busy tok/s, threads per worker) of one fresh run."""
    summary = run_generate(GenerateConfig(**settings, output=str(output), overwrite=True, **overrides))
    session = json.loads(summary.paths.meta.read_text())["sessions"][-1]
    if session["engine"]["name"] == "local":
        return summary.tokens_per_second, summary.tokens_per_second, torch.get_num_threads()
    per_replica = session["engine"]["per_replica"]
    return summary.tokens_per_second, sum(r["tokens_per_s"] for r in per_replica), per_replica[0]["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved; medians shown")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import ray
    import transformers

    transformers.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="bench_replicas_"))
    theta = save_tiny_model(root / "theta", seed=1, hidden_size=256, num_layers=4)
    target = save_tiny_model(root / "target", seed=2, hidden_size=256, num_layers=4)
    write_prompts(root / "prompts.jsonl", args.prompts)
    settings = dict(
        model_theta=str(theta), model_t=str(target), theta_format="plain", dataset=str(root / "prompts.jsonl"),
        max_new_tokens=args.new_tokens, batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    ray.init(num_cpus=max(args.replicas) if not gpus else None, include_dashboard=False, logging_level="WARNING")

    variants = {f"ray x{n}": {"engine": "ray", "replicas": n} for n in args.replicas}
    if args.device == "cpu":
        variants = {
            "local, 1 thread": {"threads": 1},
            f"local, {torch.get_num_threads()} threads": {"threads": torch.get_num_threads()},
            **variants,
        }
    load_before = os.getloadavg()
    measured: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
    threads = torch.get_num_threads()
    for _ in range(args.repeats):
        for name, variant in variants.items():
            overrides = {k: v for k, v in variant.items() if k != "threads"}
            torch.set_num_threads(variant.get("threads", threads))
            measured[name].append(run(settings, root / "out.jsonl", **overrides))
            torch.set_num_threads(threads)
    load_after = os.getloadavg()
    ray.shutdown()

    print_header(
        f"device={args.device} gpus={gpus} cpus={os.cpu_count()} ray={ray.__version__} prompts={args.prompts} "
        f"new_tokens<={args.new_tokens} batch={args.batch_size} repeats={args.repeats} "
        f"load avg before {load_before[0]:.2f} after {load_after[0]:.2f}",
        f"{'variant':<18} {'threads/worker':>14} | {'wall tok/s':>10} {'busy tok/s':>10} | {'wall vs ray x1':>14}",
    )
    base = statistics.median(w for w, _, _ in measured.get("ray x1", [(float("nan"), 0, 0)]))
    for name, runs in measured.items():
        wall = statistics.median(w for w, _, _ in runs)
        busy = statistics.median(b for _, b, _ in runs)
        print(f"{name:<18} {runs[0][2]:>14} | {wall:>10.1f} {busy:>10.1f} | {wall / base:>13.2f}x")


if __name__ == "__main__":
    main()
