"""The docs' generated tables, written into their pages so that they read complete where users read
them (the repository's pages as well as the site): the flag table of ``qstar generate`` in
``docs/generate.md`` (from the settings' declaration, ``qstar_cli.generate.config.flag_table``) and
the model families in ``docs/model-families.md`` (from the family matrix,
``qstar_cli.testing.families.family_table``). A test checks that each page holds its current table;
after a change of what a table is made from, rewrite them:

    .venv/bin/python docs/hooks.py
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from qstar_cli.generate.config import flag_table
from qstar_cli.testing.families import family_table

#: Each generated table: its page, the name in its markers (``<!-- qstar:NAME -->`` ...
#: ``<!-- /qstar:NAME -->``) and what makes it.
TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    "generate.md": ("flags", flag_table),
    "model-families.md": ("families", family_table),
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- qstar:{name} -->", f"<!-- /qstar:{name} -->"


def with_table(markdown: str, name: str, make: Callable[[], str]) -> str:
    """``markdown`` with the current table ``name`` between its markers."""
    begin, end = markers(name)
    return re.sub(re.escape(begin) + r"\n.*?" + re.escape(end), lambda _: f"{begin}\n{make()}{end}", markdown, flags=re.S)


if __name__ == "__main__":
    for page, (name, make) in TABLES.items():
        path = Path(__file__).with_name(page)
        path.write_text(with_table(path.read_text(), name, make))
