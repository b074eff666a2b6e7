"""``python -m qstar_cli`` is the ``qstar`` command."""

from qstar_cli.cli import app

# Guarded: grading's worker processes (multiprocessing's fork server) import the main module as
# ``__mp_main__``, and must not run the command again.
if __name__ == "__main__":
    app(prog_name="qstar")
