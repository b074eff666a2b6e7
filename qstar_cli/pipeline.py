"""``generate`` as a Python API: dataset rows in, resumable q* samples out.

>>> from qstar_cli.pipeline import GenerateConfig, run_generate
>>> summary = run_generate(GenerateConfig(model_theta="demo", model_t="demo", theta_format="plain",
...                                       dataset="data/demo_prompts.jsonl", num_samples=4))

The schedule is the usable rows in row order, each ``samples_per_prompt`` times (row-major: row 0's
responses, then row 1's ...), fed to ``batch_size`` slots (``scheduler``
``continuous`` or ``static``, see :meth:`DualModelSampler.stream`). Samples finish out of order and
are written in schedule order, so the files are always a prefix of the schedule. A resumed run
replays the samples already written (their lengths, and a speculative run's rounds, come from the
sidecar; nothing of them is recomputed unless a new sample shares its batch) so that every new
sample sees the batches it saw in an uninterrupted run: with the same batch size, scheduler, device and dtype the files end up
byte-identical to an uninterrupted run's. (At ``--diagnostics none`` there are no lengths to replay;
a resumed run then starts its slots afresh, which changes float rounding only.)

Beyond one device: ``num_shards``/``shard_index`` run one part of the schedule
(:func:`shard_positions`) into files of its own, joined by :mod:`qstar_cli.merge`; ``engine="ray"``
takes the samples from model replicas on Ray (:mod:`qstar_cli.ray_engine`), this process writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
from typing import Any, Protocol, get_type_hints

import jinja2
import orjson
import pydantic
import numpy as np

import qstar_cli
from qstar_cli.adapters import AdaptedDataset, Prompt, adapt_rows, load_source, resolve_adapter
from qstar_cli.errors import QstarInputError, QstarRunError
from qstar_cli.mixture import check_alpha_method
from qstar_cli.models import DEMO, check_model_spec, model_digests, model_identity, resolve_device, resolve_dtype
from qstar_cli.paths import check_output_file, check_writable, local_path, resolved_spec
from qstar_cli.prompts import check_format
from qstar_cli.sampler import DRAFTERS, MAX_DRAFT_K, DualModelSampler, check_draft_k
from qstar_cli.samples import SampleRequest, StreamStats
from qstar_cli.scheduler import SCHEDULERS
from qstar_cli.sampling import SamplingParams
from qstar_cli.writer import DIAGNOSTICS_LEVELS, CheckpointedWriter, OutputPaths, ResumeError, fingerprint

#: Settings that do not change what is sampled, so a run may be resumed with other values. A shard's
#: files are named after its index and count, so all shards of a run (and their merge) share one.
NOT_FINGERPRINTED = (
    "output", "num_samples", "batch_size", "scheduler", "device", "dtype", "overwrite",
    "num_shards", "shard_index", "engine", "replicas", "ray_address",
)  # fmt: skip
#: Version of what the fingerprint covers; manifests without it come from a qstar that did not
#: fingerprint content (prompt ids, model files), and are refused rather than trusted.
FINGERPRINT_VERSION = 2
#: What a resumed run says when content, not a setting, differs.
CONTENT_CHANGES = {
    "prompt_ids": "the prompt ids of the schedule changed (a dataset row, a prompt format or a tokenizer)",
    "model_theta_identity": "the files of pi_theta changed (hub revision, configs or weights)",
    "model_t_identity": "the files of pi_t changed (hub revision, configs or weights)",
    "draft_model_theta_identity": "the files of the draft model for pi_theta changed",
    "draft_model_t_identity": "the files of the draft model for pi_t changed",
}
#: Settings that may name a local file or directory, with their values that are keywords, not paths.
PATH_SETTINGS = {
    "dataset": (), "model_theta": (DEMO,), "model_t": (DEMO,), "theta_format": ("chat", "plain"), "t_format": ("chat", "plain"),
    "draft_model_theta": (DEMO,), "draft_model_t": (DEMO,),
}  # fmt: skip
#: Settings of speculative sampling, fingerprinted only when it is on, with their values when off
#: (so that a plain run's fingerprint is the one it had before speculative sampling existed).
DRAFT_SETTINGS = {"draft_k": 0, "draft": "theta", "draft_model_theta": None, "draft_model_t": None}
#: The draft models' content, fingerprinted (like the settings above) only when the pair drafts.
DRAFT_CONTENT = {"draft_model_theta_identity": None, "draft_model_t_identity": None}
#: The models of a run, by setting, and what a message calls them.
MODEL_ROLES = {"model_theta": "pi_theta", "model_t": "pi_t", "draft_model_theta": "the draft model for pi_theta",
               "draft_model_t": "the draft model for pi_t"}  # fmt: skip
_LAX = pydantic.ConfigDict(coerce_numbers_to_str=True)
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
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
    samples_per_prompt: int = 1
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
    draft_k: int | str = 0
    draft: str = "theta"
    draft_model_theta: str | None = None
    draft_model_t: str | None = None

    def __post_init__(self) -> None:
        for name in ("model_theta", "model_t", "dataset"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
        checks = {
            "num_samples": self.num_samples is None or self.num_samples >= 1,
            "start_index": self.start_index >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "batch_size": self.batch_size >= 1,
            "samples_per_prompt": self.samples_per_prompt >= 1,
            "num_shards": self.num_shards >= 1,
            "replicas": self.replicas >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0 <= self.seed < 1 << 64:  # the counter-based generator's key is 64 bits
            raise ConfigError(f"--seed must be an integer from 0 to 2^64 - 1, got {self.seed}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must lie in 0..{self.num_shards - 1} (--num-shards {self.num_shards}), got {self.shard_index}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "local" and (self.replicas != 1 or self.ray_address is not None):
            flag = f"--replicas {self.replicas}" if self.replicas != 1 else "--ray-address"
            raise ConfigError(f"{flag} is for --engine ray (model replicas on Ray); add --engine ray, or drop it to run here")
        self._check_draft()
        if self.diagnostics not in DIAGNOSTICS_LEVELS:
            raise ConfigError(f"--diagnostics must be one of {', '.join(DIAGNOSTICS_LEVELS)}, got {self.diagnostics!r}")
        try:
            self.sampling_params()
            check_alpha_method(self.alpha_method, self.alpha)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _check_draft(self) -> None:
        """Speculative sampling: ``draft_k`` an integer >= 0 or auto, and a drafter that fits it."""
        value = self.draft_k.strip().lower() if isinstance(self.draft_k, str) else self.draft_k
        try:
            self.draft_k = value if value == "auto" else check_draft_k(value)
        except ValueError:
            raise ConfigError(f"--draft-k must be an integer from 0 (off) to {MAX_DRAFT_K}, or auto, got {self.draft_k}") from None
        self.draft = self.draft.strip().lower()
        if self.draft not in DRAFTERS:
            raise ConfigError(f"--draft must be one of {', '.join(DRAFTERS)}, got {self.draft!r}")
        pair = [f"--{name.replace('_', '-')}" for name in ("draft_model_theta", "draft_model_t") if getattr(self, name)]
        if self.draft == "pair" and len(pair) < 2:
            raise ConfigError("--draft pair needs both --draft-model-theta and --draft-model-t")
        if self.draft == "theta" and pair:
            raise ConfigError(f"{' and '.join(pair)} {'name' if len(pair) > 1 else 'names'} a draft model: add --draft pair to use it")
        if self.draft == "pair" and self.draft_k == 0:
            raise ConfigError("--draft pair drafts only with --draft-k K > 0 or auto (0 is plain sampling)")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> GenerateConfig:
        """Build from a mapping whose keys are field names or flag spellings (``model-theta``).

        Values are converted to the fields' types as pydantic does (``"4"`` is 4); one that cannot
        be (``max_new_tokens: "abc"``) is refused naming the setting.
        """
        types = get_type_hints(cls)
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}  # later spellings win (see setting_names)
        unknown = sorted(set(normalised) - set(types))
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; settings are {', '.join(sorted(types))}")
        typed = {}
        for name, value in normalised.items():
            try:
                typed[name] = pydantic.TypeAdapter(types[name], config=_LAX).validate_python(value)
            except pydantic.ValidationError as err:
                problem = err.errors()[0]["msg"].lower()
                raise ConfigError(f"{source}: {name} must be {_type_name(types[name])}, got {value!r} ({problem})") from None
        return cls(**typed)

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
            draft_k=self.draft_k,
            draft_model_theta=self.draft_model_theta if self.draft == "pair" else None,
            draft_model_t=self.draft_model_t if self.draft == "pair" else None,
        )

    def fingerprint_config(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues; local paths resolved,
        so that two spellings of one file are one input."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        if self.alpha_method != "fixed":
            values["alpha"] = None  # unused by the other methods
        if not self.draft_k:  # plain sampling: fingerprinted as before speculative sampling existed
            for name in DRAFT_SETTINGS:
                values.pop(name, None)
        for name, keywords in PATH_SETTINGS.items():
            if values.get(name) is not None and values[name] not in keywords:
                values[name] = resolved_spec(values[name])
        adapter_file, _, class_name = self.adapter.rpartition(":")
        if adapter_file.endswith(".py"):
            values["adapter"] = f"{resolved_spec(adapter_file)}:{class_name}"
        values["fingerprint_version"] = FINGERPRINT_VERSION
        return values

    def local_inputs(self) -> list[Path]:
        """The local files and directories this run reads (an output may replace none of them)."""
        specs = [getattr(self, name) for name, keywords in PATH_SETTINGS.items() if getattr(self, name) not in keywords]
        specs.append(self.adapter.rpartition(":")[0])
        return [path for spec in specs if spec and (path := local_path(spec)) is not None]


def setting_names(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A config file's ``values`` keyed by field names (``model-theta`` is ``model_theta``); a setting
    spelled both ways is refused (which one was meant?)."""
    normalised: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in normalised:
            raise ConfigError(f"{source}: {name} is given twice (as {name} and {name.replace('_', '-')}); keep one")
        normalised[name] = value
    return normalised


