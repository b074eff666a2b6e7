"""Graders: a response and its dataset row in, a grade out; the built-in ones by name in :data:`GRADERS`.

A grade is ``{"correct": true|false|null, "score": float|null, "extracted": str|null}``; a grader
that fails on a sample (raises, returns something that is no grade, runs out of time) gives
``correct: null`` and a ``failure`` reason that analyses count. A response cut off by its token
budget (``finish_reason`` ``length``) has no final answer: it is graded wrong with ``reason``
``truncated`` unless the grader is asked to grade truncated responses too. A grade is a pure
function of the response, its finish reason and the row, so a resumed run writes the grades an
uninterrupted one would.

* ``math``: HF ``math-verify``. The reference is parsed from the answer column as datasets hold it
  (DeepScaleR's bare LaTeX ``\\frac{\\pi}{4}``, GSM8K's ``... #### 42``); the response's answer is
  found by math-verify's extraction order (``\\boxed{}`` first, then a stated final answer, then the
  last expression) and compared as mathematics (``0.5`` equals ``\\frac{1}{2}``).
* ``exact``: normalised string equality of the response's final answer (boxed, else stated, else the
  whole response) and the reference.
* ``none``: no grading.
* ``FILE.py:FUNCTION``: ``FUNCTION(response, row)`` returns a bool, a score in [0, 1] (correct only
  at 1), or ``{"correct": bool}`` / ``{"score": number}`` with an ``"extracted"`` answer (text) for
  majority voting.

The row is the dataset row as the output keeps it: the ``original_<name>`` columns without their
prefix, so that ``qstar grade`` on a run's file sees what ``generate`` saw.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from qstar_cli.errors import QstarInputError

NO_GRADER, CUSTOM = "none", "FILE.py:FUNCTION"
DEFAULT_ANSWER_FIELD = "answer"
#: Seconds one response's grade may take, and the worker processes that grade (generate and grade).
DEFAULT_TIMEOUT, DEFAULT_WORKERS = 10.0, 2
METADATA_PREFIX = "original_"
#: Failure reasons (a custom grader's exception adds ``raised <ExceptionName>``).
TIMEOUT, WORKER_DIED, INVALID_RESULT, NO_REFERENCE, UNPARSED_REFERENCE = (
    "timeout", "worker died", "invalid result", "no reference", "reference not parsed",
)  # fmt: skip
#: The grade of a response cut off by its token budget (unless truncated responses are graded).
TRUNCATED = {"correct": False, "score": 0.0, "extracted": None, "reason": "truncated"}
#: What a grader prints goes to standard error with this prefix, never into qstar's output.
OUTPUT_PREFIX = "grader output: "

Grade = dict[str, Any]


class GraderError(QstarInputError):
    """A grader that cannot be used: unknown, missing, not a function of (response, row), or math-verify absent."""


class GradeFailure(Exception):
    """The grader could not grade this sample; ``reason`` is what analyses count."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_custom(name: str) -> bool:
    """Whether ``name`` is spelled as a user's grader, ``FILE.py:FUNCTION``."""
    file, _, function = name.rpartition(":")
    return file.endswith(".py") and bool(function)


@dataclass(frozen=True)
class GraderSpec:
    """What the worker processes need to grade: the grader (a name in :data:`GRADERS` or
    ``/abs/FILE.py:FUNCTION``), the reference column, and whether truncated responses are graded.
    Picklable: workers load the grader from it once."""

    name: str
    answer_field: str = DEFAULT_ANSWER_FIELD
    grade_truncated: bool = False

    def __post_init__(self) -> None:
        if not self.custom and self.name not in GRADERS:
            raise GraderError(f"unknown grader {self.name!r}; choose one of {', '.join(grader_choices())}")

    @property
    def custom(self) -> bool:
        return is_custom(self.name)


def failed(reason: str) -> Grade:
    return {"correct": None, "score": None, "extracted": None, "failure": reason}


def row_of(record: dict[str, Any]) -> dict[str, Any]:
    """The dataset row an output line keeps: its ``original_<name>`` columns, by name."""
    return {k[len(METADATA_PREFIX) :]: v for k, v in record.items() if k.startswith(METADATA_PREFIX)}


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def resolve_grader(name: str, answer_field: str | None, grade_truncated: bool = False) -> GraderSpec | None:
    """The grader ``name`` checked (a built-in's requirements, a custom one loaded and its signature
    checked), a custom file's path made absolute; None for ``none``. Raises :class:`GraderError` with the fix."""
    answer_field = answer_field or DEFAULT_ANSWER_FIELD
    if name == NO_GRADER:
        return None
    if name in GRADERS:
        if GRADERS[name].check is not None:
            GRADERS[name].check()
        return GraderSpec(name, answer_field, grade_truncated)
    if not is_custom(name):
        raise GraderError(f"unknown grader {name!r}; choose one of {', '.join(grader_choices())}")
    file, _, function = name.rpartition(":")
    spec = GraderSpec(f"{Path(file).resolve()}:{function}", answer_field, grade_truncated)
    load_custom(spec.name, shown=name)
    return spec


