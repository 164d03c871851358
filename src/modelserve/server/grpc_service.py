"""V2 / Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` as tritonclient calls it.

Our messages live in the protobuf package ``modelserve.v2`` (see proto/inference.proto for why);
the handlers are registered under Triton's service name, so clients see the usual method paths.
Tensors arrive in ``raw_input_contents`` (or typed ``contents``) and leave in ``raw_output_contents``.

Authentication and access control (when the server has them): the ``authorization`` metadata key,
checked by ``_mapped`` for every unary RPC against ``access.GRPC_RULES`` before the handler runs (so
before any model lookup), and for each message of ``ModelStreamInfer``. Health RPCs stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelserve.datatypes import NUMPY_OF, from_wire, reshape, to_wire, v2_name
from modelserve.errors import DeadlineExceeded, InvalidInput, ModelServeError, RateLimited
from modelserve.server.access import ANONYMOUS, Access
from modelserve.server.dataplane import Dataplane, InferRequest, InferResponse, header_safe, new_request_id
from modelserve.server.limits import Limits, client_host
from modelserve.server.proto import inference_pb2 as pb
from modelserve.server.proto import model_config_pb2

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
MAX_MESSAGE = 2**31 - 1
_TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _mapped(method):
    """Check the caller (``access.GRPC_RULES``) and turn our errors into gRPC status codes, once for every
    unary RPC. The handler finds the caller in ``self.principal()`` (for listings)."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            if self.access is not None:
                _PRINCIPAL.set(self.access.check_grpc(name, request, context))
            return await method(self, request, context)
        except ModelServeError as exc:
            retry_after = getattr(exc, "retry_after_s", None)  # RateLimited, QueueFull: when to come back
            if retry_after:
                context.set_trailing_metadata((*(context.trailing_metadata() or ()), ("retry-after", str(retry_after))))
            await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)
        except Exception as exc:  # noqa: BLE001
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
    return wrapper


_PRINCIPAL: contextvars.ContextVar = contextvars.ContextVar("modelserve_grpc_principal", default=ANONYMOUS)


