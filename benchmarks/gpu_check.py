"""One-command device check: q* throughput at real model shapes (random weights), against one model's
own ``generate``, speculative q*, slot utilisation, memory bandwidth, peak memory, and the checks
that must hold on the device.

    python benchmarks/gpu_check.py                      # CUDA: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B shapes, bf16
    python benchmarks/gpu_check.py --device cpu --quick # here and in CI: the 135M shape (4 layers), float32, a few tokens

Needs only torch and transformers (and this package): models are built from configs with random
weights at the real shapes, over a synthetic tokenizer of the real vocabulary size, so nothing is
downloaded. Prints one table row per measurement; exits 1 if a check fails. q* runs eager and
compiled (``--compile on``: the round's mathematics and the decode forwards; CUDA graphs on CUDA).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qstar_cli.distributions.mixture import EARLY_EXIT_DEVICES
from qstar_cli.engine import rows as rows_module
from qstar_cli.engine import sampler as sampler_module
from qstar_cli.engine.compiled import warm_up
from qstar_cli.engine.memory import kv_bytes_per_token
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.sampler import DualModelSampler
from qstar_cli.engine.samples import SampleRequest, StreamStats
from qstar_cli.engine.slots import SlotCache

#: What Python reads tensor data with.
HOST_READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")
#: name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings)
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
}


def synthetic_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Whitespace-split words ``t0 .. t{vocab-2}`` and an EOS: the real vocabulary size, no download."""
    words = {f"t{i}": i for i in range(vocab - 1)} | {"<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="t0")


def build(shape: str, seed: int, device, dtype, layers: int | None = None) -> LoadedModel:
    hidden, inter, n_layers, heads, kv, vocab, tied = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, max_position_embeddings=8192,
        eos_token_id=vocab - 1, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    return LoadedModel(model, synthetic_tokenizer(vocab), f"{shape}{'' if layers is None else f'-{layers}l'}")


def requests(batch: int, prompt: int, vocab: int) -> list[SampleRequest]:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab - 1, (batch, prompt), generator=gen).tolist()
    return [SampleRequest(i, p, p) for i, p in enumerate(ids)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Bytes/s of a large on-device copy (read + write): the reference for the achieved bandwidth."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * 5 * x.numel() / (time.perf_counter() - started)


def qstar_rate(sampler: DualModelSampler, batch: int, prompt: int, new: int) -> tuple[float, float, float]:
    """(tokens/s, slot utilisation, seconds per round) of ``batch`` rows of ``new`` tokens."""
    stats, device = StreamStats(), sampler.theta.model.device
    reqs = requests(batch, prompt, sampler.vocab)
    list(sampler.stream(reqs[:1], 1))  # warm-up
    sync(device)
    started = time.perf_counter()
    list(sampler.stream(reqs, batch, stats=stats))
    sync(device)
    seconds = time.perf_counter() - started
    return stats.tokens / seconds, stats.utilisation(batch), seconds / max(stats.steps, 1)


def hf_rate(loaded: LoadedModel, batch: int, prompt: int, new: int) -> float:
    ids = torch.tensor([r.prompt_ids_t for r in requests(batch, prompt, loaded.model.config.vocab_size)], device=loaded.model.device)
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, pad_token_id=0)
    loaded.model.generate(input_ids=ids[:1], generation_config=config)
    sync(loaded.model.device)
    started = time.perf_counter()
    loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    sync(loaded.model.device)
    return batch * new / (time.perf_counter() - started)


def hf_batch_rate(loaded: LoadedModel, batch: int, prompt: int, new: int) -> str:
    """tokens/s of transformers' continuous batching (``generate_batch``), or why it did not run."""
    ids = [r.prompt_ids_t for r in requests(batch, prompt, loaded.model.config.vocab_size)]
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, pad_token_id=0, eos_token_id=None)
    attention = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("sdpa")  # continuous batching takes transformers' own (paged) kernels
    try:
        loaded.model.generate_batch(ids[:1], generation_config=config)
        sync(loaded.model.device)
        started = time.perf_counter()
        outputs = loaded.model.generate_batch(ids, generation_config=config)
        sync(loaded.model.device)
    except Exception as err:  # noqa: BLE001 - a figure this check cannot give is reported, not fatal
        return f"{'n/a':>9} ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})"
    finally:
        loaded.model.set_attn_implementation(attention)
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return f"{tokens / (time.perf_counter() - started):>9.1f}"


