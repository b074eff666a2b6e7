"""``python -m qstar_cli`` is the ``qstar`` command."""

from qstar_cli.cli import app

app(prog_name="qstar")
