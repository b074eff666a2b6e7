"""Datasets in: load a source with ``datasets`` and turn each row into chat messages plus metadata.

Sources: a hub dataset id (with subset and split), a local ``.jsonl`` / ``.json`` / ``.parquet`` /
``.csv`` file, or a ``save_to_disk`` directory. Adapters are small classes: each names the columns it
consumes (``fields``) and maps a row to a list of ``{"role", "content"}`` messages; every other
column is kept as ``original_<name>``. A row it cannot use raises :class:`SkipRow` with a reason and
is counted, never fatal; a consumed column that the dataset lacks altogether is an immediate
:class:`DatasetError` listing the columns there are.

A user adapter is a subclass of :class:`DatasetAdapter` (set ``fields``, implement ``messages``),
named as ``package.module:Class`` or ``path/to/file.py:Class``; it imports ``DatasetAdapter`` and
``SkipRow`` from ``qstar_cli``, their one public path::

    from qstar_cli import DatasetAdapter, SkipRow

    class TitleAndBody(DatasetAdapter):
        fields = ("title", "body")

        def messages(self, row):
            if not row["body"]:
                raise SkipRow("empty body")
            return [{"role": "user", "content": f"{row['title']}\n\n{row['body']}"}]
"""

from __future__ import annotations

import codecs
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import orjson

from qstar_cli.engine.prompts import Messages
from qstar_cli.errors import QstarInputError
from qstar_cli.paths import names_local_path

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "function_response": "tool",
}
#: The ``auto`` adapter's single-field candidates, in order of preference.
PROMPT_FIELDS = ("prompt", "question", "problem", "instruction", "query", "text")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetError(QstarInputError):
    """The dataset cannot be loaded or does not have what the adapter needs."""


class SkipRow(Exception):
    """This row has no usable prompt; ``reason`` is what the run summary counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Prompt:
    """One usable row: the conversation to answer and the source's other columns."""

    row_idx: int
    messages: Messages
    metadata: dict[str, Any] = field(default_factory=dict)


class DatasetAdapter(ABC):
    """Base adapter: subclasses set ``fields`` and implement ``messages``."""

    name = "custom"
    #: Columns this adapter consumes; every one must exist in the dataset.
    fields: tuple[str, ...] = ()
    #: The column holding the reference answer, where the adapter's datasets have one: runs grade
    #: against it by default (``--grader math``).
    answer_field: str | None = None

    @abstractmethod
    def messages(self, row: dict[str, Any]) -> Messages:
        """The conversation to answer, ending with a user turn; raise :class:`SkipRow` if there is none."""

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        """Every column not consumed, as ``original_<name>``."""
        return {f"original_{k}": v for k, v in row.items() if k not in self.fields}

    def check_columns(self, columns: list[str]) -> None:
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise DatasetError(
                f"adapter {self.name!r} needs column {missing[0]!r}, which the dataset lacks; "
                f"columns present: {', '.join(columns) or '(none)'}"
            )


def _text(value: Any) -> str:
    if value is None:
        raise SkipRow("missing prompt")
    if not isinstance(value, str):
        raise SkipRow("prompt is not text")
    if not value.strip():
        raise SkipRow("empty prompt")
    return value


class FieldAdapter(DatasetAdapter):
    """A single text column is the user's message (``--prompt-field``)."""

    name = "prompt-field"

    def __init__(self, prompt_field: str):
        self.fields = (prompt_field,)

    def messages(self, row: dict[str, Any]) -> Messages:
        return [{"role": "user", "content": _text(row[self.fields[0]])}]


class InstructionAdapter(DatasetAdapter):
    """Alpaca style: ``instruction``, followed by ``input`` after a blank line when it is not empty."""

    name = "instruction"
    fields = ("instruction", "input")

    def messages(self, row: dict[str, Any]) -> Messages:
        content = _text(row["instruction"])
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            content = f"{content}\n\n{extra}"
        return [{"role": "user", "content": content}]


class DeepScaleRAdapter(FieldAdapter):
    """DeepScaleR-style math rows: ``problem`` is the prompt; ``answer`` and ``solution`` stay as metadata."""

    name = "deepscaler"
    answer_field = "answer"

    def __init__(self) -> None:
        super().__init__("problem")


