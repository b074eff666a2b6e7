"""Shared fixtures: an offline tokenizer and tiny random Llama-style models (seconds on a CPU)."""

import pytest
import torch

from qstar_cli.tiny import build_tiny_model, build_tiny_tokenizer

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
