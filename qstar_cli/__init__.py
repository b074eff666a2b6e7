"""qstar: training responses sampled from the per-token geometric mixture of a policy and a target.

The main Python API is importable from here, lazily: ``import qstar_cli`` imports neither torch nor
datasets (``qstar --help`` stays fast); each name loads its module on first use.

>>> from qstar_cli import GenerateConfig, run_generate
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.0"

#: Public name -> the module that defines it.
_API = {
    "solve_alpha": "qstar_cli.distributions.mixture",
    "mixture_logprobs": "qstar_cli.distributions.mixture",
    "token_diagnostics": "qstar_cli.distributions.mixture",
    "SamplingParams": "qstar_cli.distributions.sampling",
    "verify_drafts": "qstar_cli.distributions.speculative",
    "DualModelSampler": "qstar_cli.engine.sampler",
    "SampleRequest": "qstar_cli.engine.samples",
    "SampleResult": "qstar_cli.engine.samples",
    "GenerateConfig": "qstar_cli.generate.config",
    "run_generate": "qstar_cli.generate.run",
    "DatasetAdapter": "qstar_cli.generate.adapters",
    "SkipRow": "qstar_cli.generate.adapters",
    "CheckpointedWriter": "qstar_cli.runfiles.writer",
    "merge_shards": "qstar_cli.runfiles.merge",
    "analyze_sidecar": "qstar_cli.analysis.statistics",
    "export_training_set": "qstar_cli.analysis.export",
    "build_report": "qstar_cli.analysis.html_report",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'qstar_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
