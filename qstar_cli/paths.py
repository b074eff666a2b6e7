"""What a command-line path names, and whether a command may write there.

Every check raises :class:`QstarInputError` with a one-line message naming the flag and the path,
so that a mistake is reported before any model loads and before any file is touched.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from qstar_cli.errors import QstarInputError

#: The model spec that names the offline demo model (SmolLM2-135M-Instruct, shipped by a package).
DEMO = "demo"


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` is spelled as a hub repository id (``name`` or ``owner/name``)."""
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


#: Suffixes of files, never of a hub id: a missing ``data/problems.txt`` is a missing file, not a
#: repository to look up on the hub (for half a minute).
FILE_SUFFIXES = frozenset(".txt .json .jsonl .csv .tsv .parquet .arrow .gguf .safetensors .bin .pt .pth .py .yaml .yml .jinja .j2".split())


def names_local_path(spec: str) -> bool:
    """Whether ``spec`` names a local path rather than a hub id: it exists, has a file's suffix, is not
    spelled as a hub id, or its first part is a local directory (``data/x`` with ``data/`` here)."""
    path = Path(spec).expanduser()
    return (
        path.exists()
        or path.suffix.lower() in FILE_SUFFIXES
        or not is_hub_id(spec)
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


def local_path(spec: str) -> Path | None:
    """The absolute path ``spec`` names if it exists on this machine, else ``None`` (a hub id).

    ``./data/x.jsonl``, ``data/x.jsonl``, its absolute path and ``data/x/`` for a directory all give
    the same path, so resumed runs compare inputs, not their spellings.
    """
    path = Path(spec).expanduser()
    return path.resolve() if path.exists() else None


def resolved_spec(spec: str | None) -> str | None:
    """``spec`` as an absolute path when it names a local file or directory; hub ids as spelled."""
    if spec is None:
        return None
    path = local_path(spec)
    return str(path) if path is not None else spec


def check_output_file(path: Path, flag: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse a file path that cannot be written, or whose writing would replace one of ``inputs``.

    An input directory (a model, a ``save_to_disk`` dataset) protects everything inside it.
    """
    if str(path) in ("", "."):
        raise QstarInputError(f"{flag} is empty; give a file path")
    if path.is_dir():
        raise QstarInputError(f"{flag} {path} is a directory; give a file path")
    _check_parents(path, flag)
    target = path.resolve()
    for source in inputs:
        if target == source or source in target.parents:
            raise QstarInputError(f"{flag} {path} would overwrite the input {source}; choose another path")


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse a directory path that is a file, lies under one, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise QstarInputError(f"{flag} {path} is a file, not a directory")
    _check_parents(path, flag)
    _check_directory_writable(path, f"{flag} {path}")


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QstarInputError(f"{flag} {path}: {parent} is a file, not a directory")
            return


def missing_parents(path: Path) -> list[Path]:
    """The directories above ``path`` that do not exist yet, the deepest first."""
    return [parent for parent in path.parents if not parent.exists()]


def remove_empty(directories: Iterable[Path]) -> None:
    """Remove each of ``directories`` (deepest first) that is empty: what a command created and left unused."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a file that cannot be written: an existing one opened for appending
    (which changes nothing: an immutable or read-only file fails), a new one by creating a scratch
    file in its directory (the directories created for it removed again)."""
    if path.exists():
        try:
            path.open("ab").close()
        except OSError as err:
            raise QstarInputError(f"{flag} {path} cannot be written: {err.strerror}") from err
    else:
        _check_directory_writable(path.parent, f"{flag} {path}")


def _check_directory_writable(directory: Path, what: str) -> None:
    """Create a scratch file in ``directory`` (and the directories it needs, removed again after)."""
    created = missing_parents(directory / "_")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise QstarInputError(f"{what} cannot be written: {err.strerror}") from err
    finally:
        remove_empty(created)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (a user's grader or adapter: small files, read whole)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