def _type_name(annotation: Any) -> str:
    """``an integer``, ``text or None``... for a field's type annotation."""
    members = getattr(annotation, "__args__", (annotation,))
    return " or ".join(_TYPE_NAMES.get(t, "None" if t is type(None) else str(t)) for t in members)


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


Schedule = list[tuple[Prompt, tuple[list[int], list[int]]]]


def encode_all(sampler: DualModelSampler, adapted: AdaptedDataset) -> Schedule:
    """Each usable prompt with its ids for both models; a prompt that a template rejects, or that
    leaves a model's context no room for a response, is skipped and counted."""
    encoded = []
    for prompt in adapted.prompts:
        try:
            ids = sampler.encode_prompts(prompt.messages)
        except jinja2.TemplateError as err:
            adapted.skipped[f"prompt format error: {err}"] += 1
            continue
        full = [
            f"{name} ({limit} tokens)"
            for name, limit, prompt_ids in zip(("pi_theta", "pi_t"), sampler.context_limits, ids)
            if limit is not None and len(prompt_ids) >= limit
        ]
        if full:
            adapted.skipped[f"prompt too long for the context of {' and '.join(full)}"] += 1
            continue
        encoded.append((prompt, ids))
    return encoded


def prompt_ids_fingerprint(schedule: Schedule, samples: int | None = None) -> dict[str, Any]:
    """The first ``samples`` entries of the schedule (all by default): their count and one SHA-256 of
    their rows and both models' prompt ids, so that an edited row, prompt format or tokenizer shows."""
    entries = schedule if samples is None else schedule[:samples]
    digest = hashlib.sha256()
    for prompt, (ids_theta, ids_t) in entries:
        digest.update(orjson.dumps([prompt.row_idx, ids_theta, ids_t]))
    return {"samples": len(entries), "sha256": digest.hexdigest()}