class InferenceService:
    def __init__(self, dataplane: Dataplane, access: Access | None = None, limits: Limits | None = None,
                 audit=None):
        self.dataplane = dataplane
        self.access = access
        self.limits = limits
        #: ``security.audit.AuditLog`` for load/unload (None: not recorded)
        self.audit = audit

    @staticmethod
    def principal():
        """The caller of the RPC being handled (anonymous when authentication is off)."""
        return _PRINCIPAL.get()

    @_mapped
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_mapped
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @_mapped
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version or None))

    @_mapped
    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.dataplane.server_metadata(), pb.ServerMetadataResponse())

    @_mapped
    async def ModelMetadata(self, request, context):
        _check_version(request.version)
        doc = self.dataplane.model_metadata(request.name, request.version or None)
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    @_mapped
    async def ModelConfig(self, request, context):
        _check_version(request.version)
        doc = self.dataplane.model_config(request.name, request.version or None)
        config = json_format.ParseDict(doc, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=config)

    @_mapped
    async def ModelStatistics(self, request, context):
        _check_version(request.version)
        doc = self.dataplane.statistics(request.name, request.version or None)
        principal = self.principal()
        if not request.name and not principal.unrestricted:
            doc["model_stats"] = [s for s in doc["model_stats"] if principal.allows_model(s["name"])]
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    @_mapped
    async def RepositoryIndex(self, request, context):
        rows, principal = self.dataplane.repository_index(request.ready), self.principal()
        if not principal.unrestricted:
            rows = [r for r in rows if principal.allows_model(r["name"])]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    @_mapped
    async def RepositoryModelLoad(self, request, context):
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        async with self._audited("model.load", request.model_name, context, parameters=sorted(params)):
            await self.dataplane.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    @_mapped
    async def RepositoryModelUnload(self, request, context):
        async with self._audited("model.unload", request.model_name, context):
            await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _audited(self, action: str, model: str, context, **detail):
        """``async with`` around a management action: its audit row (``security/audit.py``) once it ends."""
        if self.audit is None:
            return contextlib.nullcontext({})
        from modelserve.security.audit import client_address

        return self.audit.action(self.principal(), action, model, detail, client_address(context.peer()))

    @_mapped
    async def ModelInfer(self, request, context):
        held = False
        if self.limits is not None:  # refused at the door: an id, no payload-log row
            try:
                held = self._admit(request, context)
            except RateLimited:
                context.set_trailing_metadata((("x-request-id", header_safe(request.id) or new_request_id()),))
                raise
        try:
            try:
                _check_version(request.model_version)
                infer_request = decode_request(request, context)
            except ModelServeError as exc:  # refused before the dataplane: still an id and a payload-log row
                request_id = header_safe(request.id) or new_request_id()
                context.set_trailing_metadata((("x-request-id", request_id),))
                if self.dataplane.payload_log is not None:
                    self.dataplane.payload_log.rejected(request.model_name, request.model_version or None, "v2-grpc",
                                                        context.peer(), request_id, exc)
                raise
            try:
                return encode_response(await self._infer(infer_request, context))
            finally:  # trailing: sent with the status, no extra message on the wire
                context.set_trailing_metadata((("x-request-id", infer_request.request_id),))
        finally:
            if held:
                self.limits.release(request.model_name)

    def _admit(self, request, context) -> bool:
        """The caller's rate and the model's in-flight cap (``limits.py``); True: a slot to give back."""
        limits = self.limits
        name = self.principal().name if self.access is not None else None
        if limits.rate:
            limits.check_rate(name, client_host(context.peer()) if name is None else None)
        if self.dataplane.manager is None:  # a front for Ray Serve replicas: Ray's max_ongoing_requests caps them
            return False
        try:
            config = self.dataplane.manager.get(request.model_name, request.model_version or None).config
        except ModelServeError:  # unknown, unready, bad version: the dataplane says so, and logs it
            return False
        return limits.acquire(request.model_name, config, name)

    async def _infer(self, infer_request: InferRequest, context) -> InferResponse:
        """The dataplane's answer within the deadline: the client's (``time_remaining``) or the server's
        ``--request-timeout-s``, whichever is sooner; the waiting request is cancelled past it."""
        limits = self.limits
        seconds = limits.request_timeout_s if limits is not None else None
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and (seconds is None or remaining < seconds):
            if remaining <= 0:
                raise DeadlineExceeded("the client's deadline has passed")
            seconds = remaining
        if seconds is None:
            return await self.dataplane.infer(infer_request)
        try:
            async with asyncio.timeout(seconds) as timer:
                return await self.dataplane.infer(infer_request)
        except TimeoutError:
            if not timer.expired():
                raise
            raise DeadlineExceeded(f"no answer within the deadline of {seconds:.3g} s") from None

    async def ModelStreamInfer(self, requests, context):
        """Requests run concurrently; each answer (or in-stream error) carries the request's id."""
        answers: asyncio.Queue = asyncio.Queue()
        if self.access is not None:  # no credentials at all: refuse the stream before reading it
            metadata = context.invocation_metadata()
            try:
                self.access.authenticator.authenticate_metadata(metadata)
            except ModelServeError as exc:
                await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)

        async def answer(request) -> None:
            held = False
            try:
                if self.access is not None:  # each message: its model, and a key revoked mid-stream
                    _PRINCIPAL.set(self.access.check_grpc("ModelStreamInfer", request, context))
                if self.limits is not None:  # each message: the caller's rate, the model's cap
                    held = self._admit(request, context)
                _check_version(request.model_version)
                message = pb.ModelStreamInferResponse(
                    infer_response=encode_response(await self._infer(decode_request(request, context), context)))
            except Exception as exc:  # noqa: BLE001 - an error stays inside the stream
                text = exc.message if isinstance(exc, ModelServeError) else f"internal error: {exc}"
                message = pb.ModelStreamInferResponse(error_message=text, infer_response=pb.ModelInferResponse(
                    id=request.id, model_name=request.model_name, model_version=request.model_version))
            finally:
                if held:
                    self.limits.release(request.model_name)
            message.infer_response.parameters["triton_final_response"].bool_param = True
            answers.put_nowait(message)

        async def read() -> None:
            tasks, end = set(), None
            try:
                async for request in requests:
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except DecodeError as exc:  # a message that does not parse: answer the others, then end the stream
                end = exc
            finally:  # whatever happened, the stream ends (it used to wait for ever when reading failed)
                await asyncio.gather(*tasks)
                answers.put_nowait(end)

        reader = asyncio.create_task(read())
        try:
            while (message := await answers.get()) is not None:
                if isinstance(message, DecodeError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"a request is not a valid ModelInferRequest message: {message}")
                yield message
        finally:
            reader.cancel()


