"""The schedule of a run: the usable prompts encoded for both models, their fingerprint, and the
split into shards.

The schedule is the usable rows in row order, each ``samples_per_prompt`` times (row-major: row 0's
responses, then row 1's ...). A shard takes whole prompts (:func:`shard_positions`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import orjson

from qstar_cli.errors import QstarInputError
from qstar_cli.generate.adapters import AdaptedDataset, Prompt
from qstar_cli.generate.config import GenerateConfig
from qstar_cli.runfiles.writer import CheckpointedWriter, ResumeError

if TYPE_CHECKING:
    from qstar_cli.engine.sampler import DualModelSampler

Schedule = list[tuple[Prompt, tuple[list[int], list[int]]]]


def encode_all(sampler: DualModelSampler, adapted: AdaptedDataset) -> Schedule:
    """Each usable prompt with its ids for both models; a prompt that a template rejects, that renders
    to no tokens, or that leaves a model's context no room for a response, is skipped and counted."""
    encoded = []
    for prompt in adapted.prompts:
        try:
            ids = sampler.encode_prompts(prompt.messages)
        except jinja2.TemplateError as err:
            adapted.skipped[f"prompt format error: {err}"] += 1
            continue
        empty = [name for name, prompt_ids in zip(("pi_theta", "pi_t"), ids) if not prompt_ids]
        if empty:  # a model cannot predict a first token from nothing
            adapted.skipped[f"prompt renders to no tokens for {' and '.join(empty)}"] += 1
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


#: Host memory one sample of the schedule takes before it is sampled: its entry, its key and its prompt
#: ids as the writer checks them took 177 bytes under tracemalloc; this bound leaves room for the rest.
SCHEDULE_BYTES_PER_SAMPLE = 512


def check_schedule_fits(samples: int, rows: int, samples_per_prompt: int, available: int) -> None:
    """Refuse a schedule whose bookkeeping alone would not fit the ``available`` host memory."""
    needed = samples * SCHEDULE_BYTES_PER_SAMPLE
    if needed > available:
        raise QstarInputError(
            f"{rows} usable rows x --samples-per-prompt {samples_per_prompt} = {samples} samples: their schedule alone needs "
            f"{needed / 2**30:.3g} GiB, and {available / 2**30:.3g} GiB of memory is available; "
            "take fewer (--num-samples, --samples-per-prompt) or split the run (--num-shards)"
        )


def nothing_usable(adapted: AdaptedDataset) -> QstarInputError:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(adapted.skipped.items()))
    return QstarInputError(f"no usable prompt in the {adapted.rows} rows taken: skipped {reasons}")


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


def continued_prompt_ids(writer: CheckpointedWriter, schedule: Schedule, overwrite: bool) -> dict[str, Any]:
    """The prompt ids fingerprint to compare with the run being continued: over as many samples as
    that run's schedule had, since ``--num-samples`` (or rows added to the dataset) may grow it."""
    previous = None if overwrite else writer.previous_meta()
    old = (previous or {}).get("fingerprint_config", {}).get("prompt_ids")
    if not isinstance(old, dict) or not isinstance(old.get("samples"), int):
        return prompt_ids_fingerprint(schedule)
    if old["samples"] > len(schedule):
        raise ResumeError(
            f"{writer.paths.main} was made with a schedule of {old['samples']} prompts and this run has {len(schedule)}; "
            "a resumed schedule may grow (--num-samples, rows added), not shrink; add --overwrite to start afresh"
        )
    return prompt_ids_fingerprint(schedule, old["samples"])
