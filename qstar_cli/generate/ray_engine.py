"""``--engine ray``: model replicas on a Ray cluster (or a local Ray), this process the only writer.

The schedule is cut into groups of ``PROMPTS_PER_GROUP * batch_size`` consecutive positions. A Ray
Data pipeline maps the groups over ``replicas`` actors (``map_batches`` with a stateful class: each
actor loads both models once, on its own GPU where the cluster has GPUs, and runs
:meth:`DualModelSampler.stream` on ``batch_size`` slots for every group it is given) and hands the
finished groups back in schedule order (``preserve_order``). :func:`qstar_cli.generate.run.run_generate`
writes them through the same checkpointed writer as local samples, so resume, fingerprint, lock and
repair are the local ones, and no file system is shared with the replicas.

A group's samples depend on the group alone, not on which replica ran it nor on how many there are:
runs with any number of replicas, killed replicas and resumed runs give the same files (same device
and dtype). Groups are aligned to the schedule, and a resumed run replays the written samples of the
group it resumes in, as the local engine does. Against one local process the tokens are the same
(counter-based randomness) while float rounding may differ (other batches).

Fault tolerance is Ray's: a replica that dies is restarted (``max_restarts=-1``) and the groups it
held are run again (``max_task_retries=-1``), both Ray Data's defaults for actor pools; a lost
replica costs its unfinished groups. Ray Data rather than our own actors: it already owns the actor
pool, GPU placement, backpressure, retries and ordered output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qstar_cli.engine.samples import SampleRequest, SampleResult, StreamStats
from qstar_cli.errors import QstarInputError

if TYPE_CHECKING:
    from qstar_cli.generate.config import GenerateConfig

#: Prompts per group, in slots: enough that a replica's slots stay busy for most of a group, few
#: enough that a replica lost mid-group costs little and results arrive often.
PROMPTS_PER_GROUP = 4
INSTALL_HINT = "pip install 'qstar[ray]'"


@dataclass
class Group:
    """Consecutive schedule positions ``first``, ``first + 1``, ... and their requests."""

    first: int
    requests: list[SampleRequest]


@dataclass
class GroupResult:
    """A finished group: its new samples by schedule position, and who made them how fast."""

    replica: dict[str, Any]
    results: list[tuple[int, SampleResult]]
    stats: StreamStats
    seconds: float


class Replica:
    """A Ray actor holding both models; ``__call__`` generates the group of a one-row batch."""

    def __init__(self, settings: dict[str, Any]):
        import ray
        import transformers

        from qstar_cli.generate.config import GenerateConfig

        # The replica's output reaches the driver's console: no load bars between its progress lines.
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        config = GenerateConfig(**settings)
        self.sampler = config.load_sampler()
        self.slots, self.scheduler, self.diagnostics = config.batch_size, config.scheduler, config.diagnostics
        model = self.sampler.theta.model
        self.identity = {
            "replica": ray.get_runtime_context().get_actor_id()[:12],
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),  # on CPU: Ray gives each replica its CPU's worth
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        [group] = batch["group"]
        stats = StreamStats()
        started = time.perf_counter()
        results = [
            (group.first + offset, result)
            for offset, result in self.sampler.stream(group.requests, self.slots, self.scheduler, stats=stats, diagnostics=self.diagnostics)
        ]
        done = GroupResult(self.identity, results, stats, time.perf_counter() - started)
        return {"result": np.array([done], dtype=object)}


#: Seconds to wait for a Ray cluster's port to answer before a run is refused.
CONNECT_TIMEOUT = 5.0


def check_ray_address(address: str | None) -> None:
    """Refuse, before any file is written, a Ray address that is not ``auto``, ``local``,
    ``HOST:PORT`` or ``ray://HOST:PORT``, or whose host does not resolve or port does not answer
    (``ray.init`` would try for half a minute and end in a traceback)."""
    if address in (None, "", "auto", "local"):
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise QstarInputError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        reason = "no such host" if isinstance(err, socket.gaierror) else (err.strerror or "no answer")
        raise QstarInputError(f"cannot reach the Ray cluster at --ray-address {address}: {reason} (within {CONNECT_TIMEOUT:g} s)") from None


class RayEngine:
    """The samples of a schedule, made by Ray replicas; ``record`` is what the manifest keeps of it."""

    def __init__(self, config: GenerateConfig):
        try:
            import ray.data  # noqa: F401
        except ImportError as err:
            raise QstarInputError(f"--engine ray needs Ray, an optional extra: {INSTALL_HINT}") from err
        self.config = config
        check_ray_address(config.ray_address or os.environ.get("RAY_ADDRESS"))
        self.group_size = PROMPTS_PER_GROUP * config.batch_size
        self.record: dict[str, Any] = {"name": "ray", "replicas": config.replicas, "address": None, "per_replica": []}
        self.slots = config.batch_size  # an integer: the configuration refuses auto with Ray

    def plan_slots(self, prompt_ids: list, samples: int, begun_with: int | None = None) -> None:
        return None

    def load(self):
        """The models' tokenizers and shapes alone (on ``meta``): this process encodes and writes."""
        return self.config.load_sampler("meta")

    def placement(self, sampler) -> tuple[str, str]:
        """As asked: each replica's resolved device and dtype are in its session's ``engine``."""
        return self.config.device, self.config.dtype

    def groups(self, requests: Iterable[SampleRequest]) -> list[Group]:
        """The requests cut at multiples of the group size; a group of replays alone is left out."""
        requests = list(requests)
        groups = [Group(first, requests[first : first + self.group_size]) for first in range(0, len(requests), self.group_size)]
        return [g for g in groups if any(r.replay_tokens is None for r in g.requests)]

    def stream(
        self, requests: Iterable[SampleRequest], on_round: Callable[[int], None], stats: StreamStats
    ) -> Iterator[tuple[int, SampleResult]]:
        """Yield ``(position, result)`` of every request not replayed, group by group in schedule order.

        ``on_round(tokens)`` follows each group (an exception it raises ends the run); ``stats`` sums
        the replicas' own.
        """
        import ray
        from ray.data import ActorPoolStrategy

        groups = self.groups(requests)
        if not groups:
            return
        started_here = not ray.is_initialized()
        if started_here:
            sigterm = signal.getsignal(signal.SIGTERM)
            # address None: RAY_ADDRESS if set, else a new local Ray that lives as long as this run.
            try:
                ray.init(address=self.config.ray_address, logging_level=logging.WARNING)
            except Exception as err:  # Ray raises ConnectionError, RuntimeError, ... for a cluster it cannot join
                where = self.config.ray_address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise QstarInputError(f"cannot join the Ray cluster at {where}: {first}") from None
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)  # Ray's own would end the run at once, unsaved
        # Ray Data's notices (such as that its progress bars are off) would break into the run's bar.
        data_logger = logging.getLogger("ray.data")
        log_level = data_logger.level
        data_logger.setLevel(logging.ERROR)
        try:
            gpus = ray.cluster_resources().get("GPU", 0) >= 1 and self.config.device != "cpu"
            self.record["address"] = ray.get_runtime_context().gcs_address
            dataset = ray.data.from_items([{"group": g} for g in groups], override_num_blocks=len(groups))
            context = dataset.context  # this run's, copied from the process's current one
            context.execution_options.preserve_order = True  # groups come back in schedule order
            context.enable_progress_bars = False  # the run has its own bar
            context.print_on_execution_start = False
            context.enable_fallback_to_arrow_object_ext_type = True  # groups and results are Python objects
            finished = dataset.map_batches(
                Replica,
                fn_constructor_kwargs={"settings": dataclasses.asdict(self.config)},
                batch_size=1,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=self.config.replicas),
                **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
            )
            # Closed however the loop ends, so that Ray Data's executor stops before Ray does.
            with closing(iter(finished.iter_rows())) as rows:
                for row in rows:
                    group: GroupResult = row["result"]
                    yield from group.results
                    stats.add(group.stats)
                    self._account(group)
                    on_round(group.stats.tokens)
        finally:
            data_logger.setLevel(log_level)
            if started_here:
                ray.shutdown()

    def _account(self, group: GroupResult) -> None:
        """Add a group to its replica's throughput in ``record``."""
        per_replica = self.record["per_replica"]
        entry = next((e for e in per_replica if e["replica"] == group.replica["replica"]), None)
        if entry is None:
            entry = {**group.replica, "pids": [], "groups": 0, "samples": 0, "tokens": 0, "seconds": 0.0}
            del entry["pid"]
            per_replica.append(entry)
        if group.replica["pid"] not in entry["pids"]:  # a restarted replica is a new process
            entry["pids"].append(group.replica["pid"])
        entry["groups"] += 1
        entry["samples"] += len(group.results)
        entry["tokens"] += group.stats.tokens
        entry["seconds"] = round(entry["seconds"] + group.seconds, 3)
        entry["tokens_per_s"] = round(entry["tokens"] / entry["seconds"], 2) if entry["seconds"] else 0.0
