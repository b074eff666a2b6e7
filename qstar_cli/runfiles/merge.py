"""``qstar merge``: the shards of one run joined into that run's files, in schedule order, streamed.

``generate --num-shards N --shard-index I --output OUT.jsonl`` writes ``OUT-0000I-of-0000N.jsonl``
with its own sidecar and manifest. Merging checks that all N shards are there, complete, and made
with one configuration (one fingerprint, one schedule), then interleaves their lines by
``(sample_idx, response_idx)``: the schedule is the usable rows in row order, each with its K
responses, a shard takes whole rows and keeps them in that order, so a k-way merge restores it while holding one line per shard. Lines are copied byte
for byte; the main file and sidecar equal one process's up to float rounding (the same, bit for bit,
where one process would have computed each sample in a batch of its own too).

The merged manifest has the run's fingerprint (the shard settings are not part of it), so
``generate`` on ``OUT.jsonl`` with the same settings finds the run complete; it sums the shards'
counts and keeps each shard's manifest, run history included, under ``shards``.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

import qstar_cli
from qstar_cli.errors import QstarInputError
from qstar_cli.runfiles.format import FORMAT_VERSION, format_version, read_manifest
from qstar_cli.runfiles.output import atomic_output, lock_held
from qstar_cli.runfiles.writer import DIAGNOSTICS_LEVELS, CheckpointedWriter, OutputPaths, config_differences

#: A sidecar line's first keys (their order is fixed): format_version in the lines that have it, the sample, the response.
_SIDECAR_KEY = re.compile(rb'\{(?:"format_version":(\d+),)?"sample_idx":(\d+),"response_idx":(\d+)')


#: What merging reads of each shard's manifest.
MERGED_FIELDS = ("fingerprint", "fingerprint_config", "config", "counts", "shard", "status", "device", "dtype", "versions")


class MergeError(QstarInputError):
    """A shard is missing, incomplete or foreign, or the output holds another run."""


@dataclass
class MergeSummary:
    paths: OutputPaths
    shards: int
    samples: int


def find_shards(output: OutputPaths) -> list[OutputPaths]:
    """The files of every shard of ``output`` (N read from the shard names beside it), in index order."""
    suffix = ".jsonl" if output.main.suffix == ".jsonl" else ""
    name = re.compile(re.escape(output.stem.name) + r"-(\d{5,})-of-(\d{5,})" + re.escape(suffix))
    parent = output.main.parent
    counts = sorted({int(m.group(2)) for p in (parent.iterdir() if parent.is_dir() else ()) if (m := name.fullmatch(p.name))})
    if not counts:
        raise MergeError(
            f"no shards of {output.main} found: generate --output {output.main} --num-shards N --shard-index I "
            f"writes them as {output.shard(0, 3).main.name} ..."
        )
    if len(counts) > 1:
        raise MergeError(
            f"shards of {output.main} from runs of {' and '.join(map(str, counts))} shards lie beside it; move the foreign ones away"
        )
    return [output.shard(index, counts[0]) for index in range(counts[0])]


def check_shards(shards: list[OutputPaths]) -> list[dict[str, Any]]:
    """The shards' manifests, once every shard is there, complete and part of one run."""
    metas = []
    for index, shard in enumerate(shards):
        if not shard.main.exists():
            raise MergeError(f"shard {shard.main} is missing: run generate with --num-shards {len(shards)} --shard-index {index}")
        if not shard.meta.exists():
            raise MergeError(f"shard {shard.main} has no manifest {shard.meta.name}: it was not written by qstar generate")
        hint = f"re-run that shard's generate command to rewrite it, or restore {shard.meta.name}"
        metas.append(read_manifest(shard.meta, MERGED_FIELDS, hint, MergeError))
        if metas[-1]["fingerprint_config"].get("diagnostics") != "none" and not shard.diagnostics.is_file():
            raise MergeError(
                f"shard {shard.main} has no sidecar {shard.diagnostics.name}: restore it (or regenerate the shard with --overwrite)"
            )
    # The run is what most shards say it is; a shard that says otherwise is the foreign one.
    run_fingerprint = Counter(m.get("fingerprint") for m in metas).most_common(1)[0][0]
    reference = next(m for m in metas if m.get("fingerprint") == run_fingerprint)
    schedule = Counter(m["shard"].get("schedule_samples") for m in metas).most_common(1)[0][0]
    split = Counter(m["shard"].get("split") for m in metas).most_common(1)[0][0]
    for index, (shard, meta) in enumerate(zip(shards, metas)):
        if meta.get("fingerprint") != run_fingerprint:
            changed = ", ".join(
                config_differences(reference.get("fingerprint_config", {}), meta.get("fingerprint_config", {}), either=True)
            )
            raise MergeError(f"shard {shard.main} was made with another configuration than the other shards: {changed}")
        expected = {"index": index, "count": len(shards), "schedule_samples": schedule, **({"split": split} if split else {})}
        if meta.get("shard") != expected:
            raise MergeError(f"shard {shard.main} belongs to another split: its manifest says {meta.get('shard')}, not {expected}")
        weights = meta.get("weights_sha256"), reference.get("weights_sha256")
        if all(isinstance(w, dict) for w in weights) and weights[0] != weights[1]:
            changed = sorted(name for name in set(weights[0]) & set(weights[1]) if weights[0][name] != weights[1][name])
            raise MergeError(
                f"shard {shard.main} was made with other weights than the other shards (of {', '.join(changed) or 'its models'})"
            )
        counts = meta["counts"]
        if meta.get("status") != "complete" or counts["done"] != counts["samples"]:
            fix = "wait for it to finish" if lock_held(shard.lock) else "re-run its generate command to finish it"
            raise MergeError(f"shard {shard.main} is incomplete ({counts['done']} of {counts['samples']} samples): {fix}")
    if sum(m["counts"]["samples"] for m in metas) != schedule:
        raise MergeError(f"the shards of {len(shards)} hold {sum(m['counts']['samples'] for m in metas)} samples, not the run's {schedule}")
    return metas


