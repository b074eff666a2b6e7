"""Rendering a conversation into each model's own prompt format.

Formats: ``chat`` (the tokenizer's chat template with the generation prompt), ``plain`` (below, for
base models), or the path of a Jinja template file. The ``plain`` format is::

    System: {system content}

    User: {user content}

    Assistant: {assistant content}

    User: {last user content}

    Assistant:

one block per message, blocks separated by a blank line, ending with ``Assistant:`` for the model
to continue. A Jinja template receives ``messages`` (a list of ``{"role", "content"}``) and
``add_generation_prompt`` (True), exactly as chat templates do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from qstar_cli.errors import QstarInputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_plain(messages: Messages) -> str:
    blocks = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n\n".join(blocks + ["Assistant:"])


def load_template(spec: str) -> jinja2.Template:
    """The Jinja template file ``spec``, compiled; a missing file or a syntax error is the user's to fix."""
    path = Path(spec)
    if not path.is_file():
        raise QstarInputError(f"prompt format must be 'chat', 'plain' or a Jinja template file; not found: {spec}")
    env = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    try:
        return env.from_string(path.read_text(encoding="utf-8"))
    except jinja2.TemplateSyntaxError as err:
        raise QstarInputError(f"template {spec} line {err.lineno}: {err.message}") from err
    except UnicodeDecodeError as err:
        raise QstarInputError(f"template {spec} is not UTF-8 text") from err


def check_format(spec: str | None) -> None:
    """Refuse a bad prompt format before any model loads (``chat`` is checked against the tokenizer later)."""
    if spec not in (None, "chat", "plain"):
        load_template(spec)


class PromptFormat:
    """One model's prompt format; ``render(messages)`` gives the prompt text, ``encode`` its ids."""

    def __init__(self, spec: str | None, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        if spec is None:
            spec = "chat" if tokenizer.chat_template else "plain"
        self.spec = spec
        self._template: jinja2.Template | None = None
        if spec == "chat":
            if not tokenizer.chat_template:
                raise QstarInputError("prompt format 'chat' needs a tokenizer with a chat template; use 'plain' or a template file")
        elif spec != "plain":
            self._template = load_template(spec)

    def render(self, messages: Messages) -> str:
        if self.spec == "chat":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.spec == "plain":
            return render_plain(messages)
        return self._template.render(messages=messages, add_generation_prompt=True)

    def encode(self, messages: Messages) -> list[int]:
        # Chat templates already contain any BOS; plain and custom formats get the tokenizer's own.
        return self.tokenizer(self.render(messages), add_special_tokens=self.spec != "chat")["input_ids"]