def nothing_usable(adapted: AdaptedDataset) -> QstarInputError:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(adapted.skipped.items()))
    return QstarInputError(f"no usable prompt in the {adapted.rows} rows taken: skipped {reasons}")


def check_output(config: GenerateConfig) -> OutputPaths:
    """The run's files, after checking that they can be written and replace no input."""
    main = Path(config.output)
    check_output_file(main, "--output")
    if main.suffix != ".jsonl" or main.name.endswith(".diagnostics.jsonl"):
        raise ConfigError(f"--output must name the main .jsonl file (its sidecar and manifest go beside it), got {config.output}")
    paths = config.output_paths()
    inputs = config.local_inputs()
    for path in (paths.main, paths.diagnostics, paths.meta, paths.lock):
        check_output_file(path, "--output", inputs)
    for path in (paths.main, paths.diagnostics, paths.meta):
        check_writable(path, "--output")
    return paths


def check_before_loading(config: GenerateConfig) -> None:
    """Everything about the models that can be checked without loading them."""
    for spec in (config.model_theta, config.model_t, config.draft_model_theta, config.draft_model_t):
        if spec is not None:
            check_model_spec(spec)
    resolve_dtype(config.dtype, resolve_device(config.device))
    for spec in (config.theta_format, config.t_format):
        check_format(spec)


