"""qstar: training responses sampled from the per-token geometric mixture of a policy and a target."""

from qstar_cli.mixture import mixture_logprobs, solve_alpha, token_diagnostics
from qstar_cli.sampling import SamplingParams, draw

__version__ = "0.1.0"

__all__ = ["SamplingParams", "draw", "mixture_logprobs", "solve_alpha", "token_diagnostics", "__version__"]
