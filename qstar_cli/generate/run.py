"""``generate`` as a Python API: dataset rows in, resumable q* samples out.

>>> from qstar_cli import GenerateConfig, run_generate
>>> summary = run_generate(GenerateConfig(model_theta="demo", model_t="demo", theta_format="plain",
...                                       dataset="data/demo_chat.jsonl", num_samples=4))

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
(:func:`~qstar_cli.generate.schedule.shard_positions`) into files of its own, joined by :mod:`qstar_cli.runfiles.merge`; ``engine="ray"``
takes the samples from model replicas on Ray (:mod:`qstar_cli.generate.ray_engine`), this process writing.
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
from typing import TYPE_CHECKING, Any, Protocol

import torch

import qstar_cli
from qstar_cli.engine.memory import free_memory
from qstar_cli.engine.models import model_digests, model_identity
from qstar_cli.engine.roles import ROLES
from qstar_cli.engine.samples import SampleRequest, StreamStats
from qstar_cli.errors import QstarRunError
from qstar_cli.generate.adapters import adapt_rows, load_source, resolve_adapter
from qstar_cli.generate.config import GenerateConfig, check_before_loading, check_output, optional_settings, run_models
from qstar_cli.generate.engines import make_engine
from qstar_cli.generate.schedule import (
    Schedule,
    check_schedule_fits,
    continued_prompt_ids,
    encode_all,
    nothing_usable,
    prompt_ids_fingerprint,
    shard_split,
)
from qstar_cli.grading.graders import row_of
from qstar_cli.grading.pool import grading_pool, run_grader
from qstar_cli.runfiles.format import FORMAT_VERSION, Manifest
from qstar_cli.runfiles.writer import CheckpointedWriter, OutputPaths, ResumeError, fingerprint

if TYPE_CHECKING:
    from qstar_cli.engine.sampler import DualModelSampler
    from qstar_cli.generate.adapters import AdaptedDataset, DatasetAdapter
    from qstar_cli.generate.engines import Engine

#: What a resumed run says when content, not a setting, differs.
CONTENT_CHANGES = {
    "prompt_ids": "the prompt ids of the schedule changed (a dataset row, a prompt format or a tokenizer)",
    **{info.identity: f"the files of {info.description} changed (hub revision, configs or weights)" for info in ROLES.values()},
}
#: The draft models' content, fingerprinted (like the draft settings) only when the pair drafts.
DRAFT_CONTENT = {info.identity: None for info in ROLES.values() if info.draft}
#: What a message calls the model of each setting.
MODEL_DESCRIPTIONS = {info.setting: info.description for info in ROLES.values()}


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
                f"the files of {MODEL_DESCRIPTIONS[name]} changed since {writer.paths.main} began ({getattr(config, name)}: "
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
    """Generate (or finish generating) the output of ``config``: check, load, schedule, resume,
    stream, commit.

    ``stop``, once set, ends the run after the current round; the batch in progress is dropped and
    regenerated on resume. ``sampler`` reuses already loaded models (it must match ``config``).
    """
    progress = progress or _NoProgress()
    # Every check that needs no model comes first; nothing is deleted until everything has loaded.
    paths = check_output(config)
    if sampler is None:
        check_before_loading(config)
    engine = make_engine(config, sampler)
    adapted, adapter = _usable_rows(config)
    config, grader = run_grader(config, adapter, adapted.prompts)
    with (
        CheckpointedWriter(paths.main, config.diagnostics) as writer,
        grading_pool(grader, config.grader_workers, config.grader_timeout) as grades,
    ):
        settings, digests = check_settings(writer, config)
        if sampler is None:
            progress.message(f"loading models: pi_theta {config.model_theta}, pi_t {config.model_t}")
        sampler = engine.load()
        compile_seconds = warm_up_compiled(sampler, progress)
        prompts = encode_all(sampler, adapted)
        if not prompts:
            raise nothing_usable(adapted)
        fp_config, previous = check_content(writer, config, settings, prompts)
        prompts, shard = _shard_prompts(config, previous, prompts)
        # Row-major: each usable row's samples_per_prompt responses, then the next row's.
        schedule = [(prompt, ids, r) for prompt, ids in prompts for r in range(config.samples_per_prompt)]
        # Sized (or refused) before anything is deleted: a run that cannot fit one slot changes nothing.
        slot_plan = _plan_slots(engine, config, previous, prompts, len(schedule), progress)
        if config.overwrite:
            writer.start_afresh()
        done = writer.resume([(p.row_idx, r) for p, _, r in schedule], [ids for _, ids, _ in schedule])
        meta = new_manifest(
            config,
            adapted,
            fp_config,
            placement=engine.placement(sampler),
            digests=digests,
            samples=len(schedule),
            done=done,
            previous=previous,
            shard=shard,
            slot_plan=slot_plan,
            compile_seconds=compile_seconds,
        )
        commits = _Commits(writer, config, meta, engine, progress, stop or threading.Event(), done, fresh=previous is None, grades=grades)
        status = commits.run(schedule, _requests(writer, config, schedule, done))
    return RunSummary(writer.paths, status, len(schedule), commits.done, done, commits.new_tokens, commits.seconds, dict(adapted.skipped))


def _usable_rows(config: GenerateConfig) -> tuple[AdaptedDataset, DatasetAdapter]:
    """The dataset's rows as prompts (refused when none is usable or the schedule cannot fit the
    memory), and the adapter that made them."""
    dataset = load_source(config.dataset, config.subset, config.split)
    adapter = resolve_adapter(config.adapter, list(dataset.column_names), config.prompt_field)
    adapted = adapt_rows(dataset, adapter, config.start_index, config.num_samples, config.system_prompt)
    if not adapted.prompts:
        raise nothing_usable(adapted)
    samples = len(adapted.prompts) * config.samples_per_prompt
    check_schedule_fits(samples, len(adapted.prompts), config.samples_per_prompt, free_memory(torch.device("cpu")))
    return adapted, adapter


def check_settings(writer: CheckpointedWriter, config: GenerateConfig) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """Before the models load: the settings (fingerprinted), checked against the run being continued
    with its files, and the digests of the local model files (:func:`check_model_digests`)."""
    settings = config.fingerprint_config()
    writer.check_config(settings, overwrite=config.overwrite, descriptions=config.user_code_changes(), optional=optional_settings())
    if not config.overwrite:
        check_shard_of(writer, config)
        writer.check_files(speculative=bool(config.draft_k))
    return settings, check_model_digests(writer, config)


def check_content(
    writer: CheckpointedWriter, config: GenerateConfig, settings: dict[str, Any], prompts: Schedule
) -> tuple[dict[str, Any], Manifest | None]:
    """Once the prompts are encoded: the fingerprinted settings and content, and the manifest of the
    run being continued (None for a new run), after checking that the content is the same."""
    fp_config = {**settings, **content_fingerprint(config, prompts)}
    continued = {**fp_config, "prompt_ids": continued_prompt_ids(writer, prompts, config.overwrite)}
    previous = writer.check_config(
        continued,
        overwrite=config.overwrite,
        descriptions=CONTENT_CHANGES,
        optional={**optional_settings(), **DRAFT_CONTENT},
    )
    return fp_config, previous


def _shard_prompts(config: GenerateConfig, previous: Manifest | None, prompts: Schedule) -> tuple[Schedule, dict[str, Any]]:
    """The prompts this run samples and, for a shard, what its manifest says of it (``{}`` for a
    whole run). A shard takes whole prompts (all K responses of each)."""
    if config.num_shards == 1:
        return prompts, {}
    split, positions = shard_split(config, previous, prompts)
    shard = {"index": config.shard_index, "count": config.num_shards, "schedule_samples": len(prompts) * config.samples_per_prompt,
             **({"split": split} if split else {})}  # fmt: skip
    return [prompts[p] for p in positions], shard


def _plan_slots(
    engine: Engine, config: GenerateConfig, previous: Manifest | None, prompts: Schedule, samples: int, progress: ProgressSink
) -> dict[str, Any] | None:
    """The slots of ``--batch-size auto``, said to the user, and as the manifest records them (None
    for a given number); a resumed run keeps the slots it began with."""
    begun = (previous or {}).get("slot_plan")
    begun_with = begun.get("slots") if isinstance(begun, dict) and config.batch_size == "auto" else None
    plan = engine.plan_slots([ids for _, ids in prompts], samples, begun_with)
    if plan:
        progress.message(plan.describe())
        if engine.slots != plan.slots:
            progress.message(f"keeping the {engine.slots} slots this run began with, so that its samples stay as they were")
    return {**plan.record(), "planned_slots": plan.slots, "slots": engine.slots} if plan else None


def new_manifest(
    config: GenerateConfig,
    adapted: AdaptedDataset,
    fp_config: dict[str, Any],
    *,
    placement: tuple[str, str],
    digests: dict[str, dict[str, str]],
    samples: int,
    done: int,
    previous: Manifest | None,
    shard: dict[str, Any],
    slot_plan: dict[str, Any] | None,
    compile_seconds: float | None,
) -> dict[str, Any]:
    """The manifest a session starts with (status running): the settings, fingerprint, placement,
    versions, model digests, counts and the sessions before this one."""
    return {
        "format_version": FORMAT_VERSION,
        "qstar_version": qstar_cli.__version__,
        "status": "running",
        "fingerprint": fingerprint(fp_config),
        "fingerprint_config": fp_config,
        "config": {**dataclasses.asdict(config), "adapter_resolved": adapted.adapter},
        **dict(zip(("device", "dtype"), placement)),
        "versions": package_versions(),
        "weights_sha256": digests,
        "counts": {"rows": adapted.rows, "samples": samples, "done": done, "skipped": dict(adapted.skipped)},
        "sessions": list((previous or {}).get("sessions", [])),  # a copy: the writer keeps the previous manifest
        **({"shard": shard} if shard else {}),
        **({"slot_plan": slot_plan} if slot_plan else {}),
        **({"compile_seconds": round(compile_seconds, 2)} if compile_seconds is not None else {}),
    }


def warm_up_compiled(sampler: DualModelSampler, progress) -> float | None:
    """Compile the round's mathematics and the models' decode forwards before the run (``--compile``),
    saying how long it took."""
    from qstar_cli.engine.compiled import EAGER, warm_up

    if sampler.math is EAGER or sampler.theta.model.device.type == "meta":  # Ray replicas compile their own
        return None
    progress.message("compiling the round's mathematics and the models' decode forwards (torch.compile; once per process)")
    seconds = warm_up(sampler)
    progress.message(f"compiled in {seconds:.1f} s")
    return seconds


def check_shard_of(writer: CheckpointedWriter, config: GenerateConfig) -> None:
    """Refuse to continue a shard's files as a run of their own (``--output`` naming a shard file)."""
    shard = (writer.previous_meta() or {}).get("shard")
    if config.num_shards == 1 and isinstance(shard, dict):
        raise ResumeError(
            f"{writer.paths.main} is shard {shard.get('index')} of {shard.get('count')} of a run: resume it with --output naming "
            f"the run's file and --num-shards {shard.get('count')} --shard-index {shard.get('index')}, or join the shards with qstar merge"
        )