#: How the schedule is split into shards, recorded in each shard's manifest (absent: :func:`snake_shard_positions`).
SHARD_SPLIT = "prefix-stable"


def shard_positions(prompt_lengths: list[int], num_shards: int, index: int) -> list[int]:
    """The schedule positions of shard ``index`` of ``num_shards``, in schedule order.

    Positions are dealt in rounds of ``num_shards``: each goes to the shard with the fewest prompt
    tokens so far among those not yet dealt one in its round (the lowest index on a tie). A position's
    shard depends on the positions before it alone, so a schedule that grows (``--num-samples``, rows
    added) keeps every shard's earlier positions, which resuming a shard needs; the sizes differ by
    one at most, and each shard gets its share of long and short prompts.
    """
    load = np.zeros(num_shards, dtype=np.int64)
    dealt = np.zeros(num_shards, dtype=bool)
    positions = []
    for position, length in enumerate(prompt_lengths):
        if position % num_shards == 0:
            dealt[:] = False
        shard = int(np.argmin(np.where(dealt, np.iinfo(np.int64).max, load)))
        load[shard] += length
        dealt[shard] = True
        if shard == index:
            positions.append(position)
    return positions


def snake_shard_positions(prompt_lengths: list[int], num_shards: int, index: int) -> list[int]:
    """The split of shards begun before :data:`SHARD_SPLIT` (kept so that they resume as begun):
    positions sorted by prompt length dealt in snake order; it changes when the schedule grows."""
    by_length = np.argsort(np.asarray(prompt_lengths, dtype=np.int64), kind="stable")
    round_, seat = np.divmod(np.arange(len(by_length)), num_shards)
    shard = np.where(round_ % 2 == 0, seat, num_shards - 1 - seat)
    return np.sort(by_length[shard == index]).tolist()


def shard_split(config: GenerateConfig, previous: dict[str, Any] | None, prompts: Schedule) -> tuple[str | None, list[int]]:
    """The split this shard continues (its manifest's, or :data:`SHARD_SPLIT` for a new one) and its
    positions in ``prompts``; a shard begun with the snake split resumes on it while its schedule is unchanged."""
    lengths = [len(ids_theta) + len(ids_t) for _, (ids_theta, ids_t) in prompts]
    begun = (previous or {}).get("shard")
    if isinstance(begun, dict) and "split" not in begun:
        if begun.get("schedule_samples") != len(prompts) * config.samples_per_prompt:
            raise ResumeError(
                f"{config.output_paths().main} is a shard begun by an earlier qstar, whose split changes with the schedule: "
                f"keep --num-samples (and the dataset) as they were ({begun.get('schedule_samples')} samples), "
                "or add --overwrite to start the shard afresh"
            )
        return None, snake_shard_positions(lengths, config.num_shards, config.shard_index)
    return SHARD_SPLIT, shard_positions(lengths, config.num_shards, config.shard_index)


