"""The models of a round by role: pi_theta, pi_t, and the optional draft pair, each with the prompt
side it reads and how a round feeds it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

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
        return Side.THETA if self in (Role.THETA, Role.DRAFT_THETA) else Side.T


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
