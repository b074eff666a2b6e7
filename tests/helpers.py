"""Helpers shared by test modules (fixtures live in ``conftest.py``)."""

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from qstar_cli.cli import app


def invoke(*args):
    """``qstar ARGS`` in this process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments, code: int = 2) -> str:
    """The command failed with ``code`` and one ``error:`` line on stderr holding every fragment, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def snapshot(*roots):
    """Every file under ``roots`` and a hash of its bytes; lock files (they stay by design) and
    Python's bytecode caches (of user adapters) aside."""
    files = (p for root in roots for p in Path(root).rglob("*") if p.is_file() and p.suffix not in (".lock", ".pyc"))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_files(out) -> list[Path]:
    """The main file, sidecar and manifest of the run ``out``."""
    stem = str(out).removesuffix(".jsonl")
    return [Path(out), Path(f"{stem}.diagnostics.jsonl"), Path(f"{stem}.meta.json")]
