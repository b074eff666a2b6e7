"""``--batch-size auto`` (slots from the free memory, the arithmetic recorded, the refusal) and ``--compile``."""

import orjson
import pytest

from qstar_cli.engine import memory
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.slots import CAPACITY_CHUNK, SlotCache
from qstar_cli.testing.families import build_family_model, family
from tests.helpers import CONVERSATIONS, file_bytes, invoke, make_sampler, one_line_error, run_files

GIB = 1 << 30


def without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def test_slots_follow_the_arithmetic_by_hand(pair, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: GIB)
    sampler = make_sampler(pair, max_new_tokens=300, draft_k=2)
    prompts = [sampler.encode_prompts(c) for c in CONVERSATIONS]
    plan = sampler.plan_slots(prompts, 0.5, samples=10_000)

    config = pair[0].model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # float32
    longest = [max(len(p[side]) for p in prompts) + 300 for side in (0, 1)]
    capacity = [CAPACITY_CHUNK * -(-(n + 1) // CAPACITY_CHUNK) for n in longest]
    per_slot = sum(c * per_token for c in capacity) + 16 * 3 * sampler.vocab * 4
    # The largest prefill forward: 2048 tokens of the longest prompt at most (one row when it is
    # longer), its activations, keys and values repeated per query head, and its mask (float32 + bool).
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    per_query = 4 * (4 * hidden + 3 * inter + 2 * (heads + 2 * config.num_key_value_heads) * head_dim) + 8 * hidden
    prompt = max(len(p[side]) for p in prompts for side in (0, 1))
    rows = 2048 // prompt
    prefill = rows * prompt * per_query + rows * prompt * 2 * heads * head_dim * 4 + rows * prompt * prompt * 5
    assert plan.kv_bytes_per_token == [per_token, per_token] and plan.capacity == capacity
    assert plan.prefill_chunk_tokens == 2048 and plan.prefill_bytes == prefill
    assert plan.bytes_per_slot == per_slot and plan.slots == (GIB // 2 - prefill) // per_slot
    assert sampler.plan_slots(prompts, 0.5, samples=3).slots == 3, "never more slots than samples"
    assert "slots" in plan.describe() and f"{plan.slots} slots" in plan.describe()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gemma3_text"])
def test_kv_bytes_per_token_are_what_the_slots_hold(model_type, tiny_tokenizer):
    """Latent keys and values (DeepSeek: key heads of 16, value heads of 12, their config's head_dim
    is 8) and mixed layers take what a run's storage takes, per column."""
    loaded = LoadedModel(build_family_model(family(model_type), tiny_tokenizer, seed=1), tiny_tokenizer, model_type)
    sampler = make_sampler((loaded, loaded), max_new_tokens=4)
    caches = []
    real_init = SlotCache.__init__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SlotCache, "__init__", lambda self, *a, **k: caches.append(self) or real_init(self, *a, **k))
        sampler.generate(CONVERSATIONS[:1])
    stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in caches[0].layers) // (caches[0].slots * caches[0].capacity)
    assert memory.kv_bytes_per_token(loaded.model) == stored > 0


def test_auto_run_records_its_plan_and_samples_as_a_fixed_size(base_args, tmp_path):
    auto, fixed = tmp_path / "auto.jsonl", tmp_path / "fixed.jsonl"
    result = invoke("generate", *without(base_args, "--batch-size"), "--batch-size", "auto", "--output", auto)
    assert result.exit_code == 0, result.output
    assert "--batch-size auto: " in result.output
    meta = orjson.loads(run_files(auto)[2].read_bytes())
    plan = meta["slot_plan"]
    assert plan["slots"] >= 1 and plan["memory_fraction"] == 0.9 and meta["config"]["batch_size"] == "auto"
    fits = (int(0.9 * plan["free_bytes"]) - plan["prefill_bytes"]) // plan["bytes_per_slot"]
    assert plan["prefill_bytes"] > 0 and plan["slots"] == min(meta["counts"]["samples"], fits)
    assert invoke("generate", *without(base_args, "--batch-size"), "--batch-size", plan["slots"], "--output", fixed).exit_code == 0
    assert file_bytes(auto)[:2] == file_bytes(fixed)[:2]


def test_a_resumed_auto_run_keeps_the_slots_it_began_with(base_args, tmp_path):
    """On a GPU the kernels, and so the low bits, follow the batch shapes: a resumed run does not size
    itself afresh (here: the plan would give a slot to each sample, the run began with 2)."""
    out = tmp_path / "a.jsonl"
    args = [*without(base_args, "--batch-size"), "--batch-size", "auto", "--output", out]
    assert invoke("generate", *args, "--num-samples", "3").exit_code == 0
    meta = orjson.loads(run_files(out)[2].read_bytes())
    meta["slot_plan"]["slots"] = 2
    run_files(out)[2].write_bytes(orjson.dumps(meta))
    result = invoke("generate", *args)
    assert result.exit_code == 0 and "keeping the 2 slots this run began with" in result.output, result.output
    resumed = orjson.loads(run_files(out)[2].read_bytes())["slot_plan"]
    samples = orjson.loads(run_files(out)[2].read_bytes())["counts"]["samples"]
    assert resumed["slots"] == 2 and resumed["planned_slots"] == samples > 2


def test_one_slot_that_does_not_fit_is_refused(base_args, tmp_path):
    out = tmp_path / "run.jsonl"
    result = invoke("generate", *without(base_args, "--batch-size"), "--batch-size", "auto", "--memory-fraction", "1e-9", "--output", out)
    one_line_error(result, "--batch-size auto: one slot needs", "KiB (keys and values for 256 tokens", "free on cpu", "--memory-fraction")
    assert not out.exists() or out.read_bytes() == b""


def test_a_refused_overwrite_leaves_the_run_as_it_was(base_args, tmp_path):
    out = tmp_path / "done.jsonl"
    assert invoke("generate", *base_args, "--output", out).exit_code == 0
    before = [p.read_bytes() for p in run_files(out)]
    flags = [*without(base_args, "--batch-size"), "--batch-size", "auto", "--memory-fraction", "1e-9", "--overwrite"]
    one_line_error(invoke("generate", *flags, "--output", out), "one slot needs")
    assert [p.read_bytes() for p in run_files(out)] == before


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--batch-size", "many"], "--batch-size must be a positive integer or auto"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--batch-size", "auto", "--memory-fraction", "0"], "--memory-fraction must lie in (0, 1]"),
        (["--batch-size", "auto", "--memory-fraction", "1.5"], "--memory-fraction must lie in (0, 1]"),
        (["--batch-size", "auto", "--engine", "ray"], "--batch-size auto sizes this process's slots"),
    ],
)
def test_bad_sizes_are_refused_in_one_line(base_args, tmp_path, flags, fragment):
    one_line_error(invoke("generate", *without(base_args, "--batch-size"), *flags, "--output", tmp_path / "x.jsonl"), fragment)


