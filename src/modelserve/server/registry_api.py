"""The registry's management REST API, under ``/v2/registry`` on a server that follows a registry.

Access control happens before these handlers, in ``access.py`` (read = reader, register / move an alias
= operator, delete a version = admin, all on the model in the path); here only what needs the body:
``force`` (moving a protected alias) or ``protect`` (changing the protection) needs an admin, and the
listings are filtered to the caller's models. Handlers stay thin: each registry call runs in a worker thread
(the database and the artifact store are blocking I/O), errors are the registry's ``ModelServeError``
subclasses, which ``rest.py`` maps to 400/404/409, and every change pokes the follower so this server
swaps at once instead of at its next poll (other servers see it at theirs).

Every change is written to the audit log (``security/audit.py``: ``registry.register``,
``registry.delete_version``, ``alias.set``, ``alias.delete``, ``alias.promote``, ``alias.rollback``, with
``ok`` and the versions moved) and the registry history names the caller (the key's name) as its actor;
with authentication off the history keeps the registry's own actor and the audit log says ``anonymous``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import IntegrityError, OperationalError

from modelserve.errors import Conflict, InvalidInput, ModelNotReady, PayloadTooLarge
from modelserve.registry import AliasInfo, HistoryInfo, ModelDetail, ModelSummary, Registry, VersionInfo
from modelserve.security import Action, authorize
from modelserve.server.access import principal_of

if TYPE_CHECKING:
    from modelserve.security.audit import AuditLog

T = TypeVar("T")
WRITE_CHUNK = 4 << 20


class AliasRequest(BaseModel):
    """Point an alias at a version (number or another alias), optionally with a weighted canary."""

    model_config = ConfigDict(extra="forbid")
    version: int | str
    canary: int | str | None = None
    #: share of requests (0..1, exclusive) sent to ``canary``
    weight: float = 0.0
    #: requests carrying this header always get the same version (by a hash of its value)
    sticky_header: str | None = None
    #: protect (true) or unprotect (false) the alias; null leaves it as it is
    protect: bool | None = None
    #: needed, with a reason, to move a protected alias
    force: bool = False
    reason: str = ""


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "staging"
    target: str = "production"
    force: bool = False
    reason: str = ""


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = "production"
    force: bool = False
    reason: str = ""


class RegistryUnavailable(ModelNotReady):
    """The registry database cannot be reached (503): the server keeps serving what it has loaded."""


_UPLOAD_BODY = {"requestBody": {"required": True, "description": "the model file's bytes",
                                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}}}


def registry_router(registry: Registry, on_change: Callable[[], None], max_request_bytes: int,
                    status: Callable[[], dict] | None = None, audit: AuditLog | None = None) -> APIRouter:
    router = APIRouter(prefix="/v2/registry", tags=["registry"])

    def audited(request: Request, action: str, name: str, **detail):
        """``async with`` around a change: its audit row (``ok`` or the error) once it ends."""
        if audit is None:
            return contextlib.nullcontext({})
        client = request.client
        return audit.action(principal_of(request), action, name, detail,
                            f"{client.host}:{client.port}" if client else None)

    def actor(request: Request) -> str | None:
        """Who the registry history names: the caller; None (the registry's own actor) with auth off."""
        principal = principal_of(request)
        return None if principal.source == "anonymous" else principal.name

    async def call(fn: Callable[..., T], *args, **kwargs) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OperationalError as exc:
            raise RegistryUnavailable(f"registry database unavailable: {exc.orig or exc}") from None
        except IntegrityError as exc:  # a race the registry's retries did not settle
            raise Conflict(f"conflicting change, try again: {exc.orig or exc}") from None

    async def change(fn: Callable[..., T], *args, **kwargs) -> T:
        result = await call(fn, *args, **kwargs)
        on_change()
        return result

    def protected(request: Request, name: str, force: bool, protect: bool | None = None) -> None:
        """``force`` moves a protected alias and ``protect`` changes the protection: admin only."""
        if force or protect is not None:
            authorize(principal_of(request), Action.MOVE_PROTECTED_ALIAS, name)

    @router.get("/models", response_model=list[ModelSummary], summary="List registered models")
    async def list_models(request: Request):
        principal = principal_of(request)
        return [m for m in await call(registry.list_models) if principal.allows_model(m.name)]

    @router.get("/models/{name}", response_model=ModelDetail, summary="A model: versions, aliases, recent history")
    async def show(name: str, history_limit: int = 50):
        return await call(registry.show, name, history_limit=history_limit)

    @router.post("/models/{name}/versions", response_model=VersionInfo, status_code=201,
                 summary="Register a version by uploading its file (raw body)", openapi_extra=_UPLOAD_BODY)
    async def register(request: Request, name: str, filename: str = "model.onnx", from_version: str | None = None,
                       step: str | None = None, description: str = "", format: str | None = None):
        if Path(filename).name != filename or filename in ("", ".", ".."):
            raise InvalidInput(f"filename '{filename}' must be a plain file name such as model.onnx")
        folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="modelserve-upload-"))
        try:
            path = folder / filename
            await _save_upload(request, path, max_request_bytes)
            async with audited(request, "registry.register", name, filename=filename, from_version=from_version,
                               step=step, format=format) as detail:
                info = await change(registry.register, path, name, from_version=from_version, step=step,
                                    description=description, format=format, actor=actor(request))
                detail.update(version=info.version, digest=info.digest)
            return info
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    @router.get("/models/{name}/versions/{version}", response_model=VersionInfo,
                summary="A version, by number or by an alias naming it")
    async def version(name: str, version: str):
        return await call(registry.version, name, version)

    @router.delete("/models/{name}/versions/{version}", status_code=204,
                   summary="Delete a version (409 while an alias points at it)")
    async def delete_version(request: Request, name: str, version: int, reason: str = ""):
        async with audited(request, "registry.delete_version", name, version=version, reason=reason):
            await change(registry.delete_version, name, version, reason=reason, actor=actor(request))
        return Response(status_code=204)

    @router.get("/models/{name}/versions/{version}/lineage", response_model=list[VersionInfo],
                summary="The version and the versions it was derived from, newest first")
    async def lineage(name: str, version: str):
        return await call(registry.lineage, name, version)

    @router.get("/models/{name}/aliases/{alias}", response_model=AliasInfo, summary="Where an alias points")
    async def get_alias(name: str, alias: str):
        return await call(registry.alias, name, alias)

    @router.put("/models/{name}/aliases/{alias}", response_model=AliasInfo,
                summary="Point an alias at a version, with an optional canary (409 if protected without force)")
    async def set_alias(request: Request, name: str, alias: str, body: AliasRequest):
        protected(request, name, body.force, body.protect)
        async with audited(request, "alias.set", name, alias=alias, to=body.version, canary=body.canary,
                           weight=body.weight, protect=body.protect, force=body.force, reason=body.reason) as detail:
            info = await change(registry.set_alias, name, alias, body.version, canary=body.canary,
                                weight=body.weight, sticky_header=body.sticky_header, protect=body.protect,
                                force=body.force, reason=body.reason, actor=actor(request))
            detail.update({"from": info.previous_version, "to": info.version})
        return info

    @router.delete("/models/{name}/aliases/{alias}", status_code=204,
                   summary="Delete an alias (servers following it unload the model)")
    async def delete_alias(request: Request, name: str, alias: str, force: bool = False, reason: str = ""):
        protected(request, name, force)
        async with audited(request, "alias.delete", name, alias=alias, force=force, reason=reason):
            await change(registry.delete_alias, name, alias, force=force, reason=reason, actor=actor(request))
        return Response(status_code=204)

    @router.post("/models/{name}/promote", response_model=AliasInfo,
                 summary="Point the target alias at the source alias's version (staging -> production)")
    async def promote(request: Request, name: str, body: Annotated[PromoteRequest | None, Body()] = None):
        body = body or PromoteRequest()
        protected(request, name, body.force)
        async with audited(request, "alias.promote", name, alias=body.target, source=body.source, force=body.force,
                           reason=body.reason) as detail:
            info = await change(registry.promote, name, body.source, body.target, force=body.force,
                                reason=body.reason, actor=actor(request))
            detail.update({"from": info.previous_version, "to": info.version})
        return info

    @router.post("/models/{name}/rollback", response_model=AliasInfo,
                 summary="Move an alias back to the version it pointed at before its last move")
    async def rollback(request: Request, name: str, body: Annotated[RollbackRequest | None, Body()] = None):
        body = body or RollbackRequest()
        protected(request, name, body.force)
        async with audited(request, "alias.rollback", name, alias=body.alias, force=body.force,
                           reason=body.reason) as detail:
            info = await change(registry.rollback, name, body.alias, force=body.force, reason=body.reason,
                                actor=actor(request))
            detail.update({"from": info.previous_version, "to": info.version})
        return info

    @router.get("/models/{name}/history", response_model=list[HistoryInfo], summary="The model's history, newest first")
    async def history(name: str, alias: str | None = None, limit: int | None = 100):
        return await call(registry.history, name, alias, limit)

    if status is not None:
        @router.get("/serving", summary="What this server serves from the registry (its follower's view)")
        async def serving(request: Request) -> dict:
            doc, principal = status(), principal_of(request)
            if not principal.unrestricted:
                doc["models"] = {k: v for k, v in doc["models"].items() if principal.allows_model(k)}
            return doc

    return router


async def _save_upload(request: Request, path: Path, limit: int) -> None:
    """Stream the raw body to ``path`` (writes in a worker thread), refusing more than ``limit`` bytes."""
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise InvalidInput("send the model file as the raw body (Content-Type: application/octet-stream), not a form")
    if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise InvalidInput("compressed uploads are not supported: send the file as it is")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    size, buffer = 0, bytearray()
    out = await asyncio.to_thread(open, path, "wb")
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
            buffer += chunk
            if len(buffer) >= WRITE_CHUNK:
                await asyncio.to_thread(out.write, buffer)
                buffer.clear()
        if buffer:
            await asyncio.to_thread(out.write, buffer)
    finally:
        await asyncio.to_thread(out.close)
    if size == 0:
        raise InvalidInput("empty upload: send the model file's bytes as the request body")
