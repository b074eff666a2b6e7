"""The model-family matrix's figures: per family and run, the worst error of every stored per-token
number against a float64 full forward of transformers' own model (tests/engine/test_families.py
bounds them by 1e-4; this prints them, with every family compiled, which the test suite does for two).
As in the test, every linear runs on oneDNN with q/k/v and gate/up fused, as at real shapes.

    .venv/bin/python benchmarks/family_matrix.py                      # every family, every run (compiled: a minute or more each)
    .venv/bin/python benchmarks/family_matrix.py --modes plain draft_k=3 --families gemma3_text gpt_oss

A Markdown table: one row per family, the worst error over its fields in each run (and which field
it was), then the refused families with the reason ``generate`` gives before loading.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from qstar_cli.engine import cpu_linears
from qstar_cli.engine.models import LoadedModel
from qstar_cli.testing.families import FAMILIES, MODES, build_family_model, family_status, reference_model, worst_errors
from qstar_cli.testing.tiny import build_tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--families", nargs="+", default=[f.key for f in FAMILIES], help="their keys (model types)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    cpu_linears.MIN_PACKED_ELEMENTS = 0  # every linear on oneDNN, siblings fused, as at real shapes (and in the test)
    tokenizer = build_tiny_tokenizer()
    families = [f for f in FAMILIES if f.key in args.families]
    print(
        f"torch {torch.__version__}; worst |stored - float64 full forward| over every stored per-token number (alpha: float64 KL imbalance)"
    )
    print("| family | " + " | ".join(args.modes) + " | seconds |")
    print("|---|" + "---|" * (len(args.modes) + 1))
    refused = []
    for family in families:
        attention, status = family_status(family)
        if status != "exact":
            refused.append(f"| {family.name} | `{family.model_type}` | {status} |")
            continue
        started, cells = time.perf_counter(), []
        theta = build_family_model(family, tokenizer, seed=1)
        target = build_family_model(family, tokenizer, seed=2, attn_implementation="eager")
        pair = LoadedModel(theta, tokenizer, "theta"), LoadedModel(target, tokenizer, "target")
        refs = reference_model(theta), reference_model(target)
        for mode in args.modes:
            if mode == "compiled":  # one model in both roles, as the test does (one compilation)
                # Each family compiled afresh, as in its own process: dynamo's cache of transformers'
                # shared forward wrapper would otherwise fill up (32 entries) and run later ones eager.
                torch._dynamo.reset()
                worst, _ = worst_errors((refs[0], refs[0]), (pair[0], pair[0]), mode)
            else:
                worst, _ = worst_errors(refs, pair, mode)
            field = max(worst, key=worst.get)
            cells.append(f"{worst[field]:.1e} ({field})")
        print(f"| {family.name} | " + " | ".join(cells) + f" | {time.perf_counter() - started:.0f} |", flush=True)
    if refused:
        print("\n| refused family | model type | before loading |\n|---|---|---|\n" + "\n".join(refused))


if __name__ == "__main__":
    main()
