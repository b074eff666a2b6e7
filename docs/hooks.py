"""The flag table of ``qstar generate`` in ``docs/generate.md``, generated from the settings'
declaration (``qstar_cli.generate.config.flag_table``) and written into the page, so that it reads
complete where users read it (the repository's page as well as the site). A test checks that the page
holds the current table; after a change of the settings, rewrite it:

    .venv/bin/python docs/hooks.py
"""

from __future__ import annotations

import re
from pathlib import Path

from qstar_cli.generate.config import flag_table

PAGE = Path(__file__).with_name("generate.md")
BEGIN, END = "<!-- qstar:flags -->", "<!-- /qstar:flags -->"
_TABLE = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)


def with_flag_table(markdown: str) -> str:
    """``markdown`` with the current flag table between the markers."""
    return _TABLE.sub(lambda _: f"{BEGIN}\n{flag_table()}{END}", markdown)


if __name__ == "__main__":
    PAGE.write_text(with_flag_table(PAGE.read_text()))
