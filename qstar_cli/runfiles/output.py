"""How every command writes a file: what it may not write over, its lock, and the temporary it writes.

No command writes over a run's files (main, sidecar, manifest, lock; a shard's too), a file under a
held lock, its own input, or user code in use (a grader, an adapter): :func:`check_output` refuses
them in one line, before any work. A file is written (:func:`atomic_output`) under its lock, the
lock of the run it belongs to (``OUT.jsonl.lock`` for ``OUT.jsonl``, its sidecar and its manifest;
``FILE.lock`` for any other file), so a second writer is refused; into a temporary in its folder;
and renamed over it once complete and durable. The temporary has no name where the file system
makes unnamed files (``O_TMPFILE``: Linux's ext4, xfs, btrfs, tmpfs), so a kill leaves nothing
behind; elsewhere it is ``.FILE.<pid>.partial``, and the next writer of ``FILE`` removes what a
killed one left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import filelock

from qstar_cli.errors import QstarInputError
from qstar_cli.paths import check_output_file, check_writable, missing_parents, remove_empty
from qstar_cli.runfiles.format import LOCK_SUFFIX, META_SUFFIX, SIDECAR_SUFFIX, OutputPaths

PARTIAL_SUFFIX = ".partial"


class OutputBusy(QstarInputError):
    """Another process holds the output's lock."""


def lock_held(lock: Path) -> bool:
    """Whether a process holds ``lock`` now (a ``flock``, as :class:`OutputLock` takes it); the file is
    never created. A lock that cannot be opened is not held: nothing could write under it."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases what it took
    return False


class OutputLock:
    """The lock of ``path`` (that of the run it belongs to), held while it is written."""

    def __init__(self, path: Path):
        self.path = OutputPaths.of(Path(path)).lock
        self._lock = filelock.FileLock(self.path, timeout=0)

    def acquire(self, busy: str) -> None:
        """Take the lock; held by another process, refused with ``busy`` (one line)."""
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise OutputBusy(busy) from None

    def release(self) -> None:
        if self._lock.is_locked:
            # Removed while held: a process that opened it meanwhile finds it unlinked and makes a new one.
            self.path.unlink(missing_ok=True)
            self._lock.release()


def run_file_kind(path: Path) -> str | None:
    """What file of a run ``path`` is (``the sidecar``, ``the manifest``, ``the lock``, ``the main
    file``), or None: a sidecar, manifest or lock by its name, a main file by the sidecar or manifest
    beside it."""
    name = path.name
    for suffix, kind in ((SIDECAR_SUFFIX, "the sidecar"), (META_SUFFIX, "the manifest"), (LOCK_SUFFIX, "the lock")):
        if name.endswith(suffix):
            return kind
    run = OutputPaths(path)
    return "the main file" if path.suffix == ".jsonl" and (run.meta.exists() or run.diagnostics.exists()) else None


def check_output(path: Path, flag: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse, in one line naming ``flag``, an output ``path`` that cannot be written or that is one of
    a run's files, under a held lock, or one of ``inputs`` (the command's input files and the user
    code it runs) or inside one of them."""
    check_output_file(path, flag, [Path(p).resolve() for p in inputs])
    kind = run_file_kind(path)
    if kind is not None:
        run = OutputPaths.of(path).main
        raise QstarInputError(f"{flag} {path} is {kind} of the run {run}; only generate writes a run's files: choose another path")
    lock = OutputPaths.of(path).lock
    if lock_held(lock):
        raise OutputBusy(f"{flag} {path} is being written by another qstar process (lock {lock}); wait for it or choose another path")
    check_writable(path, flag)


@contextlib.contextmanager
def atomic_output(path: Path, locked: bool = False, sync: bool = True) -> Iterator[BinaryIO]:
    """A binary file whose bytes replace ``path`` when the block ends, or vanish if it raises: ``path``
    is never seen half written. The output's lock is taken for the block, and what a killed writer
    left is removed, unless ``locked`` (the caller holds the lock: a run's writer). ``sync``: the bytes
    are on disk before the rename (not for a manifest rewritten at every commit, whose data files
    were synced before it)."""
    path = Path(path)
    created = missing_parents(path)  # made for the output, removed again if it is not written
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(path)
    if not locked:
        lock.acquire(f"{path} is being written by another qstar process (lock {lock.path}); wait for it or choose another path")
        _remove_partials(path)
    try:
        fd, named = _temporary(path)
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
                yield out
            if sync:
                os.fsync(fd)
            if named is None:  # an unnamed file: given a name in the output's folder, then renamed over the output
                named = _partial(path)
                folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:  # linkat through the descriptor's /proc link (AT_SYMLINK_FOLLOW): how an O_TMPFILE file gets a name
                    os.link(f"/proc/self/fd/{fd}", named.name, dst_dir_fd=folder, follow_symlinks=True)
                finally:
                    os.close(folder)
            os.replace(named, path)
        except BaseException:
            if named is not None:
                named.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
    finally:
        lock.release()
        remove_empty(created)


def _temporary(path: Path) -> tuple[int, Path | None]:
    """A file open for writing in ``path``'s folder: unnamed where the file system allows, else named."""
    with contextlib.suppress(AttributeError, OSError):  # no O_TMPFILE on this system or file system
        return os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666), None
    named = _partial(path)
    return os.open(named, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), named


def _partial(path: Path) -> Path:
    """The name of this process's temporary of ``path`` (the lock is held: no other writes one)."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def _remove_partials(path: Path) -> None:
    """Remove the named temporaries of ``path`` that a killed writer left (the lock is held: no one else writes them)."""
    for partial in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        if partial.name.removeprefix(f".{path.name}.").removesuffix(PARTIAL_SUFFIX).isdigit():
            partial.unlink(missing_ok=True)
