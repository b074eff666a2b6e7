"""Graders: a response and its dataset row in, a grade out.

A grade is ``{"correct": true|false|null, "score": float|null, "extracted": str|null}``; a grader
that fails on a sample (raises, returns something that is no grade, runs out of time) gives
``correct: null`` and a ``failure`` reason that analyses count. A grade is a pure function of the
response and the row, so a resumed run writes the grades an uninterrupted one would.

* ``math``: HF ``math-verify``. The reference is parsed from the answer column as datasets hold it
  (DeepScaleR's bare LaTeX ``\\frac{\\pi}{4}``, GSM8K's ``... #### 42``); the response's answer is
  found by math-verify's extraction order (``\\boxed{}`` first, then a stated final answer, then the
  last expression) and compared as mathematics (``0.5`` equals ``\\frac{1}{2}``).
* ``exact``: normalised string equality of the response's final answer (boxed, else stated, else the
  whole response) and the reference.
* ``none``: no grading.
* ``FILE.py:FUNCTION``: ``FUNCTION(response, row)`` returns a bool or a score in [0, 1] (correct
  only at 1).

The row is the dataset row as the output keeps it: the ``original_<name>`` columns without their
prefix, so that ``qstar grade`` on a run's file sees what ``generate`` saw.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qstar_cli.errors import QstarInputError

BUILTIN_GRADERS = ("math", "exact", "none")
GRADER_CHOICES = (*BUILTIN_GRADERS, "FILE.py:FUNCTION")
DEFAULT_ANSWER_FIELD = "answer"
#: Seconds one response's grade may take, and the worker processes that grade (generate and grade).
DEFAULT_TIMEOUT, DEFAULT_WORKERS = 10.0, 2
METADATA_PREFIX = "original_"
#: Failure reasons (a custom grader's exception adds ``raised <ExceptionName>``).
TIMEOUT, WORKER_DIED, INVALID_RESULT, NO_REFERENCE, UNPARSED_REFERENCE = (
    "timeout", "worker died", "invalid result", "no reference", "reference not parsed",
)  # fmt: skip

Grade = dict[str, Any]


class GraderError(QstarInputError):
    """A grader that cannot be used: unknown, missing, not a function of (response, row), or math-verify absent."""


class GradeFailure(Exception):
    """The grader could not grade this sample; ``reason`` is what analyses count."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GraderSpec:
    """What the worker processes need to grade: the grader (a built-in name or ``/abs/FILE.py:FUNCTION``)
    and the reference column. Picklable: workers load the grader from it once."""

    name: str
    answer_field: str = DEFAULT_ANSWER_FIELD

    @property
    def custom(self) -> bool:
        return self.name not in BUILTIN_GRADERS


def failed(reason: str) -> Grade:
    return {"correct": None, "score": None, "extracted": None, "failure": reason}


def row_of(record: dict[str, Any]) -> dict[str, Any]:
    """The dataset row an output line keeps: its ``original_<name>`` columns, by name."""
    return {k[len(METADATA_PREFIX) :]: v for k, v in record.items() if k.startswith(METADATA_PREFIX)}


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def resolve_grader(name: str, answer_field: str | None) -> GraderSpec:
    """The grader ``name`` checked (a custom one loaded and its signature checked; math-verify
    importable for ``math``), with a custom file's path made absolute; exits on nothing, raises
    :class:`GraderError` with the fix."""
    answer_field = answer_field or DEFAULT_ANSWER_FIELD
    if name in ("math", "exact", "none"):
        if name == "math" and not math_verify_installed():
            raise GraderError("--grader math needs HF math-verify, which is not installed: pip install 'qstar[math]' (or math-verify)")
        return GraderSpec(name, answer_field)
    file, _, function = name.rpartition(":")
    if not file.endswith(".py") or not function:
        raise GraderError(f"unknown grader {name!r}; choose one of {', '.join(GRADER_CHOICES)}")
    spec = GraderSpec(f"{Path(file).resolve()}:{function}", answer_field)
    load_custom(spec.name, shown=name)
    return spec


def load_custom(name: str, shown: str | None = None) -> Callable[[str, dict[str, Any]], Any]:
    """The function of ``FILE.py:FUNCTION``, checked to take (response, row)."""
    shown = shown or name
    file, _, function = name.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise GraderError(f"grader file not found: {shown.rpartition(':')[0]}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"qstar_user_grader_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise GraderError(f"grader {shown!r}: syntax error in {err.filename} line {err.lineno}: {err.msg}") from err
    except Exception as err:  # the user's module failed on import: say so in one line
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
    value = row.get(answer_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise GradeFailure(NO_REFERENCE)
    return str(value)


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


def custom_grade(value: Any) -> Grade:
    """A custom grader's return value as a grade: a bool, or a number in [0, 1] (correct only at 1)."""
    if isinstance(value, bool):
        return {"correct": value, "score": float(value), "extracted": None}
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return {"correct": value == 1, "score": float(value), "extracted": None}
    raise GradeFailure(INVALID_RESULT)


_loaded: dict[str, Callable[[str, dict[str, Any]], Any]] = {}


def _custom(name: str) -> Callable[[str, dict[str, Any]], Any]:
    """A custom grader's function, loaded once per process."""
    if name not in _loaded:
        _loaded[name] = load_custom(name)
    return _loaded[name]


def grade(spec: GraderSpec, response: str, row: dict[str, Any]) -> Grade:
    """The grade of one response (what a worker process runs); a failure is a grade with ``correct`` null."""
    try:
        if spec.custom:
            return custom_grade(_custom(spec.name)(response, row))
        reference = reference_of(row, spec.answer_field)
        return grade_math(response, reference) if spec.name == "math" else grade_exact(response, reference)
    except GradeFailure as failure:
        return failed(failure.reason)
    except Exception as err:  # the grader's own failure on this sample: ungraded, the reason counted
        return failed(f"raised {type(err).__name__}")


def warm_up(spec: GraderSpec) -> None:
    """A worker's start: the grader loaded (sympy for ``math``, the user's file) before the first
    sample, so that no sample's time limit pays for it; math-verify's warning that its signal
    timeouts are off silenced (the pool's wall-clock limit replaces them)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if spec.name == "math":
        grade_math("1", "1")
    elif spec.custom:
        _custom(spec.name)