def _shard_lines(shard: OutputPaths, index: int, samples: int, sidecar: bool) -> Iterator[tuple[tuple[int, int], int, bytes, bytes | None]]:
    """``((sample_idx, response_idx), shard index, main line, sidecar line)`` of one shard, checking the two files agree."""
    with ExitStack() as files:
        main = files.enter_context(shard.main.open("rb"))
        side = files.enter_context(shard.diagnostics.open("rb")) if sidecar else None
        count = 0
        for line in main:
            sample_idx = _main_idx(line)
            side_line = next(side, b"") if side is not None else None
            paired = side is None or (
                side_line.endswith(b"\n") and _sidecar_idx(side_line, f"{shard.diagnostics} line {count + 1}") == sample_idx
            )
            if sample_idx is None or not paired:
                raise MergeError(
                    f"shard {shard.main} line {count + 1} is torn, deleted or edited, or its sidecar does not match: re-run its generate "
                    "command, which repairs what a crash tore and names what it cannot repair"
                )
            count += 1
            yield sample_idx, index, line, side_line
        if count != samples or (side is not None and next(side, None) is not None):
            raise MergeError(f"shard {shard.main} holds {count} samples, its manifest {samples}; re-run its generate command to repair it")


def _main_idx(line: bytes) -> tuple[int, int] | None:
    try:
        record = orjson.loads(line) if line.endswith(b"\n") else None
        return None if record is None else (record["sample_idx"], record["response_idx"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _sidecar_idx(line: bytes, where: str) -> tuple[int, int] | None:
    """``(sample_idx, response_idx)`` of a sidecar line (``where`` names it), read from its first keys
    without parsing the line; None where they are not there. A line of a newer format is refused."""
    found = _SIDECAR_KEY.match(line)
    if found is None or (found.group(1) and format_version({"format_version": int(found.group(1))}, where) is None):
        return None
    return int(found.group(2)), int(found.group(3))


def merge_shards(output: Path) -> MergeSummary:
    """Write ``output``, its sidecar and manifest from the shards of ``output``."""
    paths = OutputPaths(Path(output))
    shards = find_shards(paths)
    metas = check_shards(shards)
    level = metas[0]["fingerprint_config"].get("diagnostics")
    if level not in DIAGNOSTICS_LEVELS:
        raise MergeError(f"the manifest {shards[0].meta} is damaged (diagnostics level {level!r}); re-run that shard's generate command")
    with CheckpointedWriter(paths.main, level) as writer:
        previous = writer.previous_meta()
        if (previous is None and paths.main.exists()) or (previous is not None and previous.get("fingerprint") != metas[0]["fingerprint"]):
            raise MergeError(f"{paths.main} exists and holds another run; move it away to merge its shards there")
        _write_merged(shards, metas, writer.data_files, paths.meta)
        writer.write_meta(_merged_meta(paths, shards, metas))
    return MergeSummary(paths, len(shards), sum(m["counts"]["done"] for m in metas))


def _write_merged(shards: list[OutputPaths], metas: list[dict[str, Any]], outputs: list[Path], meta: Path) -> None:
    """The shards' lines, interleaved in schedule order, into ``outputs`` (main file, and sidecar but at
    level none), each replaced once complete (the caller holds the run's lock); the manifest ``meta``
    removed before the renames."""
    sidecar = len(outputs) > 1
    streams = [_shard_lines(s, i, m["counts"]["samples"], sidecar) for i, (s, m) in enumerate(zip(shards, metas))]
    with ExitStack() as files:
        outs = [files.enter_context(atomic_output(p, locked=True)) for p in outputs]
        last = (-1, -1)
        for key, index, main_line, side_line in heapq.merge(*streams, key=lambda line: line[0]):
            if key <= last:
                raise MergeError(f"shard {shards[index].main} holds sample {key[0]} response {key[1]}, which another shard holds too")
            last = key
            for out, line in zip(outs, (main_line, side_line)):
                out.write(line)
        # Without a manifest, a crash between the two files' renames leaves files that generate refuses and merge redoes.
        meta.unlink(missing_ok=True)


def _merged_meta(paths: OutputPaths, shards: list[OutputPaths], metas: list[dict[str, Any]]) -> dict[str, Any]:
    first = metas[0]
    config = {**first["config"], "output": str(paths.main)}
    config.pop("shard_index", None)
    return {
        "format_version": FORMAT_VERSION,
        "qstar_version": qstar_cli.__version__,
        "status": "complete",
        "fingerprint": first["fingerprint"],
        "fingerprint_config": first["fingerprint_config"],
        "config": config,
        "device": ", ".join(sorted({m["device"] for m in metas})),
        "dtype": ", ".join(sorted({m["dtype"] for m in metas})),
        "versions": first["versions"],
        "weights_sha256": first.get("weights_sha256"),
        # Every shard reads the whole dataset: rows and skipped rows are the run's, not to be summed.
        "counts": {
            "rows": first["counts"]["rows"],
            "samples": sum(m["counts"]["samples"] for m in metas),
            "done": sum(m["counts"]["done"] for m in metas),
            "skipped": first["counts"]["skipped"],
        },
        "merged": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sessions": [],
        "shards": [{"file": s.main.name, **m} for s, m in zip(shards, metas)],
    }
