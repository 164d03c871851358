"""Who is calling (``Principal``) and what it may do (``authorize``): pure functions, no I/O.

Roles are ordered: ``reader`` < ``operator`` < ``admin``; each ``Action`` names the least role it
needs. A principal is also scoped to models by fnmatch globs (``("*",)``: every model):

- ``reader``: metadata and inference on its models (and /metrics where the server protects it);
- ``operator``: also load/unload, move unprotected aliases, feedback, register versions, read payload logs;
- ``admin``: also protected aliases, delete, API keys and the audit log.

A model outside the principal's scope is refused with one message that names only the model the
caller asked for, so it does not learn whether such a model exists. For that to hold, adapters call
``authorize`` *before* looking the model up, and filter lists (the repository index, ``/v2/models``)
with ``Principal.allows_model``.

Actions that reach across every model (``MANAGE_KEYS``, ``READ_AUDIT``, ``READ_METRICS``: the metric
labels name every model) also need an unscoped principal; otherwise a key scoped to ``a*`` could mint
an unscoped key, or read the names of the others from /metrics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from modelserve.errors import InvalidInput, PermissionDenied

Source = Literal["key", "jwt", "anonymous"]


class Role(enum.IntEnum):
    READER = 1
    OPERATOR = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | Role) -> Role:
        """``reader`` / ``operator`` / ``admin`` (any case) -> Role; anything else: ``InvalidInput``."""
        if isinstance(value, Role):
            return value
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise InvalidInput(f"unknown role {str(value)[:40]!r}: expected reader, operator or admin") from None


class Action(enum.Enum):
    """What a request does. Value: (least role, description, across every model)."""

    READ_METADATA = (Role.READER, "read model metadata", False)
    INFER = (Role.READER, "run inference", False)
    READ_METRICS = (Role.READER, "read metrics", True)
    FEEDBACK = (Role.OPERATOR, "send feedback", False)
    LOAD_UNLOAD = (Role.OPERATOR, "load or unload models", False)
    MOVE_ALIAS = (Role.OPERATOR, "move aliases", False)
    REGISTER = (Role.OPERATOR, "register model versions", False)
    READ_LOGS = (Role.OPERATOR, "read payload logs", False)
    MOVE_PROTECTED_ALIAS = (Role.ADMIN, "move protected aliases", False)
    DELETE = (Role.ADMIN, "delete models or versions", False)
    MANAGE_KEYS = (Role.ADMIN, "manage API keys", True)
    READ_AUDIT = (Role.ADMIN, "read the audit log", True)

    @property
    def min_role(self) -> Role:
        return self.value[0]

    @property
    def description(self) -> str:
        return self.value[1]

    @property
    def global_scope(self) -> bool:
        """True: needs a principal allowed every model (``*``), whatever the model argument."""
        return self.value[2]


ALL_MODELS: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``models``: fnmatch globs (case-sensitive); ``("*",)`` allows every model,
    ``()`` none. ``key_id``: the API key's public id (``source == "key"``), for audit records."""

    name: str
    role: Role
    models: tuple[str, ...] = ALL_MODELS
    source: Source = "key"
    key_id: str | None = None
    #: unscoped (``*`` among the globs): computed once
    unrestricted: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role))
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "unrestricted", "*" in self.models)

    @classmethod
    def anonymous(cls, role: Role = Role.ADMIN) -> Principal:
        """The caller when authentication is off (the server's default for a local demo): every model."""
        return cls("anonymous", role, ALL_MODELS, "anonymous")

    def allows_model(self, model: str) -> bool:
        return self.unrestricted or any(fnmatchcase(model, glob) for glob in self.models)

    def filter_models(self, names):
        """The names this principal may see, in their order (for listings: never reveal the others)."""
        return [n for n in names if self.allows_model(n)]

    def describe(self) -> str:
        """For audit records and logs: ``name (role, source[:key id])`` (never a secret)."""
        via = f"{self.source}:{self.key_id}" if self.key_id else self.source
        return f"{self.name} ({self.role}, {via})"


def out_of_scope_message(model: str) -> str:
    """The one message for a model outside the caller's scope, whether the model exists or not."""
    return f"permission denied: not allowed to access model {model[:200]!r}"


def authorize(principal: Principal, action: Action, model: str | None = None) -> None:
    """Raise ``PermissionDenied`` unless ``principal`` may do ``action`` (on ``model``, when given).

    ``model=None`` with a per-model action checks the role only (a listing the caller then filters
    with ``Principal.allows_model``). Never looks anything up: existence is not this function's
    business, which is why its answers cannot reveal it.
    """
    if principal.role < action.min_role:
        raise PermissionDenied(f"permission denied: role {principal.role} may not {action.description} "
                               f"(needs {action.min_role})")
    if action.global_scope and not principal.unrestricted:
        raise PermissionDenied(f"permission denied: a credential limited to some models may not "
                               f"{action.description}")
    if model is not None and not principal.allows_model(model):
        raise PermissionDenied(out_of_scope_message(model))