def test_compile_on_warms_up_records_and_samples_as_eager(base_args, tmp_path):
    compiled, eager = tmp_path / "on.jsonl", tmp_path / "off.jsonl"
    result = invoke("generate", *base_args, "--compile", "on", "--temperature", "0", "--output", compiled)
    assert result.exit_code == 0, result.output
    assert "compiled in " in result.output
    assert orjson.loads(run_files(compiled)[2].read_bytes())["compile_seconds"] > 0
    assert invoke("generate", *base_args, "--compile", "off", "--temperature", "0", "--output", eager).exit_code == 0
    assert "compile_seconds" not in orjson.loads(run_files(eager)[2].read_bytes())
    assert file_bytes(compiled)[0] == file_bytes(eager)[0], "the same samples"
    one_line_error(invoke("generate", *base_args, "--compile", "maybe", "--output", tmp_path / "x.jsonl"), "--compile must be one of")


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_before_loading(base_args, tmp_path, monkeypatch):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"))
    result = invoke("generate", *base_args, "--compile", "on", "--device", "cpu", "--output", tmp_path / "x.jsonl")
    one_line_error(result, "--compile on a CPU needs a C++ compiler")
    assert "loading" not in result.output and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("missing", ["compiler", "headers"])
def test_compile_on_cuda_without_a_c_compiler_or_python_headers_is_refused(missing, tmp_path, monkeypatch):
    """Triton builds its launchers with a C compiler (CC, gcc or clang) against Python's headers;
    without them the first compiled forward would fail after the models load."""
    import sysconfig

    import torch

    from qstar_cli.engine.compiled import check_compiler
    from qstar_cli.errors import QstarInputError

    (tmp_path / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "gcc").chmod(0o755)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty") if missing == "compiler" else str(tmp_path))
    if missing == "headers":
        monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-include")})
    with pytest.raises(QstarInputError, match="--compile on CUDA needs a C compiler and Python's headers"):
        check_compiler(torch.device("cuda"))
    monkeypatch.setenv("CC", "/usr/bin/cc")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    (tmp_path / "Python.h").write_text("")
    check_compiler(torch.device("cuda"))
