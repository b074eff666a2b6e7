"""The docs' tables generated from their declarations, each written into its page between its markers
so that it reads complete where users read it (the repository's pages as well as the site): in
``docs/generate.md`` the flags of ``qstar generate`` (``qstar_cli.generate.config.flag_table``), the
graders (``qstar_cli.grading.graders.GRADERS``) and the alpha methods
(``qstar_cli.distributions.alpha_methods.ALPHA_METHODS``); in ``docs/model-families.md`` the model
families (the family matrix, ``qstar_cli.testing.families.family_table``). A test checks that each
page holds its current tables; after a change of what a table is made from, rewrite them:

    .venv/bin/python docs/hooks.py
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from qstar_cli.distributions.alpha_methods import alpha_method_table
from qstar_cli.generate.config import flag_table
from qstar_cli.grading.graders import grader_table
from qstar_cli.testing.families import family_table

#: Each generated table: its page, the name in its markers (``<!-- qstar:NAME -->`` ...
#: ``<!-- /qstar:NAME -->``) and what makes it.
TABLES: list[tuple[str, str, Callable[[], str]]] = [
    ("generate.md", "flags", flag_table),
    ("generate.md", "graders", grader_table),
    ("generate.md", "alpha-methods", alpha_method_table),
    ("model-families.md", "families", family_table),
]


def markers(name: str) -> tuple[str, str]:
    return f"<!-- qstar:{name} -->", f"<!-- /qstar:{name} -->"


def with_table(markdown: str, name: str, make: Callable[[], str]) -> str:
    """``markdown`` with the current table ``name`` between its markers."""
    begin, end = markers(name)
    return re.sub(re.escape(begin) + r"\n.*?" + re.escape(end), lambda _: f"{begin}\n{make()}{end}", markdown, flags=re.S)


if __name__ == "__main__":
    for page, name, make in TABLES:
        path = Path(__file__).with_name(page)
        path.write_text(with_table(path.read_text(), name, make))
