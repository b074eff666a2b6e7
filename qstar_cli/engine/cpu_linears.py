"""Linear layers on a CPU through oneDNN with their weights prepacked once, as vLLM's CPU build runs them.

transformers' ``nn.Linear`` calls MKL's sgemm, which lays each weight out for its kernel anew at
every call: at decode sizes (a few rows per forward) that layout work is a large part of each matmul
(benchmarks/RESULTS.md). oneDNN's linear takes a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) and computes each row the same way whatever the batch
(bitwise batch-invariant, which sgemm is not), to float32's rounding (a relative 1e-6 against
float64, as sgemm).

:func:`prepack_linears` makes every ``nn.Linear`` of a model a :class:`PackedLinear`, whose float32
forwards on the CPU use a packed copy of its weight, made at its first call and again whenever the
weight changes (new values, another dtype or device: then it is a plain linear again). The weights
are held twice on the CPU (the original stays: a tied output head shares it with the embedding, and
whatever reads a weight keeps working), so a CPU run's model memory doubles. Compiled forwards take
the plain linear: inductor packs its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU forward runs oneDNN on a packed copy of its weight."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if torch.compiler.is_compiling() or weight.dtype != torch.float32 or weight.device.type != "cpu" or x.dtype != torch.float32:
            return functional.linear(x, weight, self.bias)
        # (An inference tensor, made under inference mode, keeps no version: its address alone.)
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        if self.__dict__.get("_packed_key") != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self._packed_key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self) -> dict:
        # A copy packs its own weight at its first call (oneDNN's layout cannot be copied).
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_key")}


def prepack_linears(model: nn.Module) -> int:
    """Make the linear layers of ``model`` :class:`PackedLinear`, in place (where oneDNN is built in);
    how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for module in linears:
        module.__class__ = PackedLinear
    return len(linears)
