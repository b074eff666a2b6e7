"""The models of a run by role: pi_theta, pi_t, and the optional draft pair; the one table of what
each role is (:data:`ROLES`), which the round, the settings and the run's messages read.

Adding a role is a row of :data:`ROLES` (and a setting of that name in
:class:`~qstar_cli.generate.config.GenerateConfig`) and its part in the round
(:meth:`~qstar_cli.engine.sampler.DualModelSampler._round`). Imports nothing heavy: the settings'
checks read the table before torch loads.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qstar_cli.engine.models import LoadedModel


class Side(enum.IntEnum):
    """Which prompt a model reads, pi_theta's format or pi_t's; the index of every per-side array
    (prompt lengths, cached tokens, pending tokens)."""

    THETA = 0
    T = 1


class Role(enum.Enum):
    """What a model is for. pi_theta and pi_t are q's two factors; a draft pair (small models of each
    side) proposes drafts for them from its own mixture."""

    THETA = "pi_theta"
    T = "pi_t"
    DRAFT_THETA = "draft_theta"
    DRAFT_T = "draft_t"

    @property
    def side(self) -> Side:
        return ROLES[self].side


@dataclass(frozen=True)
class RoleInfo:
    """A role's row of :data:`ROLES`."""

    setting: str  # the GenerateConfig setting that names its model
    side: Side
    description: str  # what messages call it
    draft: bool = False  # a draft pair's: loaded (and fingerprinted) only when the pair drafts

    @property
    def identity(self) -> str:
        """The fingerprint's key for the content of its model's files."""
        return f"{self.setting}_identity"


ROLES: dict[Role, RoleInfo] = {
    Role.THETA: RoleInfo("model_theta", Side.THETA, "pi_theta"),
    Role.T: RoleInfo("model_t", Side.T, "pi_t"),
    Role.DRAFT_THETA: RoleInfo("draft_model_theta", Side.THETA, "the draft model for pi_theta", draft=True),
    Role.DRAFT_T: RoleInfo("draft_model_t", Side.T, "the draft model for pi_t", draft=True),
}
#: The models of a plain round: both score, one forward each.
PLAIN_SCORERS = (Role.THETA, Role.T)
#: The draft pair: both draft, a forward per draft, from their own mixture.
DRAFT_PAIR = tuple(role for role, info in ROLES.items() if info.draft)


def run_roles(pair_drafts: bool) -> tuple[Role, ...]:
    """The roles a run loads: pi_theta and pi_t, and the draft pair when it drafts."""
    return tuple(role for role, info in ROLES.items() if pair_drafts or not info.draft)


@dataclass(frozen=True)
class RoleModel:
    """A model in its role, with its compiled decode and verify forward (None: the model, eager)."""

    role: Role
    loaded: LoadedModel
    compiled: Callable | None

    @property
    def side(self) -> Side:
        return self.role.side

    @property
    def model(self):
        return self.loaded.model
