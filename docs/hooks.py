"""mkdocs hook: the flag table of ``qstar generate``, generated from the settings' declaration."""

from qstar_cli.generate.config import flag_table

PLACEHOLDER = "<!-- qstar:flags -->"


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(PLACEHOLDER, flag_table())