def _check_version(version: str) -> None:
    if version and not (version.isascii() and version.isdigit()):
        raise InvalidInput(f"model version '{version}' is not a number")


def _param_value(param):
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def decode_request(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None = None) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; need one per input")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, shape = tensor.name, list(tensor.shape)
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears twice")
        if tensor.datatype not in NUMPY_OF:
            raise InvalidInput(f"input '{name}': unknown datatype '{tensor.datatype}' (expected one of {list(NUMPY_OF)})")
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(f"input '{name}': typed contents and raw_input_contents both; send one of them")
            inputs[name] = from_wire(raw[i], tensor.datatype, shape, name)
        else:
            inputs[name] = _from_contents(tensor, shape)
    outputs = [o.name for o in request.outputs] or None
    params = {k: _param_value(v) for k, v in request.parameters.items()}
    headers = context.invocation_metadata if context is not None else None  # called only for a sticky split
    return InferRequest(request.model_name, request.model_version or None, inputs, outputs, request.id, params,
                        headers, "v2-grpc", context.peer() if context is not None else None)


def _from_contents(tensor, shape: list[int]) -> np.ndarray:
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input '{tensor.name}': {tensor.datatype} has no typed contents; send raw_input_contents")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input '{tensor.name}': got {len(values)} elements in contents, shape {shape} needs {count}")
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    else:
        try:
            array = np.array(values, dtype=NUMPY_OF[tensor.datatype])
        except (OverflowError, ValueError) as exc:  # 300 in uint_contents of a UINT8 tensor
            raise InvalidInput(f"input '{tensor.name}': contents are not valid {tensor.datatype}: {exc}") from None
    return reshape(array, shape, tensor.name)


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id or "")
    for key, value in response.parameters.items():
        param = message.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
    for name, array in response.outputs.items():
        message.outputs.add(name=name, datatype=v2_name(array.dtype), shape=array.shape)
        message.raw_output_contents.append(bytes(to_wire(array)))
    return message


_RPCS = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def _decoded(method, message_type):
    """``method`` taking the raw request bytes: grpcio answers UNKNOWN when its deserializer raises."""
    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = message_type.FromString(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request is not a valid {message_type.DESCRIPTOR.name} message: {exc}")
        return await method(request, context)
    return handler


def create_server(dataplane: Dataplane, address: str, max_request_bytes: int = MAX_MESSAGE,
                  access: Access | None = None, credentials: grpc.ServerCredentials | None = None,
                  limits: Limits | None = None,
                  audit=None) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A gRPC server bound to ``address`` (port 0 = any free port); returns it, its port, its health servicer.
    Messages up to ``max_request_bytes`` are accepted (grpcio's own default, 4 MiB, is too small for images).
    ``access``: authentication and access rules (None: off); ``credentials``: TLS (``grpc.ssl_server_credentials``);
    ``audit``: the ``AuditLog`` load/unload are recorded in (None: not recorded)."""
    service = InferenceService(dataplane, access, limits, audit)  # limits: rate, caps, deadlines (None: none)
    handlers = {  # bytes in, parsed by _decoded: a message that does not parse is INVALID_ARGUMENT, not UNKNOWN
        name: grpc.unary_unary_rpc_method_handler(
            _decoded(getattr(service, name), req), response_serializer=resp.SerializeToString)
        for name, (req, resp) in _RPCS.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        service.ModelStreamInfer, request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", min(max_request_bytes, MAX_MESSAGE)),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    return server, port, health_servicer


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
