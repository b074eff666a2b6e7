"""One float32 linear on the CPU: oneDNN on a prepacked weight against ``F.linear`` (MKL's sgemm),
microseconds per call by weight shape and rows, to place ``cpu_linears.MIN_PACKED_ELEMENTS``.

    .venv/bin/python benchmarks/bench_cpu_linears.py

Best of three loops of ``--calls`` calls each, at torch's default threads.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional

#: (in, out): the tiny test models' sizes, the crossover's, and the demo model's (SmolLM2-135M:
#: k/v 576 x 192, q 576 x 576, q/k/v fused 576 x 960, gate/up fused 576 x 3072, down 1536 x 576).
SHAPES = [(64, 64), (256, 256), (128, 512), (576, 192), (256, 1024), (576, 576), (576, 960), (576, 3072), (1536, 576)]
ROWS = (1, 8, 32)


def microseconds(call, calls: int) -> float:
    for _ in range(20):
        call()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    packed_linear = torch.ops.mkldnn._linear_pointwise.default
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per call, packed / sgemm")
    print("| in x out (elements) | " + " | ".join(f"rows {r}" for r in ROWS) + " |\n|---|" + "---|" * len(ROWS))
    for in_features, out_features in SHAPES:
        weight = torch.randn(out_features, in_features)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        cells = []
        for rows in ROWS:
            x = torch.randn(rows, in_features)
            ours = microseconds(lambda: packed_linear(x, packed, None, "none", [], ""), args.calls)
            plain = microseconds(lambda: functional.linear(x, weight), args.calls)
            cells.append(f"{ours:.1f} / {plain:.1f}")
        print(f"| {in_features} x {out_features} ({in_features * out_features / 1e3:.0f}k) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