class PrefixedLines:
    """A text stream that writes into ``stream`` with ``prefix`` at the start of every line."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for part in text.splitlines(keepends=True):
            self.stream.write(self.prefix + part if self.at_line_start else part)
            self.at_line_start = part.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def load_custom(name: str, shown: str | None = None) -> Callable[[str, dict[str, Any]], Any]:
    """The function of ``FILE.py:FUNCTION``, checked to take (response, row). Whatever the module
    raises or calls on import (``sys.exit`` too) is one :class:`GraderError`; what it prints goes to
    standard error."""
    shown = shown or name
    file, _, function = name.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise GraderError(f"grader file not found: {shown.rpartition(':')[0]}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"qstar_user_grader_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        with contextlib.redirect_stdout(PrefixedLines(sys.stderr, OUTPUT_PREFIX)):
            module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise GraderError(f"grader {shown!r}: syntax error in {err.filename} line {err.lineno}: {err.msg}") from err
    except BaseException as err:  # the user's module failed (or exited) on import: say so in one line
        raise GraderError(f"grader {shown!r}: importing {file} raised {type(err).__name__}: {err}") from err
    fn = getattr(module, function, None)
    if not callable(fn):
        raise GraderError(f"grader {shown!r}: {file} defines no function {function}")
    try:
        inspect.signature(fn).bind("response", {})
    except TypeError:
        raise GraderError(f"grader {shown!r}: {function} must take (response, row), not {function}{inspect.signature(fn)}") from None
    except ValueError:  # a builtin without a signature: trusted as called
        pass
    return fn


# ---- extraction shared by the graders ----------------------------------------------------------

_STATED = re.compile(r"\banswer\b\s*(?:is|:|=)?\s*[:=]?\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1] if depth == 0 else None


def gsm8k_answer(reference: str) -> str:
    """GSM8K's ``solution ... #### 42``: what follows the last ``####``; other references as they are."""
    return reference.rpartition("####")[2].strip() if "####" in reference else reference.strip()


def normalise(text: str) -> str:
    """Case, spacing, ``$`` delimiters, a trailing full stop and thousands separators ignored."""
    text = text.strip().strip("$").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return re.sub(r"\s+", " ", text).rstrip(".").strip().lower()


