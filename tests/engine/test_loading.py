"""Loading a model: straight onto its device in its dtype (qstar_cli.engine.models)."""

import pytest
import torch

from qstar_cli.engine.models import load_model
from tests.helpers import cli, one_line_error


def test_a_model_loads_straight_to_its_device_in_its_dtype(tiny_model_dirs, monkeypatch):
    """No load to the host first and ``.to(device)`` after: that reads the checkpoint into host
    memory whole and copies it again (twice the load time for a GPU run)."""

    def moved(self, *args, **kwargs):
        pytest.fail(f"{type(self).__name__}.to{args} after loading")

    monkeypatch.setattr(torch.nn.Module, "to", moved)
    loaded = load_model(tiny_model_dirs[0], torch.device("cpu"), torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in loaded.model.parameters()} == {("cpu", torch.bfloat16)}
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def header_only_gguf(path, arch: str, **fields) -> str:
    """A ``.gguf`` file of ``arch`` with its metadata and one tiny tensor, no real weights."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": 2, "context_length": 512, "embedding_length": 32, "feed_forward_length": 64, **fields}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(16)])
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize(
    "arch, fields, refusal",
    [
        # Refused from the header, before any conversion.
        (
            "mamba",
            {"ssm.conv_kernel": 4, "ssm.inner_size": 64, "ssm.state_size": 16, "ssm.time_step_rank": 2},
            "(mamba) keeps a recurrent state",
        ),
        # Accepted by its header, then unreadable: one line naming the file, exit 2.
        ("llama", {"attention.head_count": 4, "attention.head_count_kv": 2}, "cannot load model"),
    ],
)
def test_a_gguf_file_is_checked_from_its_header_and_a_damaged_one_is_one_line(arch, fields, refusal, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QSTAR_CACHE", str(tmp_path / "cache"))
    model = header_only_gguf(tmp_path / f"{arch}.gguf", arch, **fields)
    line = one_line_error(cli("--model-theta", model, "--model-t", model, "--dataset", prompts_file, "--output", tmp_path / "o.jsonl"))
    assert refusal in line and f"{arch}.gguf" in line, line
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_dir()], "no conversion, not even half of one, left"