def checks(sampler: DualModelSampler) -> list[tuple[str, bool, str]]:
    """Slot-cache log-probs equal a full forward's; a round waits for the device once."""
    loaded, device = sampler.target, sampler.target.model.device
    [req] = requests(1, 16, sampler.vocab)
    [(_, result)] = list(sampler.stream([req], 1))
    ids = torch.tensor([req.prompt_ids_t + result.token_ids], device=device)
    logits = loaded.model(input_ids=ids).logits[0, len(req.prompt_ids_t) - 1 : -1, : sampler.vocab].float().log_softmax(-1)
    full = logits.gather(-1, torch.tensor(result.token_ids, device=device)[:, None])[:, 0].cpu()
    diff = (full.double() - torch.tensor(result.per_token["logp_t"], dtype=torch.float64)).abs().max().item()
    bound = 1e-4 if loaded.model.dtype == torch.float32 else 5e-2
    # Every read of tensor data while the rows stream, by whomever but the rows module (whose
    # to_host is the round's transfer); on a GPU each read waits for the device.
    counts, originals = {"round": 0, "other": 0}, {name: getattr(torch.Tensor, name) for name in HOST_READS}
    transfer = sampler_module.to_host

    def round_transfer(tensor):
        counts["round"] += 1
        return transfer(tensor)

    def spied(name):
        def read(self, *args, **kwargs):
            counts["other"] += sys._getframe(1).f_globals.get("__name__") != rows_module.__name__
            return originals[name](self, *args, **kwargs)

        return read

    sampler_module.to_host = round_transfer
    for name in HOST_READS:
        setattr(torch.Tensor, name, spied(name))
    try:
        stats = StreamStats()
        list(sampler.stream(requests(4, 16, sampler.vocab), 4, stats=stats))
    finally:
        sampler_module.to_host = transfer
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    # The CPU's alpha solver reads a flag per iteration to stop early (free there; not on a GPU).
    other_ok = counts["other"] == 0 or device.type in EARLY_EXIT_DEVICES
    return [
        ("slot cache = full forward (max |d logp_t|)", diff < bound, f"{diff:.2e} < {bound:g}"),
        ("one transfer per round", counts["round"] == stats.steps and other_ok,
         f"{counts['round']} transfers for {stats.steps} rounds, {counts['other']} other reads"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the 135M shape with 4 layers, batches 1 and 8, a few tokens (CPU, CI)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise SystemExit(f"error: device {args.device!r} is not usable here ({str(err).splitlines()[0]}); try --device cpu --quick") from None
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes, batches = (["smollm2-135m"], [1, 8]) if args.quick else (list(SHAPES), [1, 8, 64])
    prompt, new = (16, 8) if args.quick else (128, 128)
    reference = copy_bandwidth(device)
    print(f"torch={torch.__version__} device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={dtype} prompt={prompt} new={new} copy bandwidth {reference / 1e9:.1f} GB/s")  # fmt: skip
    print(f"{'what':<44} {'batch':>5} | {'tok/s':>9} {'util':>5} {'ms/round':>9} {'of bandwidth':>12}")
    failed = False
    layers = 4 if args.quick else None  # quick: compiling 30 layers on a CPU takes minutes
    for shape in shapes:
        theta, target = build(shape, 1, device, dtype, layers), build(shape, 2, device, dtype, layers)
        samplers = {mode: DualModelSampler(theta, target, max_new_tokens=new, compile=mode == "compiled") for mode in ("eager", "compiled")}
        for sampler in samplers.values():
            sampler.eos = set()  # every row runs the full length
        print(f"compile {target.name}: {warm_up(samplers['compiled']):.1f} s", flush=True)
        weights = sum(p.numel() * p.element_size() for m in (theta, target) for p in m.model.parameters())
        for batch in batches:
            kv = 2 * batch * (prompt + new / 2) * kv_bytes_per_token(target.model)
            for mode, sampler in samplers.items():
                rate, util, per_round = qstar_rate(sampler, batch, prompt, new)
                print(f"{f'q* {mode} ' + target.name:<44} {batch:>5} | {rate:>9.1f} {util:>5.2f} {1e3 * per_round:>9.2f} "
                      f"{(weights + kv) / per_round / reference:>11.1%}", flush=True)  # fmt: skip
            print(f"{'one model generate ' + target.name:<44} {batch:>5} | {hf_rate(target, batch, prompt, new):>9.1f}", flush=True)
            print(f"{'one model generate_batch ' + target.name:<44} {batch:>5} | {hf_batch_rate(target, batch, prompt, new)}", flush=True)
        for name, ok, detail in checks(samplers["eager"]):
            failed |= not ok
            print(f"check {shape}: {name}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)
        del theta, target, samplers, sampler
    small, large = ("smollm2-135m", "smollm2-135m") if args.quick else ("llama-3.2-1b", "llama-3.1-8b")
    theta = build(small, 1, device, dtype, layers=4 if args.quick else None)
    target = build(large, 2, device, dtype)
    for k in (0, 4):
        spec = DualModelSampler(theta, target, max_new_tokens=new, draft_k=k)
        spec.eos = set()
        rate, util, per_round = qstar_rate(spec, 1 if args.quick else 8, prompt, new)
        print(f"{f'speculative q* {theta.name} -> {large} k={k}':<44} {1 if args.quick else 8:>5} | {rate:>9.1f} {util:>5.2f} {1e3 * per_round:>9.2f}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak memory {peak / (1 << 30):.2f} GiB; slot cache {SlotCache.__module__}; {'FAILED' if failed else 'all checks ok'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
