"""Every setting of ``qstar generate``, declared once, and the checks of a configuration.

Each field of :class:`GenerateConfig` is one setting: its name (the flag is the name with dashes),
type, default, help text and what :class:`SettingInfo` says of it (fingerprinted or not, a local path
or not, part of speculative sampling, since which version). The command line (:mod:`qstar_cli.cli`),
the YAML config (:meth:`GenerateConfig.from_dict`), the fingerprint, the manifest's ``config`` and the
docs' flag table (:func:`flag_table`) are all derived from these fields.

>>> from qstar_cli.generate.config import GenerateConfig
>>> config = GenerateConfig(model_theta="demo", model_t="demo", dataset="data/demo_chat.jsonl")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import pydantic

from qstar_cli.distributions.alpha_methods import ALPHA_METHODS, alpha_method_help, check_alpha_method
from qstar_cli.engine.roles import ROLES
from qstar_cli.errors import QstarInputError
from qstar_cli.grading.graders import DEFAULT_TIMEOUT, DEFAULT_WORKERS, grader_help
from qstar_cli.paths import DEMO, check_output_file, check_writable, file_sha256, local_path, resolved_spec
from qstar_cli.runfiles.format import DIAGNOSTICS_LEVELS, SIDECAR_SUFFIX, OutputPaths, check_teacher_topk_k

if TYPE_CHECKING:
    from qstar_cli.distributions.sampling import SamplingParams
    from qstar_cli.engine.sampler import DualModelSampler

#: Version of what the fingerprint covers; manifests without it come from a qstar that did not
#: fingerprint content (prompt ids, model files), and are refused rather than trusted.
FINGERPRINT_VERSION = 2
_LAX = pydantic.ConfigDict(coerce_numbers_to_str=True)
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
ENGINES = ("local", "ray")
#: Settings whose values are keywords: spelled in any case (``AUTO``, ``Static``), kept in lower case.
KEYWORD_SETTINGS = ("alpha_method", "scheduler", "compile", "diagnostics", "engine", "draft", "device", "dtype")
#: The built-in adapters' names (the other values of ``adapter`` name a user's class).
ADAPTER_KEYWORDS = ("auto", "messages", "sharegpt", "deepscaler")


class ConfigError(QstarInputError):
    """A setting is missing or out of range."""


@dataclass(frozen=True)
class SettingInfo:
    """What a setting is beside its name, type and default (a field's ``metadata["setting"]``)."""

    #: What the help and the docs say; a function where it is read from a registry (graders, alpha methods).
    help: str | Callable[[], str]
    #: A resumed run must have the same value, since it decides what is sampled.
    fingerprinted: bool = True
    #: The setting may name a local file or directory (resolved for the fingerprint and protected
    #: from the output); these values of it are keywords, not paths.
    path_keywords: tuple[str, ...] | None = None
    #: Speculative sampling: fingerprinted only when ``draft_k`` is on, so that a plain run keeps the
    #: fingerprint it had before speculative sampling existed.
    draft: bool = False
    #: Grading: fingerprinted only when a grader is on, so that an ungraded run keeps the
    #: fingerprint it had before grading existed.
    grading: bool = False
    #: Fingerprinted only when not its default, so that a run without it keeps the fingerprint it had
    #: before the setting existed.
    when_set: bool = False
    #: What the command line parses, where it is not the field's type (``draft_k`` takes ``auto``).
    cli_type: type | None = None
    #: The default as the help shows it, where the field's default (None) means "derived".
    shown_default: str | None = None
    since: str = "0.1.0"

    @property
    def text(self) -> str:
        return self.help() if callable(self.help) else self.help


def setting(default: Any, help: str, **info: Any) -> Any:
    """A field of :class:`GenerateConfig`: its default, and what :class:`SettingInfo` says of it."""
    return field(default=default, metadata={"setting": SettingInfo(help, **info)})


def settings(config_class: type | None = None) -> list[tuple[dataclasses.Field, SettingInfo]]:
    """Every setting of ``config_class`` (:class:`GenerateConfig`), in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(config_class or GenerateConfig)]


def not_fingerprinted(config_class: type | None = None) -> tuple[str, ...]:
    return tuple(f.name for f, info in settings(config_class) if not info.fingerprinted)


def draft_settings(config_class: type | None = None) -> dict[str, Any]:
    """The speculative settings with their values when it is off (their defaults)."""
    return {f.name: f.default for f, info in settings(config_class) if info.draft}


#: What a graded run's manifest without the setting had: before grade_truncated, truncated responses were graded as any other.
_GRADED_BEFORE = {"grader": "none", "grade_truncated": True}
#: The settings that may name a user's code (FILE.py:NAME), and the key of its content digest in the fingerprint.
USER_CODE = {"grader": "grader_sha256", "adapter": "adapter_sha256"}


def grading_settings(config_class: type | None = None) -> dict[str, Any]:
    """The grading settings with the values a manifest without them had (:data:`_GRADED_BEFORE`, else the defaults)."""
    return {f.name: _GRADED_BEFORE.get(f.name, f.default) for f, info in settings(config_class) if info.grading}


def optional_settings(config_class: type | None = None) -> dict[str, Any]:
    """The settings a fingerprint holds only when they are on, with their values when off: a run's
    manifest that lacks one had it off (:meth:`~qstar_cli.runfiles.writer.CheckpointedWriter.check_config`);
    likewise the digests of user code, absent without it."""
    when_set = {f.name: f.default for f, info in settings(config_class) if info.when_set}
    return {**draft_settings(config_class), **grading_settings(config_class), **when_set, **dict.fromkeys(USER_CODE.values())}


def path_settings(config_class: type | None = None) -> dict[str, tuple[str, ...]]:
    """The settings that may name a local path, with their keyword values."""
    return {f.name: info.path_keywords for f, info in settings(config_class) if info.path_keywords is not None}


def flag(name: str) -> str:
    """The command line's spelling of setting ``name``: ``--max-new-tokens`` for ``max_new_tokens``."""
    return "--" + name.replace("_", "-")


def shown_default(f: dataclasses.Field, info: SettingInfo) -> str | None:
    """The default as help texts and the flag table show it (None: no default worth showing)."""
    if info.shown_default is not None:
        return info.shown_default
    return None if f.default is None or f.default is False else str(f.default)


def flag_table(config_class: type | None = None) -> str:
    """The docs' table of ``qstar generate`` flags (Markdown), from the declarations."""
    rows = ["| flag | meaning | default | fingerprinted | since |", "|---|---|---|---|---|"]
    for f, info in settings(config_class):
        default = shown_default(f, info)
        fingerprinted = "when drafting" if info.draft else "when grading" if info.grading else ("yes" if info.fingerprinted else "no")
        meaning = info.text.replace("|", "\\|")
        rows.append(f"| `{flag(f.name)}` | {meaning} | {f'`{default}`' if default else ''} | {fingerprinted} | {info.since} |")
    return "\n".join(rows) + "\n"


_NOT_KEPT = "does not change what is sampled: a run may be resumed with another value"


@dataclass
class GenerateConfig:
    """Every setting of ``qstar generate``; field names are the flags with ``_``."""

    model_theta: str | None = setting(None, "Policy pi_theta: hub id, local directory, .gguf file, or 'demo'.", path_keywords=(DEMO,))
    model_t: str | None = setting(None, "Target pi_t: hub id, local directory, .gguf file, or 'demo'.", path_keywords=(DEMO,))
    theta_format: str | None = setting(
        None,
        "Prompt format of pi_theta: chat, plain or a Jinja file.",
        path_keywords=("chat", "plain"),
        shown_default="chat if it has a template",
    )
    t_format: str | None = setting(
        None,
        "Prompt format of pi_t: chat, plain or a Jinja file.",
        path_keywords=("chat", "plain"),
        shown_default="chat if it has a template",
    )
    dataset: str | None = setting(None, "Hub dataset id, local .jsonl/.json/.parquet/.csv, or save_to_disk directory.", path_keywords=())
    subset: str | None = setting(None, "Hub dataset subset (config name).")
    split: str = setting("train", "Dataset split.")
    adapter: str = setting("auto", "auto, messages, sharegpt, deepscaler, MODULE:CLASS or FILE.py:CLASS.")
    prompt_field: str | None = setting(None, "Use this column as the user message.")
    system_prompt: str | None = setting(None, "System message for conversations that have none.")
    output: str = setting("data/generated.jsonl", "Main JSONL; sidecar and manifest beside it.", fingerprinted=False)
    num_samples: int | None = setting(None, "Rows to take (the schedule may grow on resume).", fingerprinted=False, shown_default="all")
    start_index: int = setting(0, "First row.")
    alpha_method: str = setting("kl_symmetry", lambda: f"How alpha is chosen: {alpha_method_help()}")
    alpha: float = setting(0.5, "The alpha of --alpha-method fixed.")
    max_new_tokens: int = setting(512, "Response length cap.")
    temperature: float = setting(1.0, "Applied to q after alpha is solved; 0 is greedy.")
    top_k: int = setting(0, "Keep the k most likely tokens of q; 0 is off.")
    top_p: float = setting(1.0, "Nucleus of q.")
    batch_size: int | str = setting(
        8,
        "Slots: responses generated at once, or auto: as many as --memory-fraction of the free memory holds.",
        fingerprinted=False,
        cli_type=str,
    )
    memory_fraction: float = setting(
        0.9, "With --batch-size auto: the share of the memory free once the models are loaded that the slots may take.",
        fingerprinted=False, since="0.2.0",
    )  # fmt: skip
    scheduler: str = setting(
        "continuous", "continuous (a finished slot takes the next prompt) or static (fixed batches).", fingerprinted=False
    )
    samples_per_prompt: int = setting(1, "Responses per prompt (K), row-major, each line with its response_idx.")
    seed: int = setting(0, "Seed of the counter-based sampler.")
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.", fingerprinted=False)
    dtype: str = setting("auto", "auto, float32, bfloat16 or float16.", fingerprinted=False)
    compile: str = setting(
        "auto", "Compile the round's mathematics with torch.compile: on, off, or auto (on with CUDA).", fingerprinted=False, since="0.2.0"
    )
    diagnostics: str = setting("full", "Sidecar level: full, summary or none (no sidecar; the per-token diagnostics are not computed).")
    overwrite: bool = setting(
        False, "Start afresh instead of resuming (--no-overwrite resumes, whatever a --config says).", fingerprinted=False
    )
    num_shards: int = setting(1, "Split the schedule into N disjoint shards (join them with qstar merge).", fingerprinted=False)
    shard_index: int = setting(0, "Which shard this run writes, 0..N-1, to OUT-0000I-of-0000N.jsonl.", fingerprinted=False)
    engine: str = setting("local", "local (this process) or ray (model replicas on Ray; pip install 'qstar[ray]').", fingerprinted=False)
    replicas: int = setting(1, "Model replicas of --engine ray, one GPU each where there are GPUs.", fingerprinted=False)
    ray_address: str | None = setting(
        None, "Ray cluster to join (--engine ray).", fingerprinted=False, shown_default="$RAY_ADDRESS, else a local Ray"
    )
    draft_k: int | str = setting(
        0, "Speculative q* sampling: drafts per row per round, or auto (exact; 0 = off).", draft=True, cli_type=str
    )
    draft: str = setting("theta", "Drafter of --draft-k: theta (pi_theta) or pair (--draft-model-theta/-t's mixture).", draft=True)
    draft_model_theta: str | None = setting(
        None, "Small stand-in for pi_theta in the draft pair (same vocabulary).", draft=True, path_keywords=(DEMO,)
    )
    draft_model_t: str | None = setting(
        None, "Small stand-in for pi_t in the draft pair (same vocabulary).", draft=True, path_keywords=(DEMO,)
    )
    teacher_topk: int = setting(
        0, "Keep pi_t's K most likely ids and their log-probabilities at every emitted token, and the mass outside them, "
        "in the sidecar for distillation (0 = off; at most 64; needs --diagnostics full).", when_set=True, since="0.3.0",
    )  # fmt: skip
    grader: str | None = setting(
        None, lambda: f"Grade every response against the dataset's answer: {grader_help()}.",
        grading=True, shown_default="math where the adapter names an answer column (deepscaler), else none", since="0.2.0",
    )  # fmt: skip
    answer_field: str | None = setting(
        None, "The dataset column holding the reference answer (bare LaTeX and GSM8K's '#### 42' are understood).",
        grading=True, shown_default="answer", since="0.2.0",
    )  # fmt: skip
    grader_timeout: float = setting(
        DEFAULT_TIMEOUT, "Seconds one response's grade may take; past it the response is ungraded (correct: null, reason timeout).",
        grading=True, since="0.2.0",
    )  # fmt: skip
    grader_workers: int = setting(DEFAULT_WORKERS, "Worker processes that grade beside the decode.", fingerprinted=False, since="0.2.0")
    grade_truncated: bool = setting(False, "Grade responses cut off by --max-new-tokens as any other; by default they have no "
                                    "final answer: graded wrong (reason truncated).", grading=True, since="0.3.0")  # fmt: skip

    def __post_init__(self) -> None:
        # Imported here: the command line derives its options from this module without loading torch.
        from qstar_cli.engine.compiled import COMPILE_MODES
        from qstar_cli.engine.scheduler import SCHEDULERS

        for name in (*(info.setting for info in ROLES.values() if not info.draft), "dataset"):
            if not getattr(self, name):
                raise ConfigError(f"{flag(name)} is required (on the command line or in --config)")
        self._lower_keywords()
        self._check_batch_size()
        for name, value in dataclasses.asdict(self).items():  # every count fits a 64-bit integer
            if name != "seed" and isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
                raise ConfigError(f"{flag(name)} must be below 2^63, got {value}")
        checks = {
            "num_samples": self.num_samples is None or self.num_samples >= 1,
            "start_index": self.start_index >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "batch_size": self.batch_size == "auto" or self.batch_size >= 1,
            "samples_per_prompt": self.samples_per_prompt >= 1,
            "num_shards": self.num_shards >= 1,
            "replicas": self.replicas >= 1,
            "grader_timeout": self.grader_timeout > 0,
            "grader_workers": self.grader_workers >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                at_least = "0 or more" if name == "start_index" else "positive"
                raise ConfigError(f"{flag(name)} must be {at_least}, got {getattr(self, name)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0 <= self.seed < 1 << 64:  # the counter-based generator's key is 64 bits
            raise ConfigError(f"--seed must be an integer from 0 to 2^64 - 1, got {self.seed}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"--shard-index must lie in 0..{self.num_shards - 1} (--num-shards {self.num_shards}), got {self.shard_index}"
            )
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "local" and (self.replicas != 1 or self.ray_address is not None):
            given = f"--replicas {self.replicas}" if self.replicas != 1 else "--ray-address"
            raise ConfigError(f"{given} is for --engine ray (model replicas on Ray); add --engine ray, or drop it to run here")
        self._check_draft()
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.diagnostics not in DIAGNOSTICS_LEVELS:
            raise ConfigError(f"--diagnostics must be one of {', '.join(DIAGNOSTICS_LEVELS)}, got {self.diagnostics!r}")
        try:
            check_teacher_topk_k(self.teacher_topk, "--teacher-topk")
            self.sampling_params()
            check_alpha_method(self.alpha_method, self.alpha)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.teacher_topk and self.diagnostics != "full":
            raise ConfigError(
                f"--teacher-topk keeps pi_t's top-K in the sidecar's per-token arrays, which --diagnostics {self.diagnostics} does not "
                "write: add --diagnostics full, or drop --teacher-topk"
            )
        if not ALPHA_METHODS[self.alpha_method].uses_alpha and self.alpha != GenerateConfig.alpha:
            raise ConfigError(
                f"--alpha {self.alpha} is for --alpha-method fixed (--alpha-method {self.alpha_method} chooses alpha itself); "
                "add --alpha-method fixed, or drop --alpha"
            )

    def _lower_keywords(self) -> None:
        """One rule for every keyword value: any case is accepted (``AUTO``, ``Static``, ``ON``) and kept
        in lower case; a value that may name a file is a keyword only where no such file exists."""
        for name in KEYWORD_SETTINGS:
            setattr(self, name, getattr(self, name).strip().lower())
        named = {**{name: keywords for name, keywords in path_settings(type(self)).items() if keywords}, "adapter": ADAPTER_KEYWORDS}
        for name, keywords in named.items():
            value = getattr(self, name)
            if value is not None and value.strip().lower() in keywords and local_path(value) is None:
                setattr(self, name, value.strip().lower())

    def _check_batch_size(self) -> None:
        """``batch_size`` an integer or auto (local engine), ``memory_fraction`` in (0, 1]."""
        value = self.batch_size.strip().lower() if isinstance(self.batch_size, str) else self.batch_size
        try:
            if isinstance(value, (bool, float)):
                raise TypeError
            self.batch_size = value if value == "auto" else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--batch-size must be a positive integer or auto, got {self.batch_size!r}") from None
        if not (
            isinstance(self.memory_fraction, (int, float)) and not isinstance(self.memory_fraction, bool) and 0 < self.memory_fraction <= 1
        ):
            raise ConfigError(f"--memory-fraction must lie in (0, 1], got {self.memory_fraction}")
        if self.batch_size == "auto" and self.engine == "ray":
            raise ConfigError("--batch-size auto sizes this process's slots; with --engine ray give each replica's --batch-size")

    def _check_draft(self) -> None:
        """Speculative sampling: ``draft_k`` an integer >= 0 or auto, and a drafter that fits it."""
        from qstar_cli.distributions.speculative import DRAFTERS, MAX_DRAFT_K, check_draft_k

        value = self.draft_k.strip().lower() if isinstance(self.draft_k, str) else self.draft_k
        try:
            self.draft_k = value if value == "auto" else check_draft_k(value)
        except ValueError:
            raise ConfigError(f"--draft-k must be an integer from 0 (off) to {MAX_DRAFT_K}, or auto, got {self.draft_k}") from None
        if self.draft not in DRAFTERS:
            raise ConfigError(f"--draft must be one of {', '.join(DRAFTERS)}, got {self.draft!r}")
        pair = [flag(info.setting) for info in ROLES.values() if info.draft and getattr(self, info.setting)]
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
        # A setting spelled both ways keeps the later value here; a config file's are refused before (setting_names).
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - set(types))
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; settings are {', '.join(sorted(types))}")
        typed = {}
        for name, value in normalised.items():
            if name == "compile" and isinstance(value, bool):  # YAML reads a bare on / off as a boolean
                value = "on" if value else "off"
            if isinstance(value, bool) and types[name] is not bool:  # YAML's true is no number of tokens
                raise ConfigError(f"{source}: {name} must be {_type_name(types[name])}, got {value!r}")
            try:
                typed[name] = pydantic.TypeAdapter(types[name], config=_LAX).validate_python(value)
            except pydantic.ValidationError as err:
                problem = err.errors()[0]["msg"].lower()
                raise ConfigError(f"{source}: {name} must be {_type_name(types[name])}, got {value!r} ({problem})") from None
        return cls(**typed)

    def sampling_params(self) -> SamplingParams:
        from qstar_cli.distributions.sampling import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def output_paths(self) -> OutputPaths:
        """This run's files: those of ``output``, or of shard ``shard_index`` when ``num_shards`` > 1."""
        paths = OutputPaths(Path(self.output))
        return paths.shard(self.shard_index, self.num_shards) if self.num_shards > 1 else paths

    def load_sampler(self, device: str | None = None) -> DualModelSampler:
        """Both models as configured (on ``device`` instead of ``self.device`` where given)."""
        from qstar_cli.engine.sampler import DualModelSampler

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
            compile=self.compile,
            teacher_topk=self.teacher_topk,
            draft_model_theta=self.draft_model_theta if self.draft == "pair" else None,
            draft_model_t=self.draft_model_t if self.draft == "pair" else None,
        )

    def fingerprint_config(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues; local paths resolved,
        so that two spellings of one file are one input."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in not_fingerprinted(type(self))}
        if not ALPHA_METHODS[self.alpha_method].uses_alpha:
            values["alpha"] = None  # unused by the method
        if not self.draft_k:  # plain sampling: fingerprinted as before speculative sampling existed
            for name in draft_settings(type(self)):
                values.pop(name, None)
        for f, info in settings(type(self)):
            if info.when_set and values[f.name] == f.default:  # fingerprinted as before the setting existed
                values.pop(f.name)
        if self.grader in (None, "none"):  # ungraded: fingerprinted as before grading existed
            for name in grading_settings(type(self)):
                values.pop(name, None)
        for name, keywords in path_settings(type(self)).items():
            if values.get(name) is not None and values[name] not in keywords:
                values[name] = resolved_spec(values[name])
        for setting_name, digest in USER_CODE.items():  # a user's file by its path and its content
            file, _, name = (getattr(self, setting_name) or "").rpartition(":")
            if file.endswith(".py"):
                values[setting_name] = f"{resolved_spec(file)}:{name}"
                if (path := local_path(file)) is not None:
                    values[digest] = file_sha256(path)
        values["fingerprint_version"] = FINGERPRINT_VERSION
        return values

    def user_code_changes(self) -> dict[str, str]:
        """What a resume refused for changed user code says, by digest."""
        files = {name: (getattr(self, name) or "").rpartition(":")[0] for name in USER_CODE}
        return {USER_CODE[name]: f"the {name} {file} changed in content since the run began" for name, file in files.items()}

    def local_inputs(self) -> list[Path]:
        """The local files and directories this run reads (an output may replace none of them)."""
        specs = [getattr(self, name) for name, keywords in path_settings(type(self)).items() if getattr(self, name) not in keywords]
        specs += [(getattr(self, name) or "").rpartition(":")[0] for name in USER_CODE]
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


def run_models(config: GenerateConfig) -> dict[str, str]:
    """The models this run loads, by setting (the draft pair only when it drafts)."""
    from qstar_cli.engine.roles import run_roles

    settings = (ROLES[role].setting for role in run_roles(pair_drafts=bool(config.draft_k) and config.draft == "pair"))
    return {name: getattr(config, name) for name in settings}


def check_output(config: GenerateConfig) -> OutputPaths:
    """The run's files, after checking that they can be written and replace no input."""
    main = Path(config.output)
    check_output_file(main, "--output")
    if main.suffix != ".jsonl" or main.name.endswith(SIDECAR_SUFFIX):
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
    from qstar_cli.engine.compiled import check_compiler, use_compile
    from qstar_cli.engine.models import check_model_architecture, resolve_device, resolve_dtype
    from qstar_cli.engine.prompts import check_format

    for spec in dict.fromkeys(run_models(config).values()):
        check_model_architecture(spec)
    device = resolve_device(config.device)
    resolve_dtype(config.dtype, device)
    if use_compile(config.compile, device):
        check_compiler(device)
    for spec in (config.theta_format, config.t_format):
        check_format(spec)
