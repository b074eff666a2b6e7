"""The model-family matrix: every family people pair is exact through the slot path, or refused
before any weight loads; the docs' family table is the matrix's.

Each accepted family of :data:`~qstar_cli.testing.families.FAMILIES` is a tiny random pair built from
transformers' own config (sliding windows and chunks of 8 tokens, shorter than prompt + response):
pi_theta on the family's default attention (SDPA where it has it), pi_t on eager attention. Every
stored per-token number of a plain run, a ``draft_k=3`` run, K = 3 responses per prompt on fewer
slots (rows admitted, moved and refilled; prompts prefilled in chunks) and a compiled run equals
what a float64 full forward of transformers' own model gives (eager attention; MoE experts eager, as
grouped matmuls have no float64).
"""

import subprocess

import numpy as np
import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from qstar_cli.engine import cpu_linears
from qstar_cli.engine.architectures import UnsupportedModelError, attention_layout
from qstar_cli.engine.models import LoadedModel
from qstar_cli.testing.families import (
    FAMILIES,
    MODES,
    WINDOW,
    build_family_model,
    family,
    family_config,
    family_status,
    reference_model,
    sidecar_sample,
    stored_number_errors,
    worst_errors,
)
from tests.helpers import (
    cli,
    file_bytes,
    kill_at_random_moments,
    make_sampler,
    one_line_error,
    paths,
    read_lines,
    spawn,
    tiny_run_flags,
)

ACCEPTED = [f for f in FAMILIES if family_status(f)[1] == "exact"]
REFUSED = [f for f in FAMILIES if f not in ACCEPTED]
#: Families compiled here (inductor, most of a minute each on a small CPU), each a path through the
#: slot cache that the Llama-style models' compiled tests (test_sampler.py) do not take: masks by
#: layer type and eager attention with sinks and MoE (gpt-oss); latent keys and values of other head
#: sizes (DeepSeek-V3). Every family is compiled by benchmarks/family_matrix.py (RESULTS.md).
COMPILED = ("gpt_oss", "deepseek_v3")


@pytest.fixture(scope="module", params=ACCEPTED, ids=lambda f: f.key)
def family_pair(request, tiny_tokenizer):
    family = request.param
    theta = build_family_model(family, tiny_tokenizer, seed=1)
    target = build_family_model(family, tiny_tokenizer, seed=2, attn_implementation="eager")
    refs = reference_model(theta), reference_model(target)
    return (LoadedModel(theta, tiny_tokenizer, "theta"), LoadedModel(target, tiny_tokenizer, "target")), refs


@pytest.mark.parametrize("mode", [m for m in MODES if m != "compiled"])
def test_every_stored_number_equals_transformers_full_forward(family_pair, mode, one_torch_thread, monkeypatch):
    # Every linear on oneDNN and siblings fused, as at real shapes (these weights are under the size
    # from which packing pays).
    monkeypatch.setattr(cpu_linears, "MIN_PACKED_ELEMENTS", 0)
    pair, refs = family_pair
    worst, longest = worst_errors(refs, pair, mode)
    assert max(worst.values()) < 1e-4, worst
    assert longest > 4 * WINDOW, "sequences longer than the windows and chunks"


@pytest.mark.parametrize("family", [f for f in ACCEPTED if f.key in COMPILED], ids=lambda f: f.key)
def test_compiled_forwards_equal_transformers_full_forward(family, tiny_tokenizer, one_torch_thread):
    """``compile=True`` on one model in both roles (pi_theta on the plain format, pi_t on the chat
    template, as the demo pair): its decode and verify forwards compiled."""
    torch._dynamo.reset()  # compiled afresh: a full cache of transformers' shared forward wrapper runs it eager
    model = build_family_model(family, tiny_tokenizer, seed=1)
    loaded = LoadedModel(model, tiny_tokenizer, "model")
    worst, _ = worst_errors((reference_model(model),) * 2, (loaded, loaded), "compiled")
    assert max(worst.values()) < 1e-4, worst


# --- Refused before loading, and kill -9 on a sliding family --------------------------------------


def config_only_dir(path, config, tokenizer):
    """A model directory holding a config and a tokenizer but no weights: a run that tried to load
    the weights would fail otherwise than the refusal expected."""
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", REFUSED, ids=lambda f: f.key)
def test_a_state_keeping_family_is_refused_from_its_config_before_loading(family, tiny_tokenizer, prompts_file, tmp_path):
    model = config_only_dir(tmp_path / "model", family_config(family, len(tiny_tokenizer)), tiny_tokenizer)
    out = tmp_path / "out.jsonl"
    line = one_line_error(cli("--model-theta", model, "--model-t", model, "--dataset", prompts_file, "--output", out, "--device", "cpu"))
    reason = family_status(family)[1].removeprefix("refused: ")
    assert f"({family.model_type}) {reason}" in line and "see Model families in qstar's docs" in line, line
    assert not list(tmp_path.glob("out*")), "nothing written"


