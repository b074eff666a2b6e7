"""Linear layers on a CPU through oneDNN with their weights prepacked once, as vLLM's CPU build runs them.

transformers' ``nn.Linear`` calls MKL's sgemm, which lays each weight out for its kernel anew at
every call: at decode sizes (a few rows per forward) that layout work is a large part of each matmul
(benchmarks/RESULTS.md). oneDNN's linear takes a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) and computes to float32's rounding (a relative 1e-6
against float64, as sgemm), each row the same way whatever the batch.

:func:`prepack_linears` makes every ``nn.Linear`` of a model a :class:`PackedLinear`. Sibling
projections that read one input (:data:`FUSED_SIBLINGS`: q, k and v; gate and up) share one packed
weight, their rows concatenated, and run as one matmul, as vLLM fuses them: the first sibling's call
computes every sibling's output for its input, each other sibling's call on that input takes its own
(a model whose siblings read different inputs is seen at once and packs them apart). oneDNN costs
about 15 us a call more than sgemm, which packing saves only on larger weights: a weight (or fused
group) under :data:`MIN_PACKED_ELEMENTS` stays a plain linear.

Float32 forwards on the CPU in inference mode (the sampler's) use the packed copy, made by
:func:`prepack_linears`, again at the start of every sampler stream (:func:`repack_linears`: the
weights may have been trained or overwritten between streams) and whenever a weight's version
changes within one (another dtype or device: a plain linear again). Every other forward (recording
gradients, forward-mode derivatives, autocast) takes the plain linear, so a model trained between
streams is trained as a plain one. The weights are
held twice on the CPU (the originals stay: a tied output head shares its weight with the embedding,
and whatever reads a weight keeps working), so a CPU run's model memory doubles. Compiled forwards
take the plain linear: inductor packs its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional

#: Child linears of one module that transformers' models apply to the same input.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: Weights (or fused groups) with fewer elements stay plain linears: oneDNN's cost per call exceeds
#: what packing saves there (measured on this project's CPU: benchmarks/RESULTS.md).
MIN_PACKED_ELEMENTS = 1 << 18


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU forward runs oneDNN on a packed weight (its own, or its
    siblings' and its own fused), where :func:`prepack_linears` gave it one."""

    packed: PackedWeights | None = None

    def forward(self, x: Tensor) -> Tensor:
        # The sampler's forwards run in inference mode; any other (one that records gradients of any
        # kind, or under autocast) takes the plain linear: oneDNN's op has no derivatives.
        if (
            self.packed is None
            or torch.compiler.is_compiling()
            or x.dtype != torch.float32
            or not torch.is_inference_mode_enabled()
            or torch.is_autocast_enabled("cpu")
        ):
            return functional.linear(x, self.weight, self.bias)
        return self.packed.output(self, x)


class PackedWeights:
    """The packed weight of one linear, or of sibling linears fused (their rows concatenated), with
    the fused output of their last input until each sibling has taken its own columns."""

    def __init__(self, linears: list[PackedLinear]):
        self.linears = linears
        self._clear()

    def _clear(self) -> None:
        self._key: tuple | None = None
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None
        #: (input, its version, fused output, the siblings yet to take their columns)
        self._pending: tuple[Tensor, int | None, tuple[Tensor, ...], set[int]] | None = None
        self._misses = 0

    def __getstate__(self) -> dict:
        # A copy packs its own weights at its first call (oneDNN's layout cannot be copied).
        return {"linears": self.linears}

    def __setstate__(self, state: dict) -> None:
        self.linears = state["linears"]
        self._clear()

    def output(self, linear: PackedLinear, x: Tensor) -> Tensor:
        """``linear(x)``: the columns a sibling's call computed for ``x``, or computed."""
        index = self.linears.index(linear)
        version = None if x.is_inference() else x._version
        if self._pending is not None:
            pending_x, pending_version, columns, waiting = self._pending
            if pending_x is x and pending_version == version and index in waiting:
                waiting.discard(index)
                if not waiting:
                    self._pending, self._misses = None, 0
                return columns[index].contiguous()
            # Another input before every sibling took its columns: once (a forward cut short), the
            # fused output is computed anew; twice, the siblings do not read one input: apart.
            self._misses += 1
            if self._misses > 1:
                for sibling in self.linears:
                    sibling.packed = own_packing(sibling)
                return linear(x)
        if not self.pack():  # a weight is no longer float32 on the CPU
            return functional.linear(x, linear.weight, linear.bias)
        out = torch.ops.mkldnn._linear_pointwise(x, self._weight, self._bias, "none", [], "")
        if len(self.linears) == 1:
            return out
        columns = out.split([m.out_features for m in self.linears], dim=-1)
        self._pending = (x, version, columns, set(range(len(self.linears))) - {index})
        return columns[index].contiguous()

    def mark_stale(self) -> None:
        self._key = None

    def pack(self) -> bool:
        """Pack the weights if they changed; whether they can be (float32, on the CPU)."""
        weights = [m.weight for m in self.linears]
        if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
            return False
        # (An inference tensor, made under inference mode, keeps no version: its address alone.)
        tensors = weights + [m.bias for m in self.linears if m.bias is not None]
        key = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)
        if key != self._key:
            self._weight = torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights).detach())
            biases = [m.bias for m in self.linears]
            self._bias = None if biases[0] is None else torch.cat(biases).detach()
            self._key = key
        return True


def repack_linears(model: nn.Module) -> None:
    """Pack ``model``'s packed linears anew at their next call (the sampler does at the start of
    every stream): a weight written through ``.data``, or by a fused optimizer's step, changes
    without the version counter that the packing checks otherwise."""
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.packed is not None:
            module.packed.mark_stale()


def own_packing(linear: nn.Linear) -> PackedWeights | None:
    """A linear's packing on its own: none under :data:`MIN_PACKED_ELEMENTS`."""
    return PackedWeights([linear]) if linear.in_features * linear.out_features >= MIN_PACKED_ELEMENTS else None


def prepack_linears(model: nn.Module) -> int:
    """Make the linear layers of ``model`` :class:`PackedLinear`, in place (where oneDNN is built in),
    siblings fused; how many linears run packed."""
    if not torch.backends.mkldnn.is_available():
        return 0
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for linear in linears:
        linear.__class__ = PackedLinear
        linear.packed = own_packing(linear)
    for parent in model.modules():
        for names in FUSED_SIBLINGS:
            siblings = [getattr(parent, name, None) for name in names]
            if fusable(siblings):
                shared = PackedWeights(siblings)
                for linear in siblings:
                    linear.packed = shared
    packings = {id(linear.packed): linear.packed for linear in linears if linear.packed is not None}
    for packing in packings.values():
        packing.pack()  # now, so that the memory free after this counts the packed copies
    return sum(linear.packed is not None for linear in linears)


def fusable(siblings: list) -> bool:
    """Distinct linears of one input size, all with a bias or none, large enough together."""
    first = siblings[0]
    return (
        all(type(m) is PackedLinear for m in siblings)
        and len({id(m) for m in siblings}) == len(siblings)
        and all(m.in_features == first.in_features and (m.bias is None) == (first.bias is None) for m in siblings)
        and sum(m.in_features * m.out_features for m in siblings) >= MIN_PACKED_ELEMENTS
    )
