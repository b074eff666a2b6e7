"""Linear layers on oneDNN with packed weights: float32's rounding, batch-invariant, and a plain
linear wherever the packed copy would not hold (another dtype, a copy, new weights, compiling)."""

import copy

import torch
from torch import nn

from qstar_cli.engine.cpu_linears import PackedLinear, prepack_linears


def layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 40, bias=False))


def test_packed_linears_equal_float64_to_rounding_and_each_row_is_its_own():
    model = layers()
    reference = copy.deepcopy(model).double()
    assert prepack_linears(model) == 2 and all(type(m) is PackedLinear for m in (model[0], model[2]))
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(x)
        assert "_packed" in vars(model[0]), "the packed path ran"
        expected = reference(x.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
        # Bitwise: a row computes the same alone as in a batch of 32 (sgemm's blocking does not promise it).
        assert torch.equal(torch.cat([model(x[i : i + 1]) for i in range(32)]), out)
        assert torch.equal(model(x.view(4, 8, 48)).view(32, -1), out), "leading dimensions as rows"


def test_a_copy_another_dtype_or_new_weights_are_computed_plainly():
    model = layers()
    prepack_linears(model)
    x = torch.randn(5, 48)
    with torch.inference_mode():
        packed = model(x)
        copied = copy.deepcopy(model)  # oneDNN's layout cannot be copied: the copy packs its own
        assert "_packed" not in vars(copied[0]) and torch.equal(copied(x), packed)
        double = copy.deepcopy(model).double()
        torch.testing.assert_close(double(x.double()), packed.double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model[0].weight.mul_(2)  # new values: packed again
    plain = nn.functional.linear(nn.functional.silu(nn.functional.linear(x, model[0].weight, model[0].bias)), model[2].weight)
    torch.testing.assert_close(model(x).detach(), plain, rtol=1e-5, atol=1e-6)


def test_compiled_forwards_take_the_plain_linear():
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