def _conversation(turns: Any, role_key: str, content_key: str, role_map: dict[str, str]) -> Messages:
    """Validated messages from a list of turns, without a trailing assistant turn."""
    if turns is None:
        raise SkipRow("missing prompt")
    if not isinstance(turns, list):
        raise SkipRow("malformed conversation")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get(role_key) not in role_map or not isinstance(turn.get(content_key), str):
            raise SkipRow("malformed conversation")
        messages.append({"role": role_map[turn[role_key]], "content": turn[content_key]})
    # The model answers the last user turn (or a tool's result); a reference answer at the end is kept as metadata.
    if messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not any(m["role"] == "user" for m in messages):
        raise SkipRow("no user turn")
    if messages[-1]["role"] not in ("user", "tool"):
        raise SkipRow(f"last turn is {messages[-1]['role']}, not user or tool")
    _text(messages[-1]["content"])
    return messages


class ConversationAdapter(DatasetAdapter):
    """A column holding a list of turns; a trailing assistant turn is kept as ``original_assistant``."""

    role_key, content_key, role_map = "role", "content", {r: r for r in ROLES}

    def messages(self, row: dict[str, Any]) -> Messages:
        return _conversation(row[self.fields[0]], self.role_key, self.content_key, self.role_map)

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        turns = row[self.fields[0]]
        last = turns[-1] if isinstance(turns, list) and turns else None
        is_answer = isinstance(last, dict) and self.role_map.get(last.get(self.role_key)) == "assistant"
        return {**super().metadata(row), "original_assistant": last[self.content_key] if is_answer else None}


class MessagesAdapter(ConversationAdapter):
    """OpenAI chat format: a ``messages`` list of ``{"role", "content"}``."""

    name = "messages"
    fields = ("messages",)


class ShareGPTAdapter(ConversationAdapter):
    """ShareGPT format: a ``conversations`` list of ``{"from", "value"}``; roles mapped, system turns kept."""

    name = "sharegpt"
    fields = ("conversations",)
    role_key, content_key, role_map = "from", "value", SHAREGPT_ROLES


ADAPTERS = {"messages": MessagesAdapter, "sharegpt": ShareGPTAdapter, "deepscaler": DeepScaleRAdapter}
ADAPTER_CHOICES = ("auto", *ADAPTERS, "MODULE:CLASS", "FILE.py:CLASS")


def auto_adapter(columns: list[str]) -> DatasetAdapter:
    """``messages``, then ShareGPT ``conversations``, then the first of :data:`PROMPT_FIELDS`."""
    if "messages" in columns:
        return MessagesAdapter()
    if "conversations" in columns:
        return ShareGPTAdapter()
    for name in PROMPT_FIELDS:
        if name in columns:
            if name == "instruction" and "input" in columns:
                return InstructionAdapter()
            return FieldAdapter(name)
    raise DatasetError(
        "cannot tell where the prompt is: no messages, conversations or "
        f"{'/'.join(PROMPT_FIELDS)} column; columns present: {', '.join(columns) or '(none)'}; "
        "name one with --prompt-field"
    )


