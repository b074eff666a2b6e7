"""The alpha methods by name, in one table: what each does and the function that solves it.

The command line's choices and help, the config check and the docs' table are read from
:data:`ALPHA_METHODS` without torch (the command line starts without it), so a built-in method names
its solver, a function of :mod:`qstar_cli.distributions.mixture`; an added method may give the
function itself. A solver is called as ``solver(logp_theta, logp_t, alpha=..., tol=..., max_iter=...)``
(``[batch, vocab]`` log-probabilities, the ``--alpha`` setting and the iteration bounds, of which it
takes those it uses and ignores the others: ``**_``) and returns alpha ``[batch]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: A method's name, a key of :data:`ALPHA_METHODS`.
AlphaMethod = str


@dataclass(frozen=True)
class AlphaMethodInfo:
    help: str
    solver: str | Callable  # a function of qstar_cli.distributions.mixture by name, or the function
    uses_alpha: bool = False  # reads the --alpha setting


ALPHA_METHODS: dict[AlphaMethod, AlphaMethodInfo] = {
    "kl_symmetry": AlphaMethodInfo("the Chernoff point, where KL(q||pi_theta) = KL(q||pi_t), at every token", "solve_kl_symmetry"),
    "entropy": AlphaMethodInfo("H(pi_theta) / (H(pi_theta) + H(pi_t)) at every token", "entropy_alpha"),
    "fixed": AlphaMethodInfo("the constant --alpha", "fixed_alpha", uses_alpha=True),
}


def check_alpha_method(method: str, alpha: float = 0.5) -> None:
    """Raise ``ValueError`` for an unknown method or a method's ``alpha`` outside [0, 1]."""
    if method not in ALPHA_METHODS:
        raise ValueError(f"unknown alpha method {method!r}; choose one of {', '.join(ALPHA_METHODS)}")
    if ALPHA_METHODS[method].uses_alpha and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the alpha of method {method} must lie in [0, 1], got {alpha}")


def alpha_method_help() -> str:
    """The methods as the command line's help says them."""
    return "; ".join(f"{name}: {method.help}" for name, method in ALPHA_METHODS.items()) + "."


def alpha_method_table() -> str:
    """The docs' table of alpha methods (Markdown)."""
    rows = ["| method | alpha | uses `--alpha` |", "|---|---|---|"]
    for name, method in ALPHA_METHODS.items():
        cell = method.help.replace("|", "\\|")
        rows.append(f"| `{name}` | {cell} | {'yes' if method.uses_alpha else 'no'} |")
    return "\n".join(rows) + "\n"
