"""One-command device check: q* throughput at real model shapes (random weights), against one model's
own ``generate``, speculative q*, slot utilisation, memory bandwidth, peak memory, and the checks
that must hold on the device.

    python benchmarks/gpu_check.py                      # CUDA: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B shapes, bf16
    python benchmarks/gpu_check.py --device cpu --quick # here and in CI: the 135M shape (4 layers), float32, a few tokens

Needs only torch and transformers (and this package): models are built from configs with random
weights at the real shapes, over a synthetic tokenizer of the real vocabulary size, so nothing is
downloaded. Prints one table row per measurement; exits 1 if a check fails. q* runs eager and
compiled (``--compile on``: the round's mathematics and the decode forwards; CUDA graphs on CUDA).

Checks, everywhere: cached logp_t = a full forward; one transfer per round; the compiled path at
``--draft-k`` 0 and 4 and with a draft pair (decode and verify forwards), rows shrinking as each
stops at its own EOS over prompts of different lengths, with no recompile or CUDA-graph skip after
warm-up, logp_t = a full forward and = eager; the same at ``--draft-k`` 0 and 4 for a sliding-window
family (Gemma 3 1B's shapes) and a MoE family with attention sinks (gpt-oss-20b's, 4 layers); draws under top-k/top-p never on a zero-probability
token (a million on a GPU). On CUDA also: synchronisations per round while rows finish and refill
(``set_sync_debug_mode``), ms per compiled forward just under and over bucket edges,
``--batch-size auto`` at 0.9 at the 8B shape with 300- and 1,500-token prompts through the first
prefill, its peak memory against the plan, and, with several GPUs, a run on the last one
(``cuda:N``: its finished rows' values copied back on that GPU's stream).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch._dynamo.utils import counters
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qstar_cli.distributions.mixture import EARLY_EXIT_DEVICES
from qstar_cli.distributions.sampling import SamplingParams, counter_uniform, sample_tokens, sampling_logprobs
from qstar_cli.engine import rows as rows_module
from qstar_cli.engine import sampler as sampler_module
from qstar_cli.engine.compiled import warm_up
from qstar_cli.engine.memory import kv_bytes_per_token, size
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.roles import Role
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


#: A sliding-window family and a MoE family at their real per-layer shapes (transformers' config
#: classes): name: (model type, config, layers kept, what --quick changes). gpt-oss keeps 4 of its
#: 24 layers (32 experts each: the whole model at random would take minutes to build). --quick (a
#: CPU) keeps 2 layers, a vocabulary of 32768 and windows of 8 tokens (its sequences are short), and
#: gpt-oss 4 narrow experts.
FAMILY_SHAPES = {
    "gemma-3-1b": ("gemma3_text", dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   sliding_window=512, query_pre_attn_scalar=256, vocab_size=262144), 26, {}),
    "gpt-oss-20b": ("gpt_oss", dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                    num_local_experts=32, num_experts_per_tok=4, sliding_window=128, vocab_size=201088), 4,
                    dict(hidden_size=576, intermediate_size=576, num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                         num_experts_per_tok=2)),
}  # fmt: skip


def build_family(shape: str, seed: int, device, dtype, quick: bool) -> LoadedModel:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model_type, values, layers, smaller = FAMILY_SHAPES[shape]
    values = {
        **values,
        "num_hidden_layers": 2 if quick else layers,
        "max_position_embeddings": 8192,
        "bos_token_id": None,
        "pad_token_id": 0,
    }
    if quick:
        values |= {"vocab_size": 32768, "sliding_window": 8, **smaller}
    # Every other layer slides, whatever the layer count (Gemma 3 itself has 5 sliding layers to 1 full).
    values["layer_types"] = ["sliding_attention", "full_attention"] * (values["num_hidden_layers"] // 2)
    config = CONFIG_MAPPING[model_type](**values, eos_token_id=values["vocab_size"] - 1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=0)
    return LoadedModel(model, synthetic_tokenizer(config.vocab_size), f"{shape}{'-2l' if quick else ''}")


def requests(batch: int, prompt: int, vocab: int) -> list[SampleRequest]:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab - 1, (batch, prompt), generator=gen).tolist()
    return [SampleRequest(i, p, p) for i, p in enumerate(ids)]


def varied_requests(batch: int, prompt: int, vocab: int) -> list[SampleRequest]:
    """Prompts of lengths from ``prompt / 2`` to ``prompt``: rows of one forward at different widths."""
    return [SampleRequest(r.sample_idx, r.prompt_ids_t[: prompt // 2 + i * prompt // (2 * batch)], r.prompt_ids_t[: prompt // 2 + i * prompt // (2 * batch)])
            for i, r in enumerate(requests(batch, prompt, vocab))]  # fmt: skip


def logp_t_against_full_forward(sampler: DualModelSampler, request: SampleRequest, result) -> float:
    """Max |d logp_t| between a sample's recorded values and one full forward of pi_t over it."""
    loaded, device = sampler.target, sampler.target.model.device
    ids = torch.tensor([request.prompt_ids_t + result.token_ids], device=device)
    logits = loaded.model(input_ids=ids).logits[0, len(request.prompt_ids_t) - 1 : -1, : sampler.vocab].float().log_softmax(-1)
    full = logits.gather(-1, torch.tensor(result.token_ids, device=device)[:, None])[:, 0].cpu()
    return (full.double() - torch.tensor(result.per_token["logp_t"], dtype=torch.float64)).abs().max().item()


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
    return stats.tokens / seconds, stats.utilisation(batch), seconds / max(stats.rounds, 1)


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
        ("one transfer per round", counts["round"] == stats.rounds and other_ok,
         f"{counts['round']} transfers for {stats.rounds} rounds, {counts['other']} other reads"),
    ]  # fmt: skip