def load_user_adapter(spec: str) -> DatasetAdapter:
    """Instantiate ``module:Class`` or ``path.py:Class``."""
    target, _, class_name = spec.rpartition(":")
    if not target or not class_name:
        raise DatasetError(f"unknown adapter {spec!r}; choose one of {', '.join(ADAPTER_CHOICES)}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise DatasetError(f"adapter file not found: {target}")
            module_spec = importlib.util.spec_from_file_location(f"qstar_user_adapter_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as err:
        # An adapter written for an earlier qstar may import the module qstar_cli.adapters, since removed.
        fix = "; an adapter imports DatasetAdapter and SkipRow from qstar_cli" if (err.name or "").startswith("qstar_cli") else ""
        raise DatasetError(f"cannot import adapter module {target!r}: {err}{fix}") from err
    except SyntaxError as err:
        raise DatasetError(f"adapter {spec!r}: syntax error in {err.filename} line {err.lineno}: {err.msg}") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise DatasetError(f"adapter {spec!r}: {target} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, DatasetAdapter)):
        raise DatasetError(f"adapter {spec!r} must be a subclass of qstar_cli.DatasetAdapter")
    return cls()


def resolve_adapter(adapter: str, columns: list[str], prompt_field: str | None = None) -> DatasetAdapter:
    """The adapter for a dataset with these columns; checks that the columns it consumes exist."""
    if prompt_field:
        chosen: DatasetAdapter = FieldAdapter(prompt_field)
    elif adapter == "auto":
        chosen = auto_adapter(columns)
    elif adapter in ADAPTERS:
        chosen = ADAPTERS[adapter]()
    else:
        chosen = load_user_adapter(adapter)
    chosen.check_columns(columns)
    return chosen


def _is_blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (read only up to its first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_text_file(path: Path) -> None:
    """Refuse a local text data file (``.jsonl``, ``.json``, ``.csv``) that is not UTF-8, or a JSON
    Lines file with a line that is not a JSON object, naming the file, the line and the cause
    (``datasets`` reads rows lazily and in chunks, and would name neither)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as f:
        for raw in f:
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as err:
                raise DatasetError(f"dataset {path} line {line} is not UTF-8 text (byte {raw[err.start]:#04x}); save it as UTF-8") from None
            if path.suffix == ".jsonl" and raw.strip():
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError as err:
                    raise DatasetError(f"dataset {path} line {line} is not valid JSON: {str(err).split(': line')[0]}") from None
                if not isinstance(record, dict):
                    raise DatasetError(f"dataset {path} line {line} is a JSON {type(record).__name__}, not an object of column: value")
            line += raw.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DatasetError(f"dataset {path} line {line} ends in a cut UTF-8 character; save it as UTF-8") from None


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception behind ``err`` (what ``datasets`` wraps)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_source(spec: str, subset: str | None = None, split: str = "train") -> datasets.Dataset:
    """A ``datasets.Dataset`` from a hub id, a local data file or a ``save_to_disk`` directory.

    A local file is a single split: ``subset``, or a ``split`` other than ``train``, is refused there.
    """
    path = Path(spec).expanduser()
    if names_local_path(spec) and not path.exists():
        raise DatasetError(f"dataset not found: {spec}")
    if path.is_file() and (subset is not None or split != "train"):
        raise DatasetError(f"--subset and --split select part of a hub dataset or a saved DatasetDict; the local file {spec} is one split")
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            if path.suffix not in LOCAL_BUILDERS:
                raise DatasetError(f"unsupported dataset file {spec}; use {', '.join(LOCAL_BUILDERS)}")
            if _is_blank(path):
                raise DatasetError(f"dataset {spec} is empty")
            if path.suffix in (".jsonl", ".json", ".csv"):
                check_text_file(path)
            loaded = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
        else:
            loaded = datasets.load_dataset(str(path) if path.is_dir() else spec, subset, split=split)
    except DatasetError:
        raise
    except Exception as err:  # datasets raises many types (hub, parsing, schema); all mean "cannot load"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if path.is_file() and "corresponds to no data" in first_line:  # how datasets meets a split of no rows
            raise DatasetError(f"dataset {spec!r} has no rows") from err
        cause = _root_cause(err)
        raise DatasetError(f"cannot load dataset {spec!r}: {first_line}" + (f" ({cause})" if cause != first_line else "")) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"dataset {spec!r} has no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise DatasetError(f"dataset {spec!r} has no rows")
    return loaded


@dataclass
class AdaptedDataset:
    """The usable prompts of a row range, in row order, and how many rows were skipped and why."""

    prompts: list[Prompt]
    skipped: Counter
    adapter: str
    rows: int


def adapt_rows(
    dataset: datasets.Dataset,
    adapter: DatasetAdapter,
    start_index: int = 0,
    num_samples: int | None = None,
    system_prompt: str | None = None,
) -> AdaptedDataset:
    """Apply ``adapter`` to rows ``[start_index, start_index + num_samples)``.

    ``system_prompt`` is put first in conversations that have no system turn of their own.
    """
    stop = len(dataset) if num_samples is None else min(len(dataset), start_index + num_samples)
    if start_index >= len(dataset):
        raise DatasetError(f"--start-index {start_index} is past the last row of the dataset (rows 0 to {len(dataset) - 1})")
    prompts, skipped = [], Counter()
    for row_idx, row in zip(range(start_index, stop), dataset.select(range(start_index, stop))):
        try:
            messages = adapter.messages(row)
            _validate_messages(messages, adapter)
        except SkipRow as skip:
            skipped[skip.reason] += 1
            continue
        except DatasetError:
            raise
        except Exception as err:  # a user adapter's own bug: named with the row, not a traceback
            raise DatasetError(f"adapter {type(adapter).__name__} failed on row {row_idx}: {type(err).__name__}: {err}") from err
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        prompts.append(Prompt(row_idx, messages, adapter.metadata(row)))
    return AdaptedDataset(prompts, skipped, adapter.name, stop - start_index)


def _validate_messages(messages: Any, adapter: DatasetAdapter) -> None:
    """User adapters must return plain lists of role/content dicts; anything else is refused, naming it."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
    ):
        raise DatasetError(
            f"adapter {type(adapter).__name__}: messages(row) must return a non-empty list of "
            f"{{'role', 'content'}} dicts with roles {'/'.join(ROLES)}, got {messages!r:.200}"
        )
