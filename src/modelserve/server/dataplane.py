"""The dataplane: every protocol's requests, once, on named numpy arrays.

Protocol adapters (REST, gRPC, and those later issues add) decode their wire format into an
``InferRequest`` and encode the ``InferResponse`` back; health, metadata, config, repository and
statistics answers are built here as plain dicts in the V2 vocabulary.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

import modelserve
from modelserve.datatypes import v2_name
from modelserve.errors import InvalidInput, ModelNotReady, ModelNotFound
from modelserve.logs import REQUEST_ID
from modelserve.server.config import ModelConfig, parse_override
from modelserve.server.models import ModelManager, ModelVersion
from modelserve.server.stages import infer_staged
from modelserve.server.stats import status_of

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
#: request parameters clients send that need no action from us
_ACCEPTED_RESERVED = {"triton_enable_empty_final_response"}


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str | None
    inputs: dict[str, np.ndarray]
    #: requested output names in order; None = every output
    outputs: list[str] | None = None
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    #: the transport's headers as it holds them, unparsed: ASGI's raw ``(bytes, bytes)`` pairs, or a
    #: function returning gRPC metadata ``(str, str)`` pairs (building them costs microseconds); read only
    #: when the model has a sticky canary split
    headers: Sequence[tuple] | Callable[[], Sequence[tuple]] | None = None
    #: which adapter carried it (metrics and payload-log label): v2-rest, v2-grpc, v1-rest, image-rest, pipeline
    protocol: str = "v2-rest"
    #: the peer, as the transport names it ("127.0.0.1:50312", gRPC's "ipv4:..."); None when unknown
    client: str | None = None
    #: the id the payload log, feedback and log lines use: the adapter's (an ``x-request-id`` header),
    #: else ``id``, else one the dataplane makes (``new_request_id``); adapters return it to the client
    request_id: str | None = None


#: request ids: a random prefix per process and a counter; unique without a syscall on the request
#: path (uuid4 reads os.urandom, and a syscall hands the GIL to the payload log's threads)
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):016x}"


def header_safe(request_id: str | None) -> str | None:
    """The request's ``id`` if it can travel as the X-Request-ID header / gRPC metadata (printable ASCII), else
    None: ``{"id": "a\\nb"}`` or ``"€"`` is echoed in the body as sent, the header gets an id of ours."""
    if request_id and request_id.isascii() and request_id.isprintable():
        return request_id
    return None


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict = field(default_factory=dict)


def server_metadata() -> dict:
    return {"name": "modelserve", "version": modelserve.__version__, "extensions": EXTENSIONS}


class Dataplane:
    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.ready = False  # true once start-up loading is done, false again while draining
        #: ``modelserve.monitor.payload_log.PayloadLog`` when the payload log is on (set by the server)
        self.payload_log = None

    # -- health and metadata ----------------------------------------------------------------

    server_metadata = staticmethod(server_metadata)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """True when ready; False when unloaded; ModelNotFound when the repository has no such model."""
        try:
            self.manager.get(model, version)
        except ModelNotReady:
            return False
        except ModelNotFound:
            if model not in self.manager.models and self.manager.in_repository(model):
                return False
            raise
        return True

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        mv = self.manager.get(model, version)
        cfg = mv.config
        versions = [mv.version_str] if version else [v.version_str for v in self.manager.models[model].ready_versions()]
        batch = [-1] if cfg.max_batch_size else []
        return {
            "name": model,
            "versions": versions,
            "platform": cfg.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": batch + t.dims} for t in cfg.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": batch + t.dims} for t in cfg.outputs],
        }

    def model_config(self, model: str, version: str | None = None) -> dict:
        return self.manager.get(model, version).config.to_triton()

    def statistics(self, model: str = "", version: str | None = None) -> dict:
        if model:
            if version:
                selected = [self.manager.get(model, version)]
            else:
                entry = self.manager.models.get(model)
                if entry is None:
                    raise ModelNotFound(f"Request for unknown model: '{model}' is not found")
                selected = entry.ready_versions()
        else:
            selected = [v for e in self.manager.models.values() for v in e.ready_versions()]
        return {"model_stats": [v.stats.as_dict(v.name, v.version_str) for v in selected]}

    # -- repository ---------------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        return self.manager.index(ready_only)

    async def load(self, model: str, parameters: dict | None = None) -> None:
        self.manager.require_explicit("loading a model")
        config: ModelConfig | None = None
        for key, value in (parameters or {}).items():
            if key == "config":
                if not isinstance(value, str):
                    raise InvalidInput("load parameter 'config' must be a string of model-config JSON")
                config = parse_override(value, model)
            elif key.startswith("file:"):
                raise InvalidInput("load parameter 'file:...' (model files in the request) is not supported; "
                                   "put the files in the model repository")
        await self.manager.load(model, config)

    async def unload(self, model: str) -> None:
        self.manager.require_explicit("unloading a model")
        await self.manager.unload(model)

    # -- inference ----------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """``_infer`` with a request id (in the log context while it runs), and its payload-log record,
        answered or failed. Pipeline steps are logged as their pipeline's request only."""
        if request.request_id is None:
            request.request_id = header_safe(request.id) or new_request_id()
        token = REQUEST_ID.set(request.request_id)
        payload_log = self.payload_log if request.protocol != "pipeline" else None
        started = time.perf_counter_ns()
        try:
            response = await self._infer(request)
        except BaseException as exc:
            if payload_log is not None:
                mv = self._served(request.model, request.version)
                payload_log.failed(request, mv.version_str if mv else request.version, mv.config if mv else None,
                                   exc, time.perf_counter_ns() - started)
            raise
        finally:
            REQUEST_ID.reset(token)
        if payload_log is not None:
            mv = self._served(response.model, response.version)
            payload_log.done(request, response, mv.config if mv else None, time.perf_counter_ns() - started)
        return response

    def _served(self, model: str, version: str | None) -> ModelVersion | None:
        """The version asked for, else the newest ready one (memory only): the payload log's settings and,
        for a failed request, the version it names."""
        entry = self.manager.models.get(model)
        if entry is None:
            return None
        if version:
            return entry.versions.get(int(version)) if version.isascii() and version.isdigit() else None
        ready = entry.ready_versions()
        return ready[-1] if ready else None

    async def _infer(self, request: InferRequest) -> InferResponse:
        for key in request.parameters:
            if key.startswith("triton_") and key not in _ACCEPTED_RESERVED:
                raise InvalidInput(f"parameter '{key}' is reserved (keys starting 'triton_' are)")
        mv = self.route(request)
        took = mv.stats  # in flight on the version that took it, even if its successor answers
        took.request_started(request.protocol)
        started = time.perf_counter_ns()
        parameters = None
        try:
            rows = check_inputs(mv.config, request.inputs)
            outputs = check_outputs(mv.config, request.outputs)
            try:
                if mv.stage is None and mv.pipeline is None:  # the plain path: straight to the batcher
                    results = await mv.infer(request.inputs, outputs, rows)
                else:
                    results, parameters = await self._around(mv, request, outputs, rows)
            except ModelNotReady:
                if mv.pipeline is not None:  # a step's own infer has retried already
                    raise
                # the version was swapped out between lookup and queueing: take its successor
                mv = self.route(request)
                results, parameters = await self._around(mv, request, outputs, rows)
        except BaseException as exc:
            mv.stats.request_done(False, time.perf_counter_ns() - started, request.protocol, status_of(exc), took)
            raise
        mv.stats.request_done(True, time.perf_counter_ns() - started, request.protocol, 200, took)
        # the version that answered
        return InferResponse(request.model, mv.version_str, results, request.id, parameters or {})

    async def _around(self, mv: ModelVersion, request: InferRequest, outputs: list[str] | None,
                      rows: int) -> tuple[dict[str, np.ndarray], dict | None]:
        """A version with per-request work: a pipeline's steps, or a stage around the batcher."""
        if mv.pipeline is not None:
            started = time.perf_counter_ns()
            results, parameters = await mv.pipeline.run(self, request.inputs, outputs, request.id)
            mv.stats.batch_done(1, rows, 0, 0, time.perf_counter_ns() - started, 0)
            return results, parameters
        if mv.stage is not None:
            return await infer_staged(mv, request.inputs, outputs), None
        return await mv.infer(request.inputs, outputs, rows), None

    def route(self, request: InferRequest) -> ModelVersion:
        """The version for a request; the sticky header is looked up only when the model's split has one."""
        key = None
        if request.version is None and request.headers:
            entry = self.manager.models.get(request.model)
            header = entry.split.sticky_header if entry is not None and entry.split is not None else None
            if header:
                headers = request.headers() if callable(request.headers) else request.headers
                key = header_value(headers or (), header)
        return self.manager.get(request.model, request.version, key)


