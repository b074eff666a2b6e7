"""Shared fixtures: an offline tokenizer and tiny random Llama-style models (seconds on a CPU)."""

import os

# Nothing in the test suite touches a model hub: set before transformers and datasets are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from qstar_cli.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_prompts(root, prompts) -> str:
    """``root/prompts.jsonl`` holding one JSON object per prompt; its path."""
    import json

    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return str(path)


def as_if_killed_after(out, done: int) -> None:
    """Make the manifest of the run ``out`` say what a kill after the commit of ``done`` samples
    leaves: status running, ``done`` samples durable (the files may hold more, or torn lines)."""
    import json
    from pathlib import Path

    meta_path = Path(str(out).removesuffix(".jsonl") + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["status"], meta["counts"]["done"] = "running", done
    meta_path.write_text(json.dumps(meta))


def tiny_run_flags(model_dirs, dataset, max_new_tokens, batch_size) -> list[str]:
    """``qstar generate`` flags of a CPU run of the tiny models (pi_theta on the plain format)."""
    theta, target = model_dirs
    return ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", str(dataset),
            "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch_size), "--device", "cpu"]  # fmt: skip


def tiny_generate_args(model_dirs, dataset, max_new_tokens, batch_size) -> list[str]:
    """The whole ``qstar generate`` command line of :func:`tiny_run_flags`."""
    return ["generate", *tiny_run_flags(model_dirs, dataset, max_new_tokens, batch_size)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tiny_tokenizer):
    """(pi_theta, pi_t): different seeds; the target's embedding is padded by 5 rows."""
    return (
        build_tiny_model(tiny_tokenizer, seed=1, sharpness=4.0),
        build_tiny_model(tiny_tokenizer, seed=2, sharpness=4.0, extra_rows=5),
    )


@pytest.fixture(scope="session")
def sharp_models(tiny_tokenizer):
    """Peaky models, so that a chi-square test on a few thousand draws has power."""
    return (
        build_tiny_model(tiny_tokenizer, seed=3, sharpness=30.0),
        build_tiny_model(tiny_tokenizer, seed=4, sharpness=30.0),
    )


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """(theta_dir, target_dir): tiny models saved as ``from_pretrained`` directories."""
    from qstar_cli.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return (
        str(save_tiny_model(root / "theta", seed=1, sharpness=4.0)),
        str(save_tiny_model(root / "target", seed=2, sharpness=4.0, extra_rows=5)),
    )


@pytest.fixture(scope="session")
def spread_model_dirs(tmp_path_factory):
    """Like ``tiny_model_dirs``, but pi_theta lists 4 extra EOS ids: response lengths spread widely."""
    from qstar_cli.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("spread_models")
    return (
        str(save_tiny_model(root / "theta", seed=1, sharpness=4.0, extra_eos=(100, 101, 102, 103))),
        str(save_tiny_model(root / "target", seed=2, sharpness=4.0, extra_rows=5)),
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and leave the other core to other processes (Ray replicas)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
