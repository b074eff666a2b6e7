"""The tables of ``docs/generate.md`` generated from their declarations: the flags of ``qstar
generate`` (``qstar_cli.generate.config.flag_table``), the graders (``qstar_cli.grading.graders.GRADERS``)
and the alpha methods (``qstar_cli.distributions.alpha_methods.ALPHA_METHODS``), each written into
the page between its markers, so that it reads complete where users read it (the repository's page
as well as the site). A test checks that the page holds the current tables; after a change of the
settings, graders or alpha methods, rewrite it:

    .venv/bin/python docs/hooks.py
"""

from __future__ import annotations

import re
from pathlib import Path

from qstar_cli.distributions.alpha_methods import alpha_method_table
from qstar_cli.generate.config import flag_table
from qstar_cli.grading.graders import grader_table

PAGE = Path(__file__).with_name("generate.md")
#: Each table by the name of its markers, ``<!-- qstar:NAME -->`` and ``<!-- /qstar:NAME -->``.
TABLES = {"flags": flag_table, "graders": grader_table, "alpha-methods": alpha_method_table}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- qstar:{name} -->", f"<!-- /qstar:{name} -->"


def with_tables(markdown: str) -> str:
    """``markdown`` with the current tables between their markers."""
    for name, table in TABLES.items():
        begin, end = markers(name)
        found = re.search(re.escape(begin) + r"\n.*?" + re.escape(end), markdown, flags=re.S)
        if found is not None:
            markdown = markdown[: found.start()] + f"{begin}\n{table()}{end}" + markdown[found.end() :]
    return markdown


if __name__ == "__main__":
    PAGE.write_text(with_tables(PAGE.read_text()))
