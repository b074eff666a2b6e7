"""Kept for users' adapters, which import ``DatasetAdapter`` and ``SkipRow`` from here; the adapters
live in :mod:`qstar_cli.generate.adapters`."""

from qstar_cli.generate.adapters import ADAPTERS, DatasetAdapter, DatasetError, Prompt, SkipRow

__all__ = ["ADAPTERS", "DatasetAdapter", "DatasetError", "Prompt", "SkipRow"]
