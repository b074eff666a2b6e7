"""``qstar grade``: its options and output. :mod:`qstar_cli.cli` registers it, handing it the command
line's one-line errors and progress bar (so that this module does not import the command line)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import typer

from qstar_cli.grading.graders import DEFAULT_ANSWER_FIELD, DEFAULT_TIMEOUT, DEFAULT_WORKERS, grader_help


def grade_command(one_line_errors: Callable[[], AbstractContextManager], progress_bar: Callable[[], AbstractContextManager]) -> Callable:
    """The ``grade`` command, reporting failures through ``one_line_errors`` and progress through ``progress_bar``."""

    def grade(
        file: Path = typer.Argument(
            ..., help="A chat JSONL: each line's OpenAI messages end with the response; original_<field> holds the reference."
        ),
        output: Path = typer.Option(None, help="The graded JSONL to write: each line as it was, with grade added."),
        in_place: bool = typer.Option(
            False, "--in-place", metavar="", help="Write the grades into the run FILE itself (its manifest records the grader)."
        ),
        grader: str = typer.Option("math", help=f"{grader_help()}."),
        answer_field: str = typer.Option(DEFAULT_ANSWER_FIELD, help="The reference column, as original_<field> in the lines."),
        grader_timeout: float = typer.Option(
            DEFAULT_TIMEOUT, help="Seconds one response's grade may take; past it the line is ungraded (correct: null)."
        ),
        grader_workers: int = typer.Option(DEFAULT_WORKERS, help="Worker processes that grade."),
        grade_truncated: bool = typer.Option(
            False,
            "--grade-truncated",
            metavar="",
            help="Grade responses cut off by the token budget (finish_reason length) as any other; by default they are wrong.",
        ),
    ) -> None:
        """Grade any chat JSONL (a run made without a grader, a merged run, another tool's output) into a new file, or a run in place."""
        from qstar_cli.grading.regrade import GradeRequest, grade_file

        with one_line_errors(), progress_bar() as progress:
            request = GradeRequest(file, output, grader, answer_field, grader_timeout, grader_workers, grade_truncated, in_place)
            summary = grade_file(request, progress)
        typer.echo(summary.describe())

    return grade