def content_fingerprint(config: GenerateConfig, prompts: Schedule) -> dict[str, Any]:
    """What identifies the content a run samples from: each model's files and the prompt ids."""
    return {
        **{f"{name}_identity": model_identity(spec) for name, spec in run_models(config).items()},
        "prompt_ids": prompt_ids_fingerprint(prompts),
    }


def _requests(writer: CheckpointedWriter, config: GenerateConfig, schedule: list, done: int) -> tuple[int, Iterator[SampleRequest]]:
    """Where the stream starts and its requests: the samples already written are replayed (their
    lengths, and a speculative run's rounds, from the sidecar), so that the new ones see the batches
    of an uninterrupted run; without a sidecar the stream starts after them."""
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
    return first, requests


class _Commits:
    """The samples of the stream written in schedule order and committed after each round, the
    manifest following; what a failure of the disk or a model leaves is said in one line."""

    def __init__(self, writer, config, meta, engine, progress, stop, done: int, fresh: bool, grades=None):
        self.writer, self.config, self.meta, self.engine, self.progress, self.stop = writer, config, meta, engine, progress, stop
        self.grades = grades  # a GradingPool for a graded run, else None
        self.done = self.committed = done  # written; durable in the files and counted by the manifest
        self.fresh, self.unwritten, self.new_tokens, self.seconds = fresh, 0, 0, 0.0
        self.stats = StreamStats()
        self.session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "resumed_from": done, "engine": engine.record}
        meta["sessions"].append(self.session)
        writer.write_meta(meta)

    def run(self, schedule: list, start: tuple[int, Iterator[SampleRequest]]) -> str:
        """Stream the samples and write them; the run's status."""
        self.progress.start(len(schedule), self.done)
        self.started, status = time.perf_counter(), "complete"
        first, requests = start
        self.schedule = schedule
        self.waiting: dict[int, Any] = {}  # finished samples not yet written, by position
        try:
            try:
                for position, result in self.engine.stream(requests, self._round, self.stats):
                    self.waiting[position + first] = result
                    if self.grades is not None:
                        self.grades.submit(
                            position + first, result.text, row_of(schedule[position + first][0].metadata), result.finish_reason
                        )
                    self._write_ready(wait=False)
            except Interrupted:
                status = "interrupted"
            self._write_ready(wait=True)  # the samples finished in order: the last grades are waited for
            if self.unwritten:
                self._commit()
        except (OSError, QstarRunError) as err:
            # What the last commit made durable stays, and the manifest (if it can still be written)
            # says so; the same command resumes from there.
            try:
                self._record(self.committed, "failed")
                manifest = ""
            except OSError:
                manifest = f"; the manifest {self.writer.paths.meta.name} could not be updated (it still says running)"
            why = (
                f"cannot write the run files beside {self.writer.paths.main}: {err.strerror or err}"
                if isinstance(err, OSError)
                else str(err)
            )
            fix = "free the space (or fix the files) and " if isinstance(err, OSError) else ""
            raise QstarRunError(
                f"{why}; {self.committed} of {len(schedule)} samples are saved{manifest}; {fix}run the same command to resume"
            ) from err
        except BaseException:
            if self.fresh and not self.committed:  # a fresh run that wrote nothing leaves nothing behind
                self.writer.start_afresh()
            raise
        self._record(self.done, status)
        return status

    def _write_ready(self, wait: bool) -> None:
        """Write the finished samples in schedule order, up to the first unfinished one or (unless
        ``wait``) the first whose grade is not ready: the decode never waits on a grade."""
        while self.done in self.waiting and (wait or self.grades is None or self.grades.ready(self.done)):
            grade = self.grades.take(self.done) if self.grades is not None else None
            self.writer.write(self.schedule[self.done][0], self.waiting.pop(self.done), grade)
            self.done += 1
            self.unwritten += 1

    def _round(self, tokens: int) -> None:
        self.new_tokens += tokens
        self.progress.tokens(tokens)
        if self.grades is not None:
            self._write_ready(wait=False)
        if self.unwritten:
            self._commit()
        if self.stop.is_set():
            raise Interrupted

    def _commit(self) -> None:
        self.writer.commit()
        self.progress.samples(self.unwritten)
        self.unwritten, self.committed = 0, self.done
        self._record(self.done, "running")

    def _record(self, done: int, status: str) -> None:
        self.seconds = time.perf_counter() - self.started
        _record_session(self.meta, self.session, done, self.new_tokens, self.seconds, status, self.stats, self.engine.slots)
        if self.grades is not None:
            self.session["grades"] = self.grades.record()
        self.writer.write_meta(self.meta)


def _record_session(meta: dict, session: dict, done: int, tokens: int, seconds: float, status: str, stats: StreamStats, slots: int) -> None:
    meta["status"] = status
    meta["counts"]["done"] = done
    session.update(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        done=done,
        new_tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        slot_utilisation=round(stats.utilisation(slots), 4),
        rounds=stats.rounds,
        prefills=stats.prefills,
        prompts_prefilled=stats.prompts_prefilled,
    )
    if meta["config"]["draft_k"]:
        session["speculative"] = stats.speculative()
