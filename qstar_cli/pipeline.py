"""``generate`` as a Python API: dataset rows in, resumable q* samples out.

>>> from qstar_cli.pipeline import GenerateConfig, run_generate
>>> summary = run_generate(GenerateConfig(model_theta="demo", model_t="demo", theta_format="plain",
...                                       dataset="data/demo_prompts.jsonl", num_samples=4))

The schedule is the usable rows in row order, fed to ``batch_size`` slots (``scheduler``
``continuous`` or ``static``, see :meth:`DualModelSampler.stream`). Samples finish out of order and
are written in schedule order, so the files are always a prefix of the schedule. A resumed run
replays the samples already written (their lengths come from the sidecar; nothing of them is
recomputed unless a new sample shares its batch) so that every new sample sees the batches it saw
in an uninterrupted run: with the same batch size, scheduler, device and dtype the files end up
byte-identical to an uninterrupted run's. (At ``--diagnostics none`` there are no lengths to replay;
a resumed run then starts its slots afresh, which changes float rounding only.)

Beyond one device: ``num_shards``/``shard_index`` run one part of the schedule
(:func:`shard_positions`) into files of its own, joined by :mod:`qstar_cli.merge`; ``engine="ray"``
takes the samples from model replicas on Ray (:mod:`qstar_cli.ray_engine`), this process writing.
"""

from __future__ import annotations

import dataclasses
import platform
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import jinja2
import numpy as np

import qstar_cli
from qstar_cli.adapters import AdaptedDataset, Prompt, adapt_rows, load_source, resolve_adapter
from qstar_cli.errors import QstarInputError
from qstar_cli.mixture import check_alpha_method
from qstar_cli.sampler import SCHEDULERS, DualModelSampler, SampleRequest, StreamStats
from qstar_cli.sampling import SamplingParams
from qstar_cli.writer import DIAGNOSTICS_LEVELS, CheckpointedWriter, OutputPaths, fingerprint

#: Settings that do not change what is sampled, so a run may be resumed with other values. A shard's
#: files are named after its index and count, so all shards of a run (and their merge) share one.
NOT_FINGERPRINTED = (
    "output", "num_samples", "batch_size", "scheduler", "device", "dtype", "overwrite",
    "num_shards", "shard_index", "engine", "replicas", "ray_address",
)  # fmt: skip
ENGINES = ("local", "ray")


class ConfigError(QstarInputError):
    """A setting is missing or out of range."""


