"""Loading a model: straight onto its device in its dtype (qstar_cli.engine.models)."""

import pytest
import torch

from qstar_cli.engine.models import load_model


def test_a_model_loads_straight_to_its_device_in_its_dtype(tiny_model_dirs, monkeypatch):
    """No load to the host first and ``.to(device)`` after: that reads the checkpoint into host
    memory whole and copies it again (twice the load time for a GPU run)."""

    def moved(self, *args, **kwargs):
        pytest.fail(f"{type(self).__name__}.to{args} after loading")

    monkeypatch.setattr(torch.nn.Module, "to", moved)
    loaded = load_model(tiny_model_dirs[0], torch.device("cpu"), torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in loaded.model.parameters()} == {("cpu", torch.bfloat16)}
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
