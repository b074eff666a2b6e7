"""Where the samples of a run are made: behind one protocol, this process (:class:`LocalEngine`) or
model replicas on Ray (:class:`~qstar_cli.generate.ray_engine.RayEngine`).

:func:`~qstar_cli.generate.run.run_generate` asks an engine for the models it needs to encode the
prompts (:meth:`Engine.load`), then for the samples of the schedule (:meth:`Engine.stream`), and
writes them; it has no branch on which engine runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from qstar_cli.engine.samples import SampleRequest, SampleResult, StreamStats

if TYPE_CHECKING:
    from qstar_cli.engine.memory import SlotPlan
    from qstar_cli.engine.sampler import DualModelSampler
    from qstar_cli.generate.config import GenerateConfig


class Engine(Protocol):
    """What a run needs of an engine; ``record`` is what the manifest's session keeps of it."""

    record: dict[str, Any]
    slots: int | str  # slots per stream (``auto`` until :meth:`plan_slots`)

    def load(self) -> DualModelSampler:
        """The models, at least as far as encoding prompts and checking vocabularies needs."""

    def plan_slots(self, prompt_ids: list, samples: int, begun_with: int | None = None) -> SlotPlan | None:
        """Resolve ``--batch-size auto`` once the models are loaded (a resumed run keeps the slots it
        ``begun_with``), and take no more slots than ``samples``; the arithmetic, or None."""

    def placement(self, sampler: DualModelSampler) -> tuple[str, str]:
        """``(device, dtype)`` for the manifest."""

    def stream(
        self, requests: Iterable[SampleRequest], on_round: Callable[[int], None], stats: StreamStats
    ) -> Iterator[tuple[int, SampleResult]]:
        """``(position, result)`` of every request that is not a replay, as samples finish.
        ``on_round(tokens)`` follows each round (an exception it raises ends the stream); ``stats``
        counts the work."""


class LocalEngine:
    """The samples made here, on ``batch_size`` slots (``sampler`` reuses loaded models)."""

    def __init__(self, config: GenerateConfig, sampler: DualModelSampler | None = None):
        self.config, self.sampler = config, sampler
        self.record: dict[str, Any] = {"name": "local"}
        #: Slots per stream: ``config.batch_size``, once ``auto`` is resolved by :meth:`plan_slots`.
        self.slots: int | str = config.batch_size
        self.slot_plan: SlotPlan | None = None

    def plan_slots(self, prompt_ids: list, samples: int, begun_with: int | None = None) -> SlotPlan | None:
        """Resolve ``--batch-size auto`` for the sequences of ``prompt_ids`` (None: a fixed size). A
        resumed run keeps the slots it began with (``begun_with``): on a GPU the kernels, and so the
        low bits, follow the batch shapes. Never more slots than ``samples``: a slot costs memory."""
        if self.slots == "auto":
            self.slot_plan = self.load().plan_slots(prompt_ids, self.config.memory_fraction, max(samples, 1))
            self.slots = begun_with if isinstance(begun_with, int) and begun_with >= 1 else self.slot_plan.slots
        self.slots = max(1, min(self.slots, samples))
        return self.slot_plan

    def load(self) -> DualModelSampler:
        if self.sampler is None:
            self.sampler = self.config.load_sampler()
        return self.sampler

    def placement(self, sampler: DualModelSampler) -> tuple[str, str]:
        model = sampler.theta.model
        return str(model.device), str(model.dtype).removeprefix("torch.")

    def stream(
        self, requests: Iterable[SampleRequest], on_round: Callable[[int], None], stats: StreamStats
    ) -> Iterator[tuple[int, SampleResult]]:
        return self.load().stream(requests, self.slots, self.config.scheduler, on_round, stats=stats, diagnostics=self.config.diagnostics)


def make_engine(config: GenerateConfig, sampler: DualModelSampler | None = None) -> Engine:
    """The engine ``config.engine`` names (checked before anything is written)."""
    if config.engine == "ray":
        from qstar_cli.generate.ray_engine import RayEngine

        return RayEngine(config)
    return LocalEngine(config, sampler)
