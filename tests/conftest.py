"""Shared fixtures: an offline tokenizer and tiny random Llama-style models (seconds on a CPU)."""

import os

# Nothing in the test suite touches a model hub: set before transformers and datasets are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from qstar_cli.engine.models import LoadedModel
from qstar_cli.testing.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from tests.helpers import PROMPTS, SPREAD_EOS, write_jsonl

torch.set_num_threads(min(2, torch.get_num_threads()))


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
    from qstar_cli.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return (
        str(save_tiny_model(root / "theta", seed=1, sharpness=4.0)),
        str(save_tiny_model(root / "target", seed=2, sharpness=4.0, extra_rows=5)),
    )


@pytest.fixture(scope="session")
def spread_model_dirs(tmp_path_factory):
    """Like ``tiny_model_dirs``, but pi_theta lists 4 extra EOS ids: response lengths spread widely."""
    from qstar_cli.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("spread_models")
    return (
        str(save_tiny_model(root / "theta", seed=1, sharpness=4.0, extra_eos=(100, 101, 102, 103))),
        str(save_tiny_model(root / "target", seed=2, sharpness=4.0, extra_rows=5)),
    )


@pytest.fixture(scope="module")
def sharp_pair(tiny_tokenizer, sharp_models):
    """The peaky models as a ``(pi_theta, pi_t)`` pair of loaded models."""
    return tuple(LoadedModel(m, tiny_tokenizer, f"sharp{i}") for i, m in enumerate(sharp_models))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and leave the other core to other processes (Ray replicas)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spread_pair(tiny_tokenizer):
    return (
        LoadedModel(build_tiny_model(tiny_tokenizer, seed=1, sharpness=4.0, extra_eos=SPREAD_EOS), tiny_tokenizer, "theta"),
        LoadedModel(build_tiny_model(tiny_tokenizer, seed=2, sharpness=4.0, extra_rows=5), tiny_tokenizer, "target"),
    )


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "prompts.jsonl", PROMPTS))


@pytest.fixture(scope="module")
def base_args(tiny_model_dirs, prompts_file):
    theta, target = tiny_model_dirs
    return ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", prompts_file,
            "--max-new-tokens", "16", "--batch-size", "3", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="session")
def pair(tiny_tokenizer, tiny_models):
    """The tiny models as a ``(pi_theta, pi_t)`` pair of loaded models."""
    theta, target = tiny_models
    return LoadedModel(theta, tiny_tokenizer, "theta"), LoadedModel(target, tiny_tokenizer, "target")