def stated_answer(response: str) -> str:
    """The response's final answer as text: the last boxed, else the last stated one, else all of it."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    stated = list(_STATED.finditer(response))
    return stated[-1].group(1).splitlines()[0] if stated else response


# ---- the graders -------------------------------------------------------------------------------


def reference_of(row: dict[str, Any], answer_field: str) -> str:
    """The row's reference as text (a number in the dataset, ``4`` or ``0.5``, is compared as its text)."""
    value = row.get(answer_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise GradeFailure(NO_REFERENCE)
    return str(value.item() if isinstance(value, np.generic) else value)


def missing_reference(answer_field: str, where: str, columns: list[str]) -> GraderError:
    """The refusal of a dataset or file whose rows lack the reference column, listing the columns they have."""
    return GraderError(
        f"the grader grades against column {answer_field!r}, which {where} lacks; "
        f"the columns there are: {', '.join(sorted(columns)) or '(none)'}; name one with --answer-field"
    )


def grade_exact(response: str, reference: str) -> Grade:
    extracted = normalise(stated_answer(response)) if response.strip() else None
    correct = extracted is not None and extracted == normalise(gsm8k_answer(reference))
    return {"correct": correct, "score": float(correct), "extracted": extracted}


def _math_verify() -> tuple[Any, Any, list, list]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = [LatexExtractionConfig(), ExprExtractionConfig()]
    answer = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse, verify, gold, answer


def latex_reference(reference: str) -> str:
    """A reference as math-verify's LaTeX extraction finds it: GSM8K's ``#### 42`` cut to ``42``, and
    bare LaTeX (DeepScaleR's ``\\frac{\\pi}{4}``) put between ``$`` delimiters."""
    answer = gsm8k_answer(reference)
    delimited = any(mark in answer for mark in ("$", "\\(", "\\[", "\\boxed"))
    return answer if delimited else f"${answer}$"


def grade_math(response: str, reference: str) -> Grade:
    # math-verify's own time limits use SIGALRM; the pool's wall-clock limit bounds a worker instead.
    parse, verify, gold_config, answer_config = _math_verify()
    gold = parse(latex_reference(reference), extraction_config=gold_config, parsing_timeout=None)
    if not gold:
        raise GradeFailure(UNPARSED_REFERENCE)
    answer = parse(response, extraction_config=answer_config, parsing_timeout=None) if response.strip() else []
    correct = bool(answer) and verify(gold, answer, timeout_seconds=None)
    extracted = str(answer[-1]) if answer else None  # parse gives [value, the text it came from]
    return {"correct": correct, "score": float(correct), "extracted": extracted}


def check_math_verify() -> None:
    if not math_verify_installed():
        raise GraderError("--grader math needs HF math-verify, which is not installed: pip install 'qstar[math]' (or math-verify)")


@dataclass(frozen=True)
class Grader:
    """A built-in grader: ``grade(response, reference)`` (the reference None unless it ``needs_reference``),
    the requirement ``check`` (raises :class:`GraderError` when unmet), and the ``warm_up`` a worker
    runs before its first sample (an import, a first call)."""

    grade: Callable[[str, str | None], Grade]
    help: str
    needs_reference: bool = True
    check: Callable[[], None] | None = None
    warm_up: Callable[[], Any] | None = None


#: The built-in graders by name: the command line's choices and help, the checks and the docs' table come from here.
GRADERS: dict[str, Grader] = {
    "math": Grader(
        grade_math, "HF math-verify: the answer compared as mathematics, 0.5 right for \\frac{1}{2}",
        check=check_math_verify, warm_up=lambda: grade_math("1", "1"),
    ),
    "exact": Grader(grade_exact, "the final answer, boxed, else stated, else the response, equal to the reference as normalised text"),
}  # fmt: skip


def grader_choices() -> list[str]:
    return [*GRADERS, NO_GRADER, CUSTOM]


def grader_help() -> str:
    """The grader choices as the command line's help says them."""
    return (
        ", ".join(f"{name} ({grader.help})" for name, grader in GRADERS.items())
        + f", {NO_GRADER} (no grading), or {CUSTOM}, called with (response, row) and returning a bool, a score in [0, 1] "
        "or a dict with the extracted answer"
    )


def grader_table() -> str:
    """The docs' table of graders (Markdown)."""
    rows = ["| grader | grades | needs the answer column |", "|---|---|---|"]
    rows += [f"| `{name}` | {g.help} | {'yes' if g.needs_reference else 'no'} |" for name, g in GRADERS.items()]
    rows.append(f"| `{NO_GRADER}` | nothing: the run is not graded | no |")
    rows.append(f"| `{CUSTOM}` | your function of (response, row): a bool, a score in [0, 1], or a dict with `extracted` | no |")
    return "\n".join(rows) + "\n"


def custom_grade(value: Any) -> Grade:
    """A custom grader's return value as a grade: a bool, a number in [0, 1] (correct only at 1; numpy's
    too), or a dict of ``correct`` or ``score`` and the ``extracted`` answer (text or None)."""
    extracted = None
    if isinstance(value, dict):
        if "extracted" in value and not isinstance(value["extracted"], (str, type(None))):
            raise GradeFailure(INVALID_RESULT)
        extracted = value.get("extracted")
        value = value["score"] if "score" in value else value.get("correct")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return {"correct": value, "score": float(value), "extracted": extracted}
    if isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1:
        return {"correct": value == 1, "score": float(value), "extracted": extracted}
    raise GradeFailure(INVALID_RESULT)


_loaded: dict[str, Callable[[str, dict[str, Any]], Any]] = {}


def _custom(name: str) -> Callable[[str, dict[str, Any]], Any]:
    """A custom grader's function, loaded once per process."""
    if name not in _loaded:
        _loaded[name] = load_custom(name)
    return _loaded[name]


def grade(spec: GraderSpec, response: str, row: dict[str, Any], finish_reason: str | None = None) -> Grade:
    """The grade of one response (what a worker process runs); a failure is a grade with ``correct`` null.
    Nothing a grader raises or calls (``sys.exit``, ``KeyboardInterrupt``) gets past it."""
    if finish_reason == "length" and not spec.grade_truncated:
        return dict(TRUNCATED)
    try:
        if spec.custom:
            return custom_grade(_custom(spec.name)(response, row))
        grader = GRADERS[spec.name]
        return grader.grade(response, reference_of(row, spec.answer_field) if grader.needs_reference else None)
    except GradeFailure as failure:
        return failed(failure.reason)
    except BaseException as err:  # the grader's own failure on this sample: ungraded, the reason counted
        return failed(f"raised {type(err).__name__}")


def start_worker(spec: GraderSpec) -> None:
    """A worker's start: what the grader prints goes to standard error, prefixed (never into qstar's
    output, at the descriptor too); then the grader is loaded (:func:`warm_up`)."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = PrefixedLines(sys.stderr, OUTPUT_PREFIX)
    warm_up(spec)


def warm_up(spec: GraderSpec) -> None:
    """The grader loaded (sympy for ``math``, the user's file) before the first sample, so that no
    sample's time limit pays for it; math-verify's warning that its signal timeouts are off silenced
    (the pool's wall-clock limit replaces them). A failure here shows on the samples' grades instead."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    with contextlib.suppress(BaseException):
        if spec.custom:
            _custom(spec.name)
        elif GRADERS[spec.name].warm_up is not None:
            GRADERS[spec.name].warm_up()
