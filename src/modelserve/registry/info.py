"""What the registry returns: plain pydantic records (JSON for ``--json`` and the REST API alike)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel

#: SQLite hands datetimes back without a zone; they were written in UTC
When = Annotated[datetime, AfterValidator(lambda d: d if d.tzinfo else d.replace(tzinfo=UTC))]


class VersionInfo(BaseModel):
    model: str
    version: int
    format: str
    filename: str
    artifact_uri: str
    digest: str
    size: int
    signature: dict = {}
    metrics: dict = {}
    tags: dict = {}
    config: dict | None = None
    description: str = ""
    created_by: str = ""
    created_at: When
    #: lineage: the version this one was derived from ("model:version" when in another model) and how
    parent: str | None = None
    step: str | None = None
    step_params: dict = {}
    aliases: list[str] = []


class AliasInfo(BaseModel):
    model: str
    alias: str
    version: int
    protected: bool = False
    canary_version: int | None = None
    #: share of requests (0..1) sent to ``canary_version``
    canary_weight: float = 0.0
    sticky_header: str | None = None
    updated_at: When
    #: set by the call that moved the alias: the version it pointed at just before (None when new)
    previous_version: int | None = None


class HistoryInfo(BaseModel):
    id: int
    at: When
    actor: str
    action: str
    model: str
    alias: str | None = None
    from_version: int | None = None
    to_version: int | None = None
    reason: str = ""
    details: dict = {}


class ModelSummary(BaseModel):
    name: str
    description: str = ""
    versions: int
    latest_version: int | None = None
    aliases: dict[str, int] = {}
    created_at: When


class ModelDetail(BaseModel):
    name: str
    description: str = ""
    created_by: str = ""
    created_at: When
    versions: list[VersionInfo]
    aliases: list[AliasInfo]
    history: list[HistoryInfo]


class ServedVersion(BaseModel):
    """What a serving process needs to materialize one version: where, which digest, which config."""

    version: int
    format: str
    filename: str
    artifact_uri: str
    digest: str
    config: dict | None = None


class ServingTarget(BaseModel):
    """An alias resolved for serving: the primary version and an optional weighted canary."""

    model: str
    alias: str
    primary: ServedVersion
    canary: ServedVersion | None = None
    canary_weight: float = 0.0
    sticky_header: str | None = None
