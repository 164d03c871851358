"""V2 / Open Inference Protocol over HTTP, with Triton's binary tensor extension and compression.

A thin adapter: wire bytes -> ``InferRequest`` -> dataplane -> ``InferResponse`` -> wire bytes.
Every error leaves as ``{"error": "..."}`` with the status of its ``ModelServeError`` class.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import zlib
from typing import TYPE_CHECKING

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from modelserve.datatypes import NUMPY_OF, from_json, from_wire, to_json, to_wire, v2_name
from modelserve.errors import (DeadlineExceeded, InvalidInput, ModelServeError, PayloadTooLarge, RateLimited,
                               RequestTimeout, Unsupported)
from modelserve.monitor.metrics import Metrics
from modelserve.security import Action
from modelserve.server.access import filter_names, principal_of, send_error
from modelserve.server.dataplane import Dataplane, InferRequest, InferResponse, new_request_id
from modelserve.server.limits import OTHER_INFER_PATH

if TYPE_CHECKING:
    from modelserve.server.access import Access
    from modelserve.server.limits import Limits
    from modelserve.registry import Registry
    from modelserve.server.registry_follower import RegistryFollower

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
_JSON_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def json_response(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


def error_parts(exc: ModelServeError) -> tuple[int, bytes, dict]:
    headers = {"Content-Type": "application/json"}
    retry_after = getattr(exc, "retry_after_s", None)  # QueueFull (503), RateLimited (429)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    extra = getattr(exc, "headers", None)  # Unauthenticated: WWW-Authenticate: Bearer
    if extra:
        headers.update(extra)
    return exc.http_status, orjson.dumps({"error": exc.message}), headers


def error_response(exc: ModelServeError) -> Response:
    status, body, headers = error_parts(exc)
    return Response(body, status, headers)


def create_app(dataplane: Dataplane, max_request_bytes: int, registry: Registry | None = None,
               follower: RegistryFollower | None = None, metrics: Metrics | None = None,
               access: Access | None = None, limits: Limits | None = None, audit=None) -> "InferRoute":
    """The HTTP app; with a ``registry`` (and the ``follower`` serving it) also the management API.
    ``GET /metrics`` serves ``metrics`` (default: a ``Metrics`` of the dataplane's models).
    ``access``: authentication and access rules (``server/access.py``), checked in ``InferRoute``; None: off.
    ``limits``: rate limits, concurrency caps and deadlines (``server/limits.py``); None: none.
    ``audit``: the ``security.audit.AuditLog`` management actions are recorded in; None: not recorded."""
    metrics = metrics or Metrics(dataplane.manager)
    app = FastAPI(title="modelserve", version=dataplane.server_metadata()["version"],
                  description="KServe V2 / Open Inference Protocol with Triton's extensions")

    @app.exception_handler(ModelServeError)
    async def _known(_, exc: ModelServeError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return json_response({"error": str(exc.detail)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        return json_response({"error": str(exc)}, 400)

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        log.exception("unexpected error")
        return json_response({"error": f"internal error: {exc}"}, 500)

    # -- health and metadata -------------------------------------------------------------------

    @app.get("/v2/health/live")
    async def live():
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    async def ready():
        if dataplane.ready:
            return json_response({"ready": True})
        return json_response({"error": "server is not ready"}, 503)

    @app.get("/v2")
    async def server_metadata():
        return json_response(dataplane.server_metadata())

    @app.get("/v2/models")
    async def list_models(request: Request):
        return json_response({"models": filter_names(principal_of(request), sorted(dataplane.manager.models))})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request):  # copied on the loop, rendered in the metrics thread
        body, content_type = await metrics.scrape(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v2/models/stats")
    async def all_stats(request: Request):
        return json_response(filter_stats(principal_of(request), dataplane.statistics()))

    def versioned(path: str, method: str = "GET"):
        """Register a handler on ``/v2/models/{model}<path>`` and ``.../versions/{version}<path>``."""
        def register(handler):
            for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:int}"):
                app.add_api_route(prefix + path, handler, methods=[method], include_in_schema=True)
            return handler
        return register

    @versioned("/ready")
    async def model_ready(model: str, version: int | None = None):
        if dataplane.model_ready(model, _v(version)):
            return json_response({"name": model, "ready": True})
        return json_response({"error": f"model '{model}' is not ready"}, 503)

    @versioned("")
    async def model_metadata(model: str, version: int | None = None):
        return json_response(dataplane.model_metadata(model, _v(version)))

    @versioned("/config")
    async def model_config(model: str, version: int | None = None):
        return json_response(dataplane.model_config(model, _v(version)))

    @versioned("/stats")
    async def model_stats(model: str, version: int | None = None):
        return json_response(dataplane.statistics(model, _v(version)))

    # -- repository ----------------------------------------------------------------------------

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        doc = json_object(await read_body(request.headers, request.stream(), max_request_bytes), allow_empty=True)
        rows = dataplane.repository_index(bool(doc.get("ready", False)))
        principal = principal_of(request)
        return json_response(rows if principal.unrestricted else [r for r in rows if principal.allows_model(r["name"])])

    @app.post("/v2/repository/models/{model}/load")
    async def load(request: Request, model: str):
        doc = json_object(await read_body(request.headers, request.stream(), max_request_bytes), allow_empty=True)
        params = doc.get("parameters") or {}
        names = sorted(str(k) for k in params) if isinstance(params, dict) else None  # names only: no file bytes
        async with _audited(audit, request, "model.load", model, parameters=names):
            await dataplane.load(model, params)
        return json_response({"name": model, "load": True})

    @app.post("/v2/repository/models/{model}/unload")
    async def unload(request: Request, model: str):
        json_object(await read_body(request.headers, request.stream(), max_request_bytes), allow_empty=True)
        async with _audited(audit, request, "model.unload", model):
            await dataplane.unload(model)
        return json_response({"name": model, "unload": True})

    @app.api_route("/v2/repository/{repository}/models/{model}/{action}", methods=["POST"], include_in_schema=False)
    async def named_repository(repository: str, model: str, action: str):
        raise Unsupported("named repositories are not supported; use /v2/repository/models/...")

    from modelserve.server.v1_rest import v1_router  # here: v1_rest imports this module's helpers

    app.include_router(v1_router(dataplane, max_request_bytes))  # TF Serving REST + KServe V1 under /v1
    from modelserve.server.image_rest import image_router

    app.include_router(image_router(dataplane, max_request_bytes))  # images in, labels/boxes/masks out

    if registry is not None:
        from modelserve.server.registry_api import registry_router

        app.include_router(registry_router(registry, follower.poke if follower else (lambda: None),
                                           max_request_bytes, follower.status if follower else None, audit))

    from modelserve.server.monitor_api import monitor_router

    app.include_router(monitor_router(dataplane, max_request_bytes))  # feedback, quality, payload-log queries
    from modelserve.server.dashboard import dashboard_router

    app.include_router(dashboard_router(dataplane, metrics))  # the /dashboard page and its /v2/dashboard document
    document_infer(app)  # in /openapi.json only: InferRoute answers these paths before FastAPI sees them
    return InferRoute(app, dataplane, max_request_bytes, access, limits)


_PARAMETER_VALUE = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_PARAMETERS = {"type": "object", "additionalProperties": _PARAMETER_VALUE}
_ERROR = {"description": "", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
#: the V2 InferenceRequest JSON (PROTOCOLS.md §2.5; binary tensors §3)
INFER_REQUEST_SCHEMA = {
    "title": "InferenceRequest", "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "request id, echoed in the response"},
        "parameters": {**_PARAMETERS, "description": "request parameters: binary_data_output (bool), custom keys; "
                       "keys starting 'triton_' are reserved"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "title": "RequestInput", "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                          "description": "the full shape, batch dimension included"},
                "datatype": {"type": "string", "enum": list(NUMPY_OF)},
                "parameters": {**_PARAMETERS, "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                               "description": "binary_data_size: this tensor's bytes follow the JSON (binary extension)"},
                "data": {"type": "array", "description": "row-major tensor data, flat or nested to match the shape"},
            }}},
        "outputs": {"type": "array", "description": "absent: every output", "items": {
            "title": "RequestOutput", "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"},
                           "parameters": {**_PARAMETERS, "properties": {"binary_data": {"type": "boolean"}}}}}},
    },
}
INFER_RESPONSE_SCHEMA = {
    "title": "InferenceResponse", "type": "object", "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "outputs": {"type": "array", "items": {
            "title": "ResponseOutput", "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                           "datatype": {"type": "string", "enum": list(NUMPY_OF)}, "parameters": _PARAMETERS,
                           "data": {"type": "array"}}}},
    },
}


def document_infer(app: FastAPI) -> None:
    """``POST /v2/models/{model}[/versions/{version}]/infer`` in the OpenAPI schema. ``InferRoute`` answers
    every request to these paths itself, so the FastAPI routes registered here are never called (and declare
    their parameters in ``openapi_extra`` only: no FastAPI validation, no 422 in the schema)."""
    async def infer():  # pragma: no cover - InferRoute takes these paths first
        raise MethodNotAllowed("served by the infer route")

    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "schema": {"type": "integer", "minimum": 1},
              "description": "binary tensor extension: the JSON is this many bytes, binary tensors follow it"}
    body = {"required": True, "content": {"application/json": {"schema": INFER_REQUEST_SCHEMA}}}
    responses = {
        200: {"description": "the outputs (binary ones after the JSON, with Inference-Header-Content-Length)",
              "content": {"application/json": {"schema": INFER_RESPONSE_SCHEMA}}},
        400: {**_ERROR, "description": "malformed request: JSON, shapes, datatypes, sizes, names, parameters"},
        404: {**_ERROR, "description": "unknown model or version"},
        413: {**_ERROR, "description": "request body (declared, received or decompressed) over the size limit"},
        501: {**_ERROR, "description": "an extension this server does not support (shared memory, classification)"},
        503: {**_ERROR, "description": "model not ready, or its queue is full (Retry-After)"},
    }
    for path, operation_id, parameters in (("/v2/models/{model}/infer", "infer", [model, header]),
                                           ("/v2/models/{model}/versions/{version:int}/infer", "infer_version",
                                            [model, version, header])):
        app.add_api_route(path, infer, methods=["POST"], summary="Inference (V2 / Open Inference Protocol)",
                          operation_id=operation_id, responses=responses,
                          openapi_extra={"parameters": parameters, "requestBody": body})


def filter_stats(principal, doc: dict) -> dict:
    """A statistics document with only the caller's models."""
    if principal.unrestricted:
        return doc
    return {**doc, "model_stats": [s for s in doc["model_stats"] if principal.allows_model(s["name"])]}


class MethodNotAllowed(ModelServeError):
    http_status = 405


INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?/infer$")


class InferRoute:
    """The hot path, ``POST /v2/models/{m}[/versions/{v}]/infer``, as a bare ASGI app in front of
    FastAPI: FastAPI's routing and middleware cost more CPU than the whole request otherwise
    (profiled under perf_analyzer). Every other path goes to the FastAPI app.

    It is also where HTTP authentication and access control happen, for every path (``access.py``),
    before anything else: with ``access`` None (authentication off) one attribute test. Then the limits
    (``limits.py``): the caller's rate, the model's in-flight cap, the body and answer deadlines, for
    this route and for the other inference routes (``/v1/models/...``, ``/models/{m}/predict``)."""

    def __init__(self, app: FastAPI, dataplane: Dataplane, max_request_bytes: int, access: Access | None = None,
                 limits: Limits | None = None):
        self.app = app
        self.dataplane = dataplane
        self.limit = max_request_bytes
        self.access = access
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        match = INFER_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            principal = None
            if self.access is not None and scope["type"] == "http":
                try:
                    principal = self.access.check_http(scope, _authorization(scope))
                except ModelServeError as exc:
                    return await send_error(send, exc, error_parts)
                scope.setdefault("state", {})["principal"] = principal
            if self.limits is not None and scope["type"] == "http" and scope["method"] == "POST":
                other = OTHER_INFER_PATH.match(scope["path"])
                if other is not None:
                    return await self._limited(scope, receive, send, other.group(1) or other.group(2), principal)
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        model, version = match.group(1), match.group(2)
        request_id = headers.get("x-request-id") or None
        name = None  # the caller's name for the limits: None = anonymous (authentication off)
        if self.access is not None:  # before the model is looked up: one 403 whether it exists or not
            try:
                name = self.access.check(headers.get("authorization"), Action.INFER, model).name
            except ModelServeError as exc:  # not the model's request: no payload-log row
                return await send_error(send, exc, error_parts)
        limits = self.limits
        if limits is not None and limits.rate:
            try:
                limits.check_rate(name, _host(scope))
            except RateLimited as exc:  # refused at the door, like a 401: no payload-log row
                return await send_error(send, exc, error_parts)
        request = None
        held = False  # holds one of the model's in-flight slots: given back once the answer is sent
        try:
            try:
                if scope["method"] != "POST":
                    raise MethodNotAllowed("Method Not Allowed")
                mv = self.dataplane.manager.get(model, version)  # unknown or unready model: say so before parsing
                deadline = None
                if limits is not None:
                    held = limits.acquire(model, mv.config, name)
                    deadline = limits.deadline(limits.body_timeout_s)
                body_done = False
                try:
                    body = await read_body(headers, _chunks(receive), self.limit)
                    body_done = True
                    if deadline is not None:
                        deadline.move(limits.request_timeout_s)
                    request, binary_outputs = parse_infer(body, headers.get(HEADER_LENGTH), model, version)
                    request.headers = scope["headers"]  # for a sticky canary split; parsed only then
                    request.client = peer(scope)
                    request.request_id = request_id
                    response = await self.dataplane.infer(request)
                except asyncio.CancelledError:
                    if deadline is None or not deadline.expired:
                        raise
                    deadline.uncancel()
                    raise _timed_out(limits, body_done) from None
                finally:  # no await between the guarded ones and this: the timer cannot fire elsewhere
                    if deadline is not None:
                        deadline.stop()
                request_id = request.request_id
                content, out = compress(headers.get("accept-encoding", ""), *encode_infer(response, binary_outputs))
                status = 200
            except ModelServeError as exc:
                status, content, out = error_parts(exc)
                if isinstance(exc, RateLimited):  # the model's cap: refused at the door, no payload-log row
                    request_id = request_id or new_request_id()
                else:
                    request_id = self._rejected(request, request_id, model, version, scope, exc)
            except Exception as exc:  # noqa: BLE001 - the server answers, whatever happened
                log.exception("unexpected error in infer")
                status, content, out = 500, orjson.dumps({"error": f"internal error: {exc}"}), {"Content-Type": "application/json"}
                request_id = self._rejected(request, request_id, model, version, scope, exc)
            raw_headers = [(k.lower().encode(), v.encode()) for k, v in out.items()]
            raw_headers.append((b"x-request-id", request_id.encode("latin-1")))
            raw_headers.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            if held:
                limits.release(model)

    async def _limited(self, scope, receive, send, model: str, principal) -> None:
        """The FastAPI inference routes (TF Serving / KServe V1, image uploads) under the same limits as
        the V2 route: rate, the model's cap, and the deadlines (408 before the body is in, 504 after;
        only while nothing has been sent)."""
        limits = self.limits
        name = principal.name if principal is not None else None
        try:
            limits.check_rate(name, _host(scope))
            try:
                config = self.dataplane.manager.get(model).config
            except ModelServeError:  # unknown, unready: the route itself says so
                config = None
            held = config is not None and limits.acquire(model, config, name)
        except RateLimited as exc:
            return await send_error(send, exc, error_parts)
        timer = asyncio.timeout(limits.body_timeout_s)
        body_done = started = False

        async def receive_timed():
            nonlocal body_done
            message = await receive()
            if not body_done and (message["type"] != "http.request" or not message.get("more_body", False)):
                body_done = True
                timer.reschedule(_deadline(limits.request_timeout_s))
            return message

        async def send_tracked(message):
            nonlocal started
            started = True
            await send(message)

        try:
            async with timer:
                await self.app(scope, receive_timed, send_tracked)
        except TimeoutError:
            if not timer.expired():
                raise
            if not started:
                await send_error(send, _timed_out(limits, body_done), error_parts)
        finally:
            if held:
                limits.release(model)

    def _rejected(self, request: InferRequest | None, request_id: str | None, model: str, version: str | None,
                  scope, exc: Exception) -> str:
        """A request that failed before the dataplane saw it still gets an id and a payload-log row."""
        if request is not None and request.request_id is not None:
            return request.request_id  # the dataplane logged it
        request_id = request_id or new_request_id()
        if self.dataplane.payload_log is not None:
            self.dataplane.payload_log.rejected(model, version, "v2-rest", peer(scope), request_id, exc)
        return request_id


def _deadline(seconds: float | None) -> float | None:
    """``seconds`` from now on the loop's clock, for ``asyncio.Timeout.reschedule`` (None: no deadline)."""
    return asyncio.get_running_loop().time() + seconds if seconds else None


def _timed_out(limits: Limits, body_done: bool) -> ModelServeError:
    if not body_done:
        return RequestTimeout(f"the request body did not arrive within {limits.body_timeout_s:g} s")
    return DeadlineExceeded(f"no answer within the request timeout of {limits.request_timeout_s:g} s")


def _host(scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def _authorization(scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization" or key.lower() == b"authorization":
            return value.decode("latin-1")
    return None


async def _chunks(receive):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("client disconnected while sending the body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _v(version: int | None) -> str | None:
    return None if version is None else str(version)


async def read_body(headers, chunks, limit: int) -> bytes:
    """The body from an async iterator of chunks, decompressed, refusing anything past ``limit``
    bytes (declared, received, and after decompression). ``headers``: lower-case names."""
    declared = headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    parts, size = [], 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            parts.append(chunk)
    except ClientDisconnect:  # FastAPI routes' request.stream(); InferRoute's _chunks says so itself
        raise InvalidInput("client disconnected while sending the body") from None
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        inflater = zlib.decompressobj(wbits)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise InvalidInput(f"request body is truncated {encoding} data (the stream does not end)")
    elif encoding not in ("identity", ""):
        raise InvalidInput(f"unsupported Content-Encoding '{encoding}' (use gzip, deflate or none)")
    return body


def compress(accepted: str, content: bytes, headers: dict) -> tuple[bytes, dict]:
    """Compress a response body when the client's Accept-Encoding allows it."""
    if "gzip" in accepted:
        content, headers["Content-Encoding"] = gzip.compress(content, 1), "gzip"
    elif "deflate" in accepted:
        content, headers["Content-Encoding"] = zlib.compress(content, 1), "deflate"
    return content, headers


def json_object(raw: bytes | memoryview, allow_empty: bool = False) -> dict:
    if allow_empty and not len(raw):
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # NaN / Infinity tokens, which orjson refuses and Python clients may send
            doc = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidInput("request body is not valid JSON: arrays/objects nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


def parse_infer(body: bytes, header_length: str | None, model: str, version: str | None) -> tuple[InferRequest, dict]:
    """Body (JSON, or JSON + binary tensors) -> request, and each output's binary flag."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if not (header_length.isascii() and header_length.isdigit()):
            raise InvalidInput(f"Inference-Header-Content-Length '{header_length}' is not a non-negative integer")
        size = int(header_length)
        if size == 0:
            raise InvalidInput("Inference-Header-Content-Length 0 (a raw binary body without JSON) is not supported")
        if size > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {size} exceeds the body's {len(body)} bytes")
        view = memoryview(body)
        json_part, binary = view[:size], view[size:]
    doc = json_object(json_part)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' array")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        name, datatype, shape = _tensor_header(item)
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears twice")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"input '{name}': 'parameters' must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} but only {len(binary) - offset} bytes remain")
            inputs[name] = from_wire(binary[offset:offset + size], datatype, shape, name)
            offset += size
        elif "shared_memory_region" in params:
            raise Unsupported(f"input '{name}': shared memory is not supported")
        elif "data" in item:
            inputs[name] = from_json(item["data"], datatype, shape, name)
        else:
            raise InvalidInput(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    default_binary = bool(params.get("binary_data_output", False))
    binary_of: dict = {}
    requested = doc.get("outputs")
    names = None
    if requested:
        if not isinstance(requested, list):
            raise InvalidInput("'outputs' must be an array")
        names = []
        for out in requested:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInput("each requested output needs a 'name'")
            oparams = out.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise InvalidInput(f"output '{out['name']}': 'parameters' must be an object")
            if "classification" in oparams:
                raise Unsupported(f"output '{out['name']}': the classification extension is not supported")
            if "shared_memory_region" in oparams:
                raise Unsupported(f"output '{out['name']}': shared memory is not supported")
            names.append(out["name"])
            binary_of[out["name"]] = bool(oparams.get("binary_data", default_binary))
    binary_of[None] = default_binary
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(model, version, inputs, names, request_id, params), binary_of


def _tensor_header(item) -> tuple[str, str, list[int]]:
    if not isinstance(item, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype")
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidInput("an input has no 'name'")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be an array of non-negative integers, got {shape!r}")
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY_OF:  # V2 names only, exact case
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r} (expected one of {list(NUMPY_OF)})")
    return name, datatype, shape


def encode_infer(response: InferResponse, binary_of: dict) -> tuple[bytes, dict]:
    """Response -> body and headers; binary outputs follow the JSON (binary tensor extension)."""
    outputs = []
    chunks = []
    default_binary = binary_of[None]
    for name, array in response.outputs.items():
        datatype = v2_name(array.dtype)
        entry: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary_of.get(name, default_binary):
            raw = to_wire(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype in ("BYTES", "BF16"):
            entry["data"] = to_json(array)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    doc: dict = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=_JSON_NUMPY)
    if not any(len(c) for c in chunks):
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _audited(audit, request: Request, action: str, model: str, **detail):
    """``async with`` around a management action: its audit row (``security/audit.py``) once it ends."""
    if audit is None:
        return contextlib.nullcontext({})
    return audit.action(principal_of(request), action, model, detail, peer(request.scope))


def peer(scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None
