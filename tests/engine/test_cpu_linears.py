"""Linear layers on oneDNN with packed weights: float32's rounding, batch-invariant, siblings fused
into one matmul with each sibling's own numbers, and a plain linear wherever the packed copy would
not hold (another dtype, a copy, new weights, compiling) or would not pay (small weights)."""

import copy

import pytest
import torch
from torch import nn

from qstar_cli.engine import cpu_linears
from qstar_cli.engine.cpu_linears import PackedLinear, PackedWeights, prepack_linears, repack_linears
from qstar_cli.engine.models import LoadedModel
from qstar_cli.testing.families import build_family_model, family, reference_model, stored_number_errors
from tests.helpers import CONVERSATIONS, make_sampler


@pytest.fixture
def pack_any_size(monkeypatch):
    monkeypatch.setattr(cpu_linears, "MIN_PACKED_ELEMENTS", 0)


def layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 40, bias=False))


class Block(nn.Module):
    """Attention's projections and a gated MLP's, named as transformers' models name them."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(48, 64, bias=bias), nn.Linear(48, 16, bias=bias), nn.Linear(48, 16, bias=bias)
        self.gate_proj, self.up_proj = nn.Linear(48, 80), nn.Linear(48, 80)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        kv_input = x if y is None else y
        return [self.q_proj(x), self.k_proj(kv_input), self.v_proj(kv_input), self.gate_proj(x), self.up_proj(x)]


def test_packed_linears_equal_float64_to_rounding_and_each_row_is_its_own(pack_any_size):
    model = layers()
    reference = copy.deepcopy(model).double()
    assert prepack_linears(model) == 2 and all(type(m) is PackedLinear for m in (model[0], model[2]))
    assert model[0].packed._weight is not None, "packed at once (the memory free after it counts the copies)"
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(x)
        expected = reference(x.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
        # Bitwise: a row computes the same alone as in a batch of 32 (sgemm's blocking does not promise it).
        assert torch.equal(torch.cat([model(x[i : i + 1]) for i in range(32)]), out)
        assert torch.equal(model(x.view(4, 8, 48)).view(32, -1), out), "leading dimensions as rows"


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_run_as_one_matmul_with_each_ones_own_numbers(pack_any_size, bias):
    block = Block(bias)
    alone = copy.deepcopy(block)
    assert prepack_linears(block) == 5
    assert block.q_proj.packed is block.k_proj.packed is block.v_proj.packed and block.gate_proj.packed is block.up_proj.packed
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for _ in range(2):  # the fused output is dropped once every sibling took its columns
            fused = block(x)
            assert block.q_proj.packed._pending is None and block.gate_proj.packed._pending is None
        # Bitwise each linear packed on its own: a column of oneDNN's output depends on its own weight row alone.
        own = [PackedWeights([m]).output(m, x) for m in (alone.q_proj, alone.k_proj, alone.v_proj, alone.gate_proj, alone.up_proj)]
    for out, expected in zip(fused, own, strict=True):
        assert torch.equal(out, expected) and out.is_contiguous()


def test_siblings_that_read_different_inputs_are_computed_apart(pack_any_size):
    block = Block(bias=False)
    plain = copy.deepcopy(block)
    prepack_linears(block)
    x, y = torch.randn(2, 3, 48), torch.randn(2, 5, 48)
    with torch.inference_mode():
        for _ in range(3):
            for out, expected in zip(block(x, y), plain(x, y), strict=True):
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert len({id(m.packed) for m in (block.q_proj, block.k_proj, block.v_proj)}) == 3, "unfused once seen"
    assert block.gate_proj.packed is block.up_proj.packed, "siblings that share an input stay fused"


def test_small_weights_stay_plain_linears():
    block = Block(bias=False)  # 48 x 64 weights, far under the threshold
    assert prepack_linears(block) == 0 and all(m.packed is None for m in block.children())


def test_a_copy_another_dtype_or_new_weights_are_computed_plainly(pack_any_size):
    model = layers()
    prepack_linears(model)
    x = torch.randn(5, 48)
    with torch.inference_mode():
        packed = model(x)
        copied = copy.deepcopy(model)  # oneDNN's layout cannot be copied: the copy packs its own
        assert copied[0].packed._weight is None and copied[0].packed.linears == [copied[0]]
        assert torch.equal(copied(x), packed)
        double = copy.deepcopy(model).double()
        torch.testing.assert_close(double(x.double()), packed.double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model[0].weight.mul_(2)  # new values, a new version: packed again
    plain = nn.functional.linear(nn.functional.silu(nn.functional.linear(x, model[0].weight, model[0].bias)), model[2].weight)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-6)


def test_outside_inference_mode_a_forward_is_a_plain_linears(pack_any_size):
    """Gradients (a frozen weight's trainable bias too) and forward-mode derivatives, which oneDNN's
    op does not have: every forward outside inference mode (the sampler's) is a plain linear."""
    model = layers()
    plain = copy.deepcopy(model)
    prepack_linears(model)
    for m in (model, plain):
        m[0].weight.requires_grad_(False)  # BitFit: the biases alone train
    x = torch.randn(4, 48)
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    for ours, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        assert (ours.grad is None and theirs.grad is None) or torch.equal(ours.grad, theirs.grad)
    with torch.no_grad():
        tangent = torch.randn(4, 48)
        ours = torch.func.jvp(model, (x,), (tangent,))[1]
        torch.testing.assert_close(ours, torch.func.jvp(plain, (x,), (tangent,))[1])


def test_weights_written_without_a_version_are_packed_anew_by_repack_linears(pack_any_size):
    """``param.data`` writes and fused optimizers change a weight without its version counter: the
    sampler repacks at the start of every stream."""
    model, other = layers(), layers(seed=1)
    prepack_linears(model)
    x = torch.randn(5, 48)
    with torch.no_grad():
        for param, new in zip(model.parameters(), other.parameters(), strict=True):
            param.data.copy_(new)
    repack_linears(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-6)


def test_a_sampler_reads_its_models_weights_as_they_are_when_a_stream_begins(tiny_tokenizer, pack_any_size):
    """A model trained between two generates (weights written through ``.data``): the second samples
    from the new weights, every stored number as a float64 forward of them gives."""
    theta, target = (build_family_model(family("llama"), tiny_tokenizer, seed=s) for s in (1, 2))
    pair = LoadedModel(theta, tiny_tokenizer, "theta"), LoadedModel(target, tiny_tokenizer, "target")
    sampler = make_sampler(pair, max_new_tokens=8)
    sampler.generate(CONVERSATIONS[:1])
    with torch.no_grad():
        for param, new in zip(target.parameters(), build_family_model(family("llama"), tiny_tokenizer, seed=3).parameters(), strict=True):
            param.data.copy_(new)
    refs = reference_model(theta), reference_model(target)
    for result in sampler.generate(CONVERSATIONS[:1]):
        assert max(stored_number_errors(refs, sampler.vocab, result).values()) < 1e-4


def test_compiled_forwards_take_the_plain_linear(pack_any_size):
    model = layers()
    prepack_linears(model)
    seen = []

    def backend(graph, inputs):
        seen.extend(str(node.target) for node in graph.graph.nodes)
        return graph.forward

    x = torch.randn(3, 48)
    out = torch.compile(model, backend=backend)(x)
    assert not any("mkldnn" in target for target in seen) and any("linear" in target for target in seen), seen
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