#: The draft settings :func:`compiled_checks` runs by default.
DRAFT_SETTINGS = (("k=0", {}), ("k=4", {"draft_k": 4}), ("pair k=4", {"draft_k": 4, "pair": True}))


def compiled_checks(
    theta: LoadedModel, target: LoadedModel, slots: int, prompt: int, new: int, settings=DRAFT_SETTINGS, name: str = ""
) -> list[tuple[str, bool, str]]:
    """The compiled path after warm-up, with draft-k 0 and 4 and the pair drafter (``settings``):
    ``slots`` rows of prompts of different lengths, each stopping at its own EOS (one id in 97 ends a
    row), so rows shrink from the slots towards 1 and widths cross bucket edges. No recompile, no
    CUDA-graph skip; logp_t equals a full forward's and eager's (over the tokens both drew alike)."""
    out, device = [], target.model.device
    bound = 1e-4 if target.model.dtype == torch.float32 else 5e-2
    for label, kwargs in settings:
        label = f"{name} {label}".strip()
        kwargs = {k: v for k, v in kwargs.items() if k != "pair"} | ({"draft_pair": (theta, target)} if kwargs.get("pair") else {})
        samplers = [DualModelSampler(theta, target, max_new_tokens=new, compile=c, **kwargs) for c in (False, True)]
        for sampler in samplers:
            sampler.eos = set(range(1, sampler.vocab, 97))
        warm_up(samplers[1])
        graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
        reqs = varied_requests(slots, prompt, samplers[0].vocab)
        try:
            eager, compiled = (dict(s.stream(reqs, slots)) for s in samplers)
        except Exception as err:  # noqa: BLE001 - a recompile past dynamo's limit raises (fail_on_recompile_limit_hit)
            out.append((f"compiled {label}: ran", False, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
            continue
        sync(device)
        recompiles, graph_skips = counters["stats"]["unique_graphs"] - graphs, counters["inductor"]["cudagraph_skips"] - skips
        lengths = sorted(len(r.token_ids) for r in compiled.values())
        full = max(logp_t_against_full_forward(samplers[1], reqs[i], r) for i, r in compiled.items())
        alike, d_eager = 0, 0.0
        for i, a in eager.items():
            b = compiled[i]
            same = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
            alike += same
            if same:
                d_eager = max(d_eager, max(abs(x - y) for x, y in zip(a.per_token["logp_t"][:same], b.per_token["logp_t"][:same])))
        out += [
            (f"compiled {label}: no recompile or CUDA-graph skip after warm-up", recompiles == 0 and graph_skips == 0,
             f"{recompiles} graphs, {graph_skips} skips; rows ended after {lengths[0]}..{lengths[-1]} tokens"),
            (f"compiled {label}: logp_t = full forward, = eager", full < bound and d_eager < bound,
             f"{full:.2e}, {d_eager:.2e} over {alike} tokens drawn alike < {bound:g}"),
        ]  # fmt: skip
    return out


def zero_probability_draws(device, vocab: int, draws: int) -> tuple[str, bool, str]:
    """``draws`` tokens under top-k and top-p (zeros scattered through the vocabulary): none is a
    token of probability zero (a parallel scan's rounding must not land a draw on one)."""
    params, gen = SamplingParams(temperature=1.0, top_k=vocab // 8, top_p=0.9), torch.Generator(device).manual_seed(0)
    batch, bad, done = 4096, 0, 0
    while done < draws:
        logp = sampling_logprobs((3 * torch.randn(batch, vocab, device=device, generator=gen)).log_softmax(-1), params)
        index = torch.arange(done, done + batch, device=device)
        tokens = sample_tokens(logp, counter_uniform(0, index, torch.zeros_like(index)))
        bad += int((logp.gather(-1, tokens[:, None]) == -torch.inf).sum())
        done += batch
    return (f"{done} draws (top-k {vocab // 8}, top-p 0.9): none of probability 0", bad == 0, f"{bad} on a zero")


class _Stop(Exception):
    pass


def auto_memory_check(shape: str, device, dtype, prompt: int, rounds: int = 3) -> tuple[str, bool, str]:
    """``--batch-size auto`` at 0.9 with ``prompt``-token prompts: the plan, then the first prefill
    and a few rounds; the peak memory against what the plan let it use (CUDA)."""
    theta, target = build(shape, 1, device, dtype), build(shape, 2, device, dtype)
    torch.cuda.empty_cache()  # the float32 weights built first: free for the plan to see
    sampler = DualModelSampler(theta, target, max_new_tokens=64)
    reqs = requests(4096, prompt, sampler.vocab)
    plan = sampler.plan_slots([(r.prompt_ids_theta, r.prompt_ids_t) for r in reqs], 0.9, samples=len(reqs))
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)

    def stop(_):
        nonlocal rounds
        rounds -= 1
        if not rounds:
            raise _Stop

    ok, detail = True, ""
    try:
        list(sampler.stream(reqs[: plan.slots], plan.slots, on_round=stop))
    except _Stop:
        pass
    except torch.OutOfMemoryError as err:
        ok, detail = False, f"out of memory: {str(err).splitlines()[0][:100]}; "
    used = torch.cuda.max_memory_allocated(device) - before
    allowed = int(plan.memory_fraction * plan.free_bytes)
    del theta, target, sampler
    torch.cuda.empty_cache()
    return (f"--batch-size auto {shape} prompts of {prompt}: {plan.slots} slots fit", ok and used <= allowed,
            f"{detail}peak {size(used)} of {size(allowed)} planned (prefill reserve {size(plan.prefill_bytes)})")  # fmt: skip


def syncs_per_round(sampler: DualModelSampler, slots: int, prompt: int) -> tuple[str, bool, str]:
    """CUDA synchronisations while rows finish and refill (``torch.cuda.set_sync_debug_mode``): the
    round's one transfer alone."""
    stats = StreamStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            list(sampler.stream(varied_requests(3 * slots, prompt, sampler.vocab), slots, stats=stats))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return ("synchronisations per round (finishes, refills)", syncs <= stats.rounds, f"{syncs} for {stats.rounds} rounds")


def other_gpu_check(shape: str, dtype, new: int) -> tuple[str, bool, str]:
    """``--device cuda:N`` with N > 0: every sample's recorded logp_t (copied back from that GPU's
    stream as rows finish) equals a full forward's there, none read before its copy was done."""
    device = torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    sampler = DualModelSampler(build(shape, 1, device, dtype, 4), build(shape, 2, device, dtype, 4), max_new_tokens=new)
    sampler.eos = set(range(1, sampler.vocab, 97))  # rows finish in different rounds
    reqs = varied_requests(16, 32, sampler.vocab)
    results = dict(sampler.stream(reqs, 8))
    diff = max(logp_t_against_full_forward(sampler, reqs[i], r) for i, r in results.items())
    return (f"--device {device}: recorded logp_t = full forward", diff < 5e-2, f"{diff:.2e} over {len(results)} samples")


def bucket_edge_ms(loaded: LoadedModel, run, vocab: int) -> list[str]:
    """ms per compiled decode forward at rows and widths just under and over bucket edges."""
    out, device = [], loaded.model.device
    cache = SlotCache(loaded.model.config, 64, 1100, compiled=True, bucketed=True)
    for rows, width in ((16, 256), (17, 256), (16, 257), (32, 1024), (33, 1024), (32, 1025)):
        ids = torch.ones(rows, 1, dtype=torch.long, device=device)
        at = torch.full((rows, 1), width - 1, device=device)
        for _ in range(3):
            cache.forward(loaded.model, ids, at, 0, width, vocab, run=run)
        sync(device)
        started = time.perf_counter()
        for _ in range(20):
            cache.forward(loaded.model, ids, at, 0, width, vocab, run=run)
        sync(device)
        out.append(f"rows {rows} width {width}: {1e3 * (time.perf_counter() - started) / 20:.2f} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the 135M shape with 4 layers, batches 1 and 8, a few tokens (CPU, CI)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # A forward past dynamo's recompile limit would run eager, silently: here it fails the check.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise SystemExit(
            f"error: device {args.device!r} is not usable here ({str(err).splitlines()[0]}); try --device cpu --quick"
        ) from None
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
        results = checks(samplers["eager"])
        if device.type == "cuda":
            results.append(syncs_per_round(samplers["compiled"], 8, prompt))
            print(
                "\n".join(
                    f"compiled decode {target.name}: {line}"
                    for line in bucket_edge_ms(target, samplers["compiled"].roles[Role.T].compiled, samplers["compiled"].vocab)
                )
            )
        if shape != "llama-3.1-8b":  # the compiled path at each draft setting (the 8B shape: its throughput above)
            results += compiled_checks(theta, target, 6 if args.quick else 64, 16 if args.quick else 384, 16 if args.quick else 192)
        for name, ok, detail in results:
            failed |= not ok
            print(f"check {shape}: {name}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)
        del theta, target, samplers, sampler
    for shape in FAMILY_SHAPES:  # each layer its own mask, compiled: against eager and a full forward
        theta, target = (build_family(shape, seed, device, dtype, args.quick) for seed in (1, 2))
        slots, prompt_len, new_len = (4, 24, 8) if args.quick else (16, 384, 192)
        for name, ok, detail in compiled_checks(theta, target, slots, prompt_len, new_len, DRAFT_SETTINGS[:2], target.name):
            failed |= not ok
            print(f"check {shape}: {name}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)
        del theta, target
    small, large = ("smollm2-135m", "smollm2-135m") if args.quick else ("llama-3.2-1b", "llama-3.1-8b")
    theta = build(small, 1, device, dtype, layers=4 if args.quick else None)
    target = build(large, 2, device, dtype)
    for k in (0, 4):
        spec = DualModelSampler(theta, target, max_new_tokens=new, draft_k=k)
        spec.eos = set()
        rate, util, per_round = qstar_rate(spec, 1 if args.quick else 8, prompt, new)
        print(
            f"{f'speculative q* {theta.name} -> {large} k={k}':<44} {1 if args.quick else 8:>5} | {rate:>9.1f} {util:>5.2f} {1e3 * per_round:>9.2f}"
        )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del theta, target, spec
    results = [zero_probability_draws(device, 4096 if args.quick else 128256, 8192 if args.quick else 1_000_000)]
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        results.append(other_gpu_check("smollm2-135m", dtype, new))
    if device.type == "cuda":
        results += [auto_memory_check("llama-3.1-8b", device, dtype, prompt) for prompt in (300, 1500)]
    for name, ok, detail in results:
        failed |= not ok
        print(f"check: {name}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)
    print(f"peak memory {peak / (1 << 30):.2f} GiB; slot cache {SlotCache.__module__}; {'FAILED' if failed else 'all checks ok'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