@pytest.mark.parametrize(
    "model_type, config, refusal",
    [
        ("qwen3", {"layer_types": ["full_attention", "indexed_attention"]}, "has layers of type indexed_attention"),
        ("bloom", {}, "computes its attention outside transformers' attention interface (BloomForCausalLM)"),
        ("qwen3", {"is_causal": False}, "declares non-causal attention (is_causal: false)"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "attends both ways (use_bidirectional_attention)"),
        ("roberta", {"is_decoder": True}, "is an encoder's architecture (BERT-style)"),
        ("moshi", {"sliding_window": 8}, "declares sliding_attention layers that its attention code never applies"),
        ("t5", {}, "is not a causal LM that transformers' AutoModelForCausalLM loads (T5Config)"),
    ],
)
def test_an_unknown_attention_pattern_is_refused_not_guessed(model_type, config, refusal, tiny_tokenizer, prompts_file, tmp_path):
    config = CONFIG_MAPPING[model_type](vocab_size=len(tiny_tokenizer), num_hidden_layers=2, hidden_size=32, **config)
    model = config_only_dir(tmp_path / "model", config, tiny_tokenizer)
    theta = config_only_dir(tmp_path / "theta", family_config(FAMILIES[0], len(tiny_tokenizer)), tiny_tokenizer)
    line = one_line_error(cli("--model-theta", theta, "--model-t", model, "--dataset", prompts_file, "--output", tmp_path / "o.jsonl"))
    assert f"{model} ({model_type}) {refusal}" in line, line


def test_a_layout_reads_windows_and_chunks_and_refuses_a_sliding_layer_without_a_window():
    config = CONFIG_MAPPING["gemma3_text"](
        num_hidden_layers=3, sliding_window=5, layer_types=["sliding_attention"] * 2 + ["full_attention"]
    )
    layout = attention_layout(config)
    assert (layout.mask_types, layout.sliding_window, layout.chunk_size) == (("sliding_attention", "full_attention"), 5, None)
    assert layout.describe() == "sliding window 5 (2 of 3 layers), full (1 of 3 layers)"
    assert attention_layout(CONFIG_MAPPING["mistral"](num_hidden_layers=2, sliding_window=7)).describe() == "sliding window 7"
    config = CONFIG_MAPPING["qwen3"](num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=None)
    with pytest.raises(UnsupportedModelError, match=r"m \(qwen3\) has sliding_attention layers but its config's sliding_window is None"):
        attention_layout(config, "m")


def test_the_python_api_refuses_what_generate_refuses(tiny_tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    bloom = LoadedModel(
        BloomForCausalLM(BloomConfig(vocab_size=len(tiny_tokenizer), n_layer=1, hidden_size=32)), tiny_tokenizer, "my-bloom"
    )
    with pytest.raises(UnsupportedModelError, match=r"my-bloom \(bloom\) computes its attention outside"):
        make_sampler((bloom, bloom))


@pytest.fixture(scope="module")
def sliding_model_dirs(tiny_tokenizer, tmp_path_factory):
    """A Gemma 3 pair (sliding windows of 8 on 2 of 3 layers) saved as model directories."""
    root = tmp_path_factory.mktemp("gemma3")
    gemma3 = family("gemma3_text")
    dirs = []
    for seed in (1, 2):
        build_family_model(gemma3, tiny_tokenizer, seed=seed).save_pretrained(root / str(seed))
        tiny_tokenizer.save_pretrained(root / str(seed))
        dirs.append(str(root / str(seed)))
    return dirs


def test_kill_9_and_resume_is_byte_identical_on_a_sliding_family(sliding_model_dirs, tiny_tokenizer, prompts_file, tmp_path):
    args = tiny_run_flags(sliding_model_dirs, prompts_file, max_new_tokens=60, batch_size=2)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "k.jsonl"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    assert spawn(args, ref, **quiet).wait(timeout=300) == 0
    lines = read_lines(paths(ref)[1])
    lengths = [r["num_tokens"] for r in lines]
    assert max(lengths) > 3 * WINDOW and len(set(lengths)) > 2, lengths
    # The files' numbers, read as the docs' recipe reads them, against the float64 full forwards.
    refs = [reference_model(AutoModelForCausalLM.from_pretrained(d)) for d in sliding_model_dirs]
    for record in lines[:3]:
        assert max(stored_number_errors(refs, len(tiny_tokenizer), sidecar_sample(record)).values()) < 1e-4
    assert kill_at_random_moments(lambda: spawn(args, out, **quiet), out, np.random.default_rng(40), max_delay=0.8) >= 2
    assert spawn(args, out, **quiet).wait(timeout=300) == 0
    assert file_bytes(out) == file_bytes(ref)