def run_models(config: GenerateConfig) -> dict[str, str]:
    """The models this run loads, by setting (the draft pair only when it drafts)."""
    names = ("model_theta", "model_t") + (("draft_model_theta", "draft_model_t") if config.draft_k and config.draft == "pair" else ())
    return {name: getattr(config, name) for name in names}


def check_model_digests(writer: CheckpointedWriter, config: GenerateConfig) -> dict[str, dict[str, str]]:
    """The SHA-256 of every local model file of the run, after checking them against the run being
    continued: weights saved over a checkpoint keep its names and sizes (the fingerprinted identity),
    not its bytes. A run begun by a qstar that recorded no digests is continued, and they are recorded."""
    digests = {name: found for name, spec in run_models(config).items() if (found := model_digests(spec)) is not None}
    previous = None if config.overwrite else writer.previous_meta()
    recorded = (previous or {}).get("weights_sha256")
    for name, files in digests.items():
        old = recorded.get(name) if isinstance(recorded, dict) else None
        if isinstance(old, dict) and old != files:
            changed = sorted(f for f in set(old) | set(files) if old.get(f) != files.get(f))
            raise ResumeError(
                f"the files of {MODEL_ROLES[name]} changed since {writer.paths.main} began ({getattr(config, name)}: "
                f"{', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} in content); "
                "resume with the model it began with, or add --overwrite to start afresh"
            )
    return digests


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
    # Every check that needs no model comes first; nothing is deleted until everything has loaded.
    paths = check_output(config)
    if sampler is None:
        check_before_loading(config)

    ray_engine = None  # with engine ray: the replicas that sample, this process writing
    if config.engine == "ray":
        from qstar_cli.ray_engine import RayEngine

        ray_engine = RayEngine(config)
    dataset = load_source(config.dataset, config.subset, config.split)
    adapter = resolve_adapter(config.adapter, list(dataset.column_names), config.prompt_field)
    adapted = adapt_rows(dataset, adapter, config.start_index, config.num_samples, config.system_prompt)
    if not adapted.prompts:
        raise nothing_usable(adapted)
    settings = config.fingerprint_config()

    with CheckpointedWriter(paths.main, config.diagnostics) as writer:
        # Before the models load: the settings, then the models' content (hashed once per file content).
        writer.check_config(settings, overwrite=config.overwrite, optional=DRAFT_SETTINGS)
        if not config.overwrite:
            writer.check_files()
        digests = check_model_digests(writer, config)
        if sampler is None:
            progress.message(f"loading models: pi_theta {config.model_theta}, pi_t {config.model_t}")
            sampler = config.load_sampler("meta" if ray_engine else None)
        prompts = encode_all(sampler, adapted)
        if not prompts:
            raise nothing_usable(adapted)
        content = {
            "model_theta_identity": model_identity(config.model_theta),
            "model_t_identity": model_identity(config.model_t),
            **(
                {f"{name}_identity": model_identity(getattr(config, name)) for name in ("draft_model_theta", "draft_model_t")}
                if config.draft_k and config.draft == "pair"
                else {}
            ),
            "prompt_ids": prompt_ids_fingerprint(prompts),
        }
        fp_config = {**settings, **content}
        continued = {**fp_config, "prompt_ids": _continued_prompt_ids(writer, prompts, config.overwrite)}
        previous = writer.check_config(
            continued, overwrite=config.overwrite, descriptions=CONTENT_CHANGES, optional={**DRAFT_SETTINGS, **DRAFT_CONTENT}
        )
        if config.overwrite:
            writer.start_afresh()
        schedule_prompts = len(prompts)
        if config.num_shards > 1:  # a shard takes whole prompts (all K responses of each)
            split, positions = shard_split(config, previous, prompts)
            prompts = [prompts[p] for p in positions]
        # Row-major: each usable row's samples_per_prompt responses, then the next row's.
        schedule = [(prompt, ids, r) for prompt, ids in prompts for r in range(config.samples_per_prompt)]
        done = writer.resume([(p.row_idx, r) for p, _, r in schedule])
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
            "weights_sha256": digests,
            "counts": {"rows": adapted.rows, "samples": len(schedule), "done": done, "skipped": dict(adapted.skipped)},
            "sessions": (previous or {}).get("sessions", []),
        }
        if config.num_shards > 1:
            meta["shard"] = {
                "index": config.shard_index, "count": config.num_shards, "schedule_samples": schedule_prompts * config.samples_per_prompt,
                **({"split": split} if split else {}),
            }  # fmt: skip
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
        rounds = writer.sample_rounds(done) if config.draft_k and lengths is not None else None
        if rounds is not None and None in rounds:  # written without rounds: cannot be replayed
            lengths = rounds = None
        first = 0 if lengths is not None else done
        requests = (
            SampleRequest(
                prompt.row_idx, *ids, response_idx=r,
                replay_tokens=lengths[i] if i < done else None,
                replay_rounds=rounds[i] if rounds is not None and i < done else None,
            )
            for i, (prompt, ids, r) in enumerate(schedule[first:], start=first)
        )  # fmt: skip
        stats = StreamStats()
        waiting: dict[int, Any] = {}  # finished samples after the first unfinished one, by position
        unwritten = 0
        committed = done  # samples durable in the files and counted by the manifest

        def commit() -> None:
            nonlocal unwritten, committed
            writer.commit()
            progress.samples(unwritten)
            unwritten, committed = 0, done
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
        except (OSError, QstarRunError) as err:
            # The disk or a model failed: what the last commit made durable stays, and the manifest
            # (if it can still be written) says so; the same command resumes from there.
            with contextlib.suppress(OSError):
                _record_session(meta, session, committed, new_tokens, time.perf_counter() - started, "failed", stats, config.batch_size)
                writer.write_meta(meta)
            why = f"cannot write the run files beside {paths.main}: {err.strerror or err}" if isinstance(err, OSError) else str(err)
            fix = "free the space (or fix the files) and " if isinstance(err, OSError) else ""
            raise QstarRunError(f"{why}; {committed} of {len(schedule)} samples are saved; {fix}run the same command to resume") from err
        except BaseException:
            if previous is None and not committed:  # a fresh run that wrote nothing leaves nothing behind
                writer.start_afresh()
            raise
        seconds = time.perf_counter() - started
        _record_session(meta, session, done, new_tokens, seconds, status, stats, config.batch_size)
        writer.write_meta(meta)
    return RunSummary(writer.paths, status, len(schedule), done, session["resumed_from"], new_tokens, seconds, dict(adapted.skipped))


def _continued_prompt_ids(writer: CheckpointedWriter, schedule: Schedule, overwrite: bool) -> dict[str, Any]:
    """The prompt ids fingerprint to compare with the run being continued: over as many samples as
    that run's schedule had, since ``--num-samples`` (or rows added to the dataset) may grow it."""
    previous = None if overwrite else writer.previous_meta()
    old = (previous or {}).get("fingerprint_config", {}).get("prompt_ids")
    if not isinstance(old, dict) or not isinstance(old.get("samples"), int):
        return prompt_ids_fingerprint(schedule)
    if old["samples"] > len(schedule):
        raise ResumeError(
            f"{writer.paths.main} was made with a schedule of {old['samples']} samples and this run has {len(schedule)}; "
            "a resumed schedule may grow (--num-samples, rows added), not shrink; add --overwrite to start afresh"
        )
    return prompt_ids_fingerprint(schedule, old["samples"])


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
        prompts_prefilled=stats.prompts_prefilled,
    )
    if meta["config"]["draft_k"]:
        session["speculative"] = stats.speculative()
