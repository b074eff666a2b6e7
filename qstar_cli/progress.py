"""What long commands show as they go: ``generate``'s samples, tokens/s and ETA, ``export``'s passes.

On a terminal ``generate`` draws a bar; elsewhere (a pipe, a log file) it writes the samples done,
tokens/s and the ETA as a line on standard output at each commit, and on standard error at least
every :data:`PLAIN_INTERVAL` seconds (``QSTAR_PROGRESS_SECONDS`` sets another), with how long it has
been preparing before the first sample: a sign of life while models load and a first long batch decodes.
Progress never ends a run: a closed standard output (``qstar generate ... | head``) stops a run as
Ctrl-C does, its samples saved (:class:`StdoutConsole`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StdoutConsole(Console):
    """Rich's console on standard output, except when its reader goes away (``qstar generate ... |
    head``): rich would end the process (SystemExit 1, the run's state unrecorded); here what follows
    goes to /dev/null and ``closed`` is set, so a run stops as after Ctrl-C, its samples saved."""

    def __init__(self, closed: threading.Event, **kwargs):
        super().__init__(**kwargs)
        self.closed = closed

    def on_broken_pipe(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        self.closed.set()


#: Seconds between the plain progress lines written without a terminal.
PLAIN_INTERVAL = 30.0


def plain_interval() -> float:
    """:data:`PLAIN_INTERVAL`, or the positive number of seconds ``QSTAR_PROGRESS_SECONDS`` gives."""
    try:
        seconds = float(os.environ.get("QSTAR_PROGRESS_SECONDS", PLAIN_INTERVAL))
    except ValueError:
        return PLAIN_INTERVAL
    return seconds if seconds > 0 else PLAIN_INTERVAL


class GenerateProgress:
    """Samples, tokens/s and ETA: a rich bar on a terminal; elsewhere a line on standard error every
    ``interval`` seconds, from a thread of its own (so it comes while models load and a first long
    batch decodes). A closed standard output sets ``stop`` (see :class:`StdoutConsole`)."""

    def __init__(self, stop: threading.Event, interval: float | None = None):
        self.stdout_closed = threading.Event()
        self.console = StdoutConsole(self.stdout_closed)
        self.stop = stop
        self.live = self.console.is_terminal
        self.interval = interval or plain_interval()
        self._ended = threading.Event()
        self.bar = Progress(
            TextColumn("[bold]generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("samples  {task.fields[rate]:>8.1f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self.task = None
        self.total = self.done = self.resumed = self.new_tokens = 0
        self.started = self.began = time.perf_counter()

    def __enter__(self) -> GenerateProgress:
        self.bar.__enter__()
        if not self.live:
            threading.Thread(target=self._plain_lines, name="qstar-progress", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._ended.set()
        self.bar.__exit__(*exc)

    def _plain_lines(self) -> None:
        while not self._ended.wait(self.interval):
            print(self.status(), file=sys.stderr, flush=True)

    def status(self) -> str:
        """The plain progress line: samples, tokens/s and ETA once sampling started, else the time spent preparing."""
        if self.task is None:
            return f"progress: preparing the run (loading models, data and files) for {time.perf_counter() - self.began:.0f} s"
        elapsed = time.perf_counter() - self.started
        new = self.done - self.resumed
        eta = f"{(self.total - self.done) * elapsed / new:.0f} s" if new else "unknown until a sample is done"
        return f"progress: {self.done}/{self.total} samples, {self.rate():.1f} tok/s, ETA {eta}"

    def print(self, text: str, **kwargs) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, **kwargs)
        if self.stdout_closed.is_set():
            self.stop.set()

    def rate(self) -> float:
        return self.new_tokens / max(time.perf_counter() - self.started, 1e-9)

    def message(self, text: str) -> None:
        self.print(text, style="dim")

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.resumed, self.started = total, done, done, time.perf_counter()
        self.task = self.bar.add_task("generate", total=total, completed=done, rate=0.0)
        if done:
            self.print(f"resuming: {done} of {total} samples already done")

    def tokens(self, count: int) -> None:
        self.new_tokens += count
        self.bar.update(self.task, rate=self.rate())

    def samples(self, count: int) -> None:
        self.done += count
        self.bar.update(self.task, advance=count, rate=self.rate())
        if not self.live:  # on standard output too, where a closed pipe (| head) is noticed at once
            self.print(self.status())


class ExportProgress:
    """The two passes of ``export`` as rich bars over the bytes read (on a terminal only)."""

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ExportProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=done)