def header_value(headers: Sequence[tuple], name: str) -> str | bytes | None:
    """The first value of header ``name`` (lower case) among ASGI byte pairs or gRPC metadata pairs."""
    raw = name.encode("latin-1")
    for key, value in headers:
        if key == raw or key == name:
            return value
    return None


def check_inputs(config: ModelConfig, inputs: dict[str, np.ndarray]) -> int:
    """Validate inputs against the config; return the batch size (1 for non-batching models)."""
    expected = {t.name: t for t in config.inputs}
    for name in inputs:
        if name not in expected:
            raise InvalidInput(f"unexpected input '{name}' for model '{config.name}'; its inputs are {list(expected)}")
    batching = bool(config.max_batch_size)
    rows = None
    for spec in config.inputs:
        array = inputs.get(spec.name)
        if array is None:
            if spec.optional:
                continue
            raise InvalidInput(f"missing input '{spec.name}' for model '{config.name}' (expects {list(expected)})")
        got = v2_name(array.dtype)
        if got != spec.datatype:
            raise InvalidInput(f"input '{spec.name}': expected datatype {spec.datatype}, got {got}")
        shape = list(array.shape)
        want = ([-1] if batching else []) + spec.dims
        if len(shape) != len(want) or any(w != -1 and w != s for w, s in zip(want, shape)):
            raise InvalidInput(f"input '{spec.name}': expected shape {want}, got {shape}"
                               + (" (the first dimension is the batch)" if batching else ""))
        if batching:
            if rows is not None and shape[0] != rows:
                raise InvalidInput(f"input '{spec.name}': batch size {shape[0]} differs from other inputs' {rows}")
            rows = shape[0]
    if batching:
        rows = rows or 0
        if not 1 <= rows <= config.max_batch_size:
            raise InvalidInput(f"batch size {rows} is outside 1..{config.max_batch_size} (max_batch_size of '{config.name}')")
        return rows
    return 1


def check_outputs(config: ModelConfig, requested: list[str] | None) -> list[str] | None:
    if not requested:
        return None
    names = {t.name for t in config.outputs}
    for name in requested:
        if name not in names:
            raise InvalidInput(f"unknown output '{name}' for model '{config.name}'; its outputs are {sorted(names)}")
    return requested

