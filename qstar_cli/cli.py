"""The ``qstar`` command line: a thin layer over the Python API."""

from __future__ import annotations

import typer

import qstar_cli

app = typer.Typer(
    help="Generate fine-tuning data from the per-token geometric mixture q = pi_theta^alpha * pi_t^(1-alpha) / Z.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """qstar: training responses close to a target model and likely under the policy."""


@app.command()
def version() -> None:
    """Print the qstar version."""
    typer.echo(qstar_cli.__version__)