@dataclass
class GenerateConfig:
    """Every setting of ``qstar generate`` (SPEC section 6); field names are the flags with ``_``."""

    model_theta: str | None = None
    model_t: str | None = None
    theta_format: str | None = None
    t_format: str | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    adapter: str = "auto"
    prompt_field: str | None = None
    system_prompt: str | None = None
    output: str = "data/generated.jsonl"
    num_samples: int | None = None
    start_index: int = 0
    alpha_method: str = "kl_symmetry"
    alpha: float = 0.5
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 8
    scheduler: str = "continuous"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    diagnostics: str = "full"
    overwrite: bool = False
    num_shards: int = 1
    shard_index: int = 0
    engine: str = "local"
    replicas: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        for name in ("model_theta", "model_t", "dataset"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
        checks = {
            "num_samples": self.num_samples is None or self.num_samples >= 1,
            "start_index": self.start_index >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "batch_size": self.batch_size >= 1,
            "num_shards": self.num_shards >= 1,
            "replicas": self.replicas >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must lie in 0..{self.num_shards - 1} (--num-shards {self.num_shards}), got {self.shard_index}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.diagnostics not in DIAGNOSTICS_LEVELS:
            raise ConfigError(f"--diagnostics must be one of {', '.join(DIAGNOSTICS_LEVELS)}, got {self.diagnostics!r}")
        try:
            self.sampling_params()
            check_alpha_method(self.alpha_method, self.alpha)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> GenerateConfig:
        """Build from a mapping whose keys are field names or flag spellings (``model-theta``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; settings are {', '.join(sorted(known))}")
        return cls(**normalised)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def output_paths(self) -> OutputPaths:
        """This run's files: those of ``output``, or of shard ``shard_index`` when ``num_shards`` > 1."""
        paths = OutputPaths(Path(self.output))
        return paths.shard(self.shard_index, self.num_shards) if self.num_shards > 1 else paths

    def load_sampler(self, device: str | None = None) -> DualModelSampler:
        """Both models as configured (on ``device`` instead of ``self.device`` where given)."""
        return DualModelSampler.from_pretrained(
            self.model_theta,
            self.model_t,
            device=device or self.device,
            dtype=self.dtype,
            theta_format=self.theta_format,
            t_format=self.t_format,
            alpha_method=self.alpha_method,
            alpha=self.alpha,
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling_params(),
            seed=self.seed,
        )

    def fingerprint_config(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        if self.alpha_method != "fixed":
            values["alpha"] = None  # unused by the other methods
        return values


class ProgressSink(Protocol):
    """What ``run_generate`` reports as it goes; the CLI draws it as a progress bar."""

    def message(self, text: str) -> None: ...

    def start(self, total: int, done: int) -> None: ...

    def tokens(self, count: int) -> None: ...

    def samples(self, count: int) -> None: ...


class _NoProgress:
    def message(self, text: str) -> None:
        pass

    def start(self, total: int, done: int) -> None:
        pass

    def tokens(self, count: int) -> None:
        pass

    def samples(self, count: int) -> None:
        pass


@dataclass
class RunSummary:
    """How a ``run_generate`` call ended."""

    paths: OutputPaths
    status: str  # "complete" or "interrupted"
    total: int  # samples the run will have when complete
    done: int  # samples in the files now
    resumed_from: int
    new_tokens: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class Interrupted(Exception):
    """A stop was requested (Ctrl-C or SIGTERM); the samples committed so far are kept."""


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by the first SIGINT or SIGTERM; a second signal acts as usual (immediate stop)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        stop.set()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def encode_all(sampler: DualModelSampler, adapted: AdaptedDataset) -> list[tuple[Prompt, tuple[list[int], list[int]]]]:
    """Each usable prompt with its ids for both models; a prompt a template rejects is skipped and counted."""
    encoded = []
    for prompt in adapted.prompts:
        try:
            encoded.append((prompt, sampler.encode_prompts(prompt.messages)))
        except jinja2.TemplateError as err:
            adapted.skipped[f"prompt format error: {err}"] += 1
    return encoded


def shard_positions(prompt_lengths: list[int], num_shards: int, index: int) -> list[int]:
    """The schedule positions of shard ``index`` of ``num_shards``, in schedule order.

    Positions sorted by prompt length are dealt to the shards in snake order (0..N-1, N-1..0, ...),
    so that each shard gets its share of long and short prompts and the sizes differ by one at most.
    """
    by_length = np.argsort(np.asarray(prompt_lengths, dtype=np.int64), kind="stable")
    round_, seat = np.divmod(np.arange(len(by_length)), num_shards)
    shard = np.where(round_ % 2 == 0, seat, num_shards - 1 - seat)
    return np.sort(by_length[shard == index]).tolist()


def package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "datasets", "tokenizers", "numpy")
    return {"qstar": qstar_cli.__version__, "python": platform.python_version(), **{n: metadata.version(n) for n in names}}


def run_generate(
    config: GenerateConfig,
    progress: ProgressSink | None = None,
    stop: threading.Event | None = None,
    sampler: DualModelSampler | None = None,
) -> RunSummary:
    """Generate (or finish generating) the output of ``config``.

    ``stop``, once set, ends the run after the current step; the batch in progress is dropped and
    regenerated on resume. ``sampler`` reuses already loaded models (it must match ``config``).
    With ``engine="ray"`` the samples come from Ray replicas (:mod:`qstar_cli.ray_engine`); this
    process loads the models' shapes alone, encodes the prompts and stays the only writer.
    """
    progress = progress or _NoProgress()
    stop = stop or threading.Event()
    ray_engine = None
    if config.engine == "ray":
        from qstar_cli.ray_engine import RayEngine

        ray_engine = RayEngine(config)
    dataset = load_source(config.dataset, config.subset, config.split)
    adapter = resolve_adapter(config.adapter, list(dataset.column_names), config.prompt_field)
    adapted = adapt_rows(dataset, adapter, config.start_index, config.num_samples, config.system_prompt)
    fp_config = config.fingerprint_config()

    with CheckpointedWriter(config.output_paths().main, config.diagnostics) as writer:
        previous = writer.check_config(fp_config, overwrite=config.overwrite)
        if sampler is None:
            progress.message(f"loading models: pi_theta {config.model_theta}, pi_t {config.model_t}")
            sampler = config.load_sampler("meta" if ray_engine else None)
        schedule = encode_all(sampler, adapted)
        schedule_samples = len(schedule)
        if config.num_shards > 1:
            lengths = [len(ids_theta) + len(ids_t) for _, (ids_theta, ids_t) in schedule]
            schedule = [schedule[p] for p in shard_positions(lengths, config.num_shards, config.shard_index)]
        done = writer.resume([p.row_idx for p, _ in schedule])
        meta = {
            "qstar_version": qstar_cli.__version__,
            "status": "running",
            "fingerprint": fingerprint(fp_config),
            "fingerprint_config": fp_config,
            "config": {**dataclasses.asdict(config), "adapter_resolved": adapted.adapter},
            # Under Ray, as asked: each replica's resolved device and dtype are in its session's engine.
            "device": config.device if ray_engine else str(sampler.theta.model.device),
            "dtype": config.dtype if ray_engine else str(sampler.theta.model.dtype).removeprefix("torch."),
            "versions": package_versions(),
            "counts": {"rows": adapted.rows, "samples": len(schedule), "done": done, "skipped": dict(adapted.skipped)},
            "sessions": (previous or {}).get("sessions", []),
        }
        if config.num_shards > 1:
            meta["shard"] = {"index": config.shard_index, "count": config.num_shards, "schedule_samples": schedule_samples}
        session = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": done,
            "engine": ray_engine.record if ray_engine else {"name": "local"},
        }
        meta["sessions"].append(session)
        writer.write_meta(meta)

        progress.start(len(schedule), done)
        started, new_tokens, status = time.perf_counter(), 0, "complete"

        lengths = writer.sample_lengths(done)
        first = 0 if lengths is not None else done
        requests = (
            SampleRequest(prompt.row_idx, *ids, replay_tokens=lengths[i] if i < done else None)
            for i, (prompt, ids) in enumerate(schedule[first:], start=first)
        )
        stats = StreamStats()
        waiting: dict[int, Any] = {}  # finished samples after the first unfinished one, by position
        unwritten = 0

        def commit() -> None:
            nonlocal unwritten
            writer.commit()
            progress.samples(unwritten)
            unwritten = 0
            _record_session(meta, session, done, new_tokens, time.perf_counter() - started, "running", stats, config.batch_size)
            writer.write_meta(meta)

        def on_step(count: int) -> None:
            nonlocal new_tokens
            new_tokens += count
            progress.tokens(count)
            if unwritten:
                commit()
            if stop.is_set():
                raise Interrupted

        if ray_engine:
            results = ray_engine.stream(requests, on_step, stats)
        else:
            results = sampler.stream(requests, config.batch_size, config.scheduler, on_step, stats=stats)
        try:
            for position, result in results:
                waiting[position + first] = result
                while done in waiting:
                    writer.write(schedule[done][0], waiting.pop(done))
                    done += 1
                    unwritten += 1
        except Interrupted:
            status = "interrupted"
        if unwritten:
            commit()
        seconds = time.perf_counter() - started
        _record_session(meta, session, done, new_tokens, seconds, status, stats, config.batch_size)
        writer.write_meta(meta)
    return RunSummary(writer.paths, status, len(schedule), done, session["resumed_from"], new_tokens, seconds, dict(adapted.skipped))


def _record_session(
    meta: dict, session: dict, done: int, tokens: int, seconds: float, status: str, stats: StreamStats, slots: int
) -> None:
    meta["status"] = status
    meta["counts"]["done"] = done
    session.update(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        done=done,
        new_tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        slot_utilisation=round(stats.utilisation(slots), 4),
        steps=stats.steps,
        prefills=stats.prefills,
    )
