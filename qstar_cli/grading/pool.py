"""Grading off the decode path: worker processes, a wall-clock limit per sample, results by key.

math-verify runs sympy, which can take tens of milliseconds or hang on an adversarial expression, and
its own time limits use signals, which work only in a main thread. So every grade is computed in a
worker process of a :class:`pebble.ProcessPool`: a sample past its limit is ``correct: null``
(reason ``timeout``) and its worker is killed and replaced, so a hung grade costs one worker for at
most the limit. Workers are forked from a fork server (not from the process that holds the models)
and load the grader once, before the first sample.

The caller submits a sample when it finishes and takes its grade when it commits it: ``generate``
writes samples in schedule order and only those whose grades are :meth:`GradingPool.ready`, so the
models never wait on a grade; only the end of a run waits for the last ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pebble

from qstar_cli.grading.graders import (
    DEFAULT_ANSWER_FIELD,
    DEFAULT_TIMEOUT,
    DEFAULT_WORKERS,
    GRADERS,
    METADATA_PREFIX,
    TIMEOUT,
    WORKER_DIED,
    Grade,
    GraderSpec,
    failed,
    grade,
    missing_reference,
    resolve_grader,
    start_worker,
    warm_up,
)  # fmt: skip


class GradingPool:
    """``workers`` processes grading with ``spec``, each sample within ``timeout`` seconds of its start."""

    def __init__(self, spec: GraderSpec, workers: int = DEFAULT_WORKERS, timeout: float = DEFAULT_TIMEOUT):
        self.spec, self.timeout = spec, timeout
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["qstar_cli.grading.forkserver"])
        self._pool = pebble.ProcessPool(max_workers=workers, initializer=start_worker, initargs=(spec,), context=context)
        self._futures: dict[Any, pebble.ProcessFuture] = {}
        # Start the workers now (a pool starts them with its first task): they load the grader while the models load.
        self._pool.schedule(warm_up, (spec,))
        self.counts: Counter[str] = Counter()  # graded, correct, and each failure reason

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (a hung one too); grades not taken are dropped."""
        self._pool.stop()
        self._pool.join()

    def submit(self, key: Any, response: str, row: dict[str, Any], finish_reason: str | None = None) -> None:
        self._futures[key] = self._pool.schedule(grade, (self.spec, response, row, finish_reason), timeout=self.timeout)

    def ready(self, key: Any) -> bool:
        return self._futures[key].done()

    def take(self, key: Any) -> Grade:
        """The grade of ``key``, waiting for it if it is not ready (at most its limit once it runs)."""
        future = self._futures.pop(key)
        try:
            result = future.result()
        except FutureTimeout:
            result = failed(TIMEOUT)
        except pebble.ProcessExpired:  # the worker crashed (out of memory, a segfault in the grader)
            result = failed(WORKER_DIED)
        self.counts["graded"] += result["correct"] is not None
        self.counts["correct"] += result["correct"] is True
        self.counts["truncated"] += result.get("reason") == "truncated"
        if result["correct"] is None:
            self.counts[f"failed: {result['failure']}"] += 1
        return result

    def record(self) -> dict[str, Any]:
        """What a manifest's session says of the grades taken: counts (the graded wrong because
        truncated among them), failures by reason."""
        failures = {k.removeprefix("failed: "): n for k, n in sorted(self.counts.items()) if k.startswith("failed: ")}
        record = {"grader": self.spec.name, "graded": self.counts["graded"], "correct": self.counts["correct"], "failed": failures}
        return {**record, **({"truncated": self.counts["truncated"]} if self.counts["truncated"] else {})}


def run_grader(config: Any, adapter: Any, prompts: list) -> tuple[Any, GraderSpec | None]:
    """The grading of a ``generate`` run, checked before the models load: ``config`` with its grader
    and answer column resolved (``math`` where the adapter names an answer column, else ``none``),
    and the grader (None: ungraded). A reference column that no usable row keeps is refused, listing
    the columns there are."""
    name = config.grader or ("math" if adapter.answer_field else "none")
    answer_field = config.answer_field or adapter.answer_field or DEFAULT_ANSWER_FIELD
    spec = resolve_grader(name, answer_field, config.grade_truncated)
    reference = f"{METADATA_PREFIX}{answer_field}"
    if name in GRADERS and GRADERS[name].needs_reference and not any(reference in p.metadata for p in prompts):
        columns = {k.removeprefix(METADATA_PREFIX) for p in prompts for k in p.metadata}
        raise missing_reference(answer_field, "the dataset (or its adapter, as the prompt)", list(columns))
    return dataclasses.replace(config, grader=name, answer_field=answer_field), spec


@contextlib.contextmanager
def grading_pool(spec: GraderSpec | None, workers: int, timeout: float) -> Iterator[GradingPool | None]:
    """A started pool for ``spec``, or None for an ungraded run."""
    if spec is None:
        yield None
        return
    with GradingPool(spec, workers, timeout) as pool:
        yield pool
