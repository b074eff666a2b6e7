"""``qstar grade``: its options and output. :mod:`qstar_cli.cli` registers it, handing it the command
line's one-line errors and progress bar (so that this module does not import the command line)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import typer

from qstar_cli.grading.graders import DEFAULT_ANSWER_FIELD, DEFAULT_TIMEOUT, DEFAULT_WORKERS


def grade_command(one_line_errors: Callable[[], AbstractContextManager], progress_bar: Callable[[], AbstractContextManager]) -> Callable:
    """The ``grade`` command, reporting failures through ``one_line_errors`` and progress through ``progress_bar``."""

    def grade(
        file: Path = typer.Argument(
            ..., help="A chat JSONL: each line's OpenAI messages end with the response; original_<field> holds the reference."
        ),
        output: Path = typer.Option(..., help="The graded JSONL to write: each line as it was, with grade added."),
        grader: str = typer.Option(
            "math", help="math (HF math-verify), exact (normalised text) or FILE.py:FUNCTION (response, row) -> bool or score in [0, 1]."
        ),
        answer_field: str = typer.Option(DEFAULT_ANSWER_FIELD, help="The reference column, as original_<field> in the lines."),
        grader_timeout: float = typer.Option(
            DEFAULT_TIMEOUT, help="Seconds one response's grade may take; past it the line is ungraded (correct: null)."
        ),
        grader_workers: int = typer.Option(DEFAULT_WORKERS, help="Worker processes that grade."),
    ) -> None:
        """Grade any chat JSONL (a run made without a grader, a merged run, another tool's output) into a new file."""
        from qstar_cli.grading.regrade import grade_file

        with one_line_errors(), progress_bar() as progress:
            summary = grade_file(file, output, grader, answer_field, grader_timeout, grader_workers, progress)
        typer.echo(summary.describe())

    return grade
