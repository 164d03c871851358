"""TensorFlow Serving REST and KServe V1 on the ``/v1`` routes: a thin adapter over the one dataplane.

The two protocols share their paths (PROTOCOLS.md §10.1): one ``:predict`` handler with TF Serving's
semantics answers both (KServe V1's ``instances`` -> ``predictions`` is TF's row format), and
``GET /v1/models/{m}`` carries TF's ``model_version_status`` and KServe's ``name``/``ready`` together.
JSON values become numpy arrays of the model's input datatypes, the dataplane runs them as it runs a V2
request, and the output arrays go back as JSON. Errors are ``ModelServeError``s, mapped by ``rest.py``.
Access control happens before these handlers (``access.py``: GET = read metadata, POST = infer).
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from modelserve.datatypes import BF16, NUMPY_OF
from modelserve.errors import InvalidInput, ModelNotFound, Unsupported
from modelserve.server.config import TensorConfig
from modelserve.server.access import filter_names, principal_of
from modelserve.server.dataplane import Dataplane, InferRequest, header_value, new_request_id
from modelserve.server.models import LOADING, READY, UNAVAILABLE, UNLOADING, ModelManager
from modelserve.server.rest import peer, json_object, json_response, read_body

DEFAULT_SIGNATURE = "serving_default"
#: V2 datatype -> TF DataType name (PROTOCOLS.md §1)
DT_OF = {
    "BOOL": "DT_BOOL", "UINT8": "DT_UINT8", "UINT16": "DT_UINT16", "UINT32": "DT_UINT32", "UINT64": "DT_UINT64",
    "INT8": "DT_INT8", "INT16": "DT_INT16", "INT32": "DT_INT32", "INT64": "DT_INT64", "FP16": "DT_HALF",
    "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE", "BYTES": "DT_STRING", "BF16": "DT_BFLOAT16",
}
_STATE_OF = {READY: "AVAILABLE", LOADING: "LOADING", UNLOADING: "UNLOADING", UNAVAILABLE: "END"}
# Starlette path parameters stop at '/', and ':predict' is glued to the name, so one catch-all route
# takes everything under /v1/models/ and this parses it. Model names: anything but '/' and ':' (dots and
# dashes included); keywords match case-insensitively, as in TF Serving.
_PATH = re.compile(r"(?P<model>[^/:]+)(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<op>/metadata|:predict|:classify|:regress|:explain)?", re.IGNORECASE)
_KIND_NAMES = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers", "U": "strings"}


def v1_router(dataplane: Dataplane, max_request_bytes: int) -> APIRouter:
    router = APIRouter()
    manager = dataplane.manager

    @router.get("/v1/models")
    async def list_models(request: Request):  # KServe V1 (TF Serving answers 400 here; a list harms no TF client)
        return json_response({"models": filter_names(principal_of(request), sorted(manager.models))})

    @router.api_route("/v1/models/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def v1_models(request: Request, rest: str):
        if not rest:
            raise InvalidInput("Missing model name in request.")
        match = _PATH.fullmatch(rest)
        op = (match["op"] or "").lower() if match else None
        if match is None or (request.method == "GET") != (op in ("", "/metadata")):
            raise InvalidInput(f"Malformed request: {request.method} {request.url.path}")
        model = match["model"]
        version = _label_version(manager, model, match["label"]) if match["label"] else match["version"]
        if op == "":
            return _status(manager, model, version)
        if op == "/metadata":
            return json_response(_metadata(dataplane, model, version))
        if op != ":predict":
            manager.get(model, version)  # an unknown model is a 404 before it is a refusal
            if op == ":explain":
                raise Unsupported(f"explain is not supported: model '{model}' has no explainer")
            raise Unsupported(f"{op[1:]} is not supported: model '{model}' has no tensorflow/serving/{op[1:]} "
                              f"signature (only '{DEFAULT_SIGNATURE}', a predict signature); use :predict")
        doc = json_object(await read_body(request.headers, request.stream(), max_request_bytes))
        return await _predict(dataplane, doc, model, version, request.scope)

    return router


def _label_version(manager: ModelManager, model: str, label: str) -> str:
    """TF Serving version labels: ``stable``/``canary`` exist only where a registry alias splits traffic."""
    entry = manager.models.get(model)
    if entry is None:
        raise ModelNotFound(f"Request for unknown model: '{model}' is not found")
    split = entry.split
    number = {"stable": split.primary, "canary": split.canary}.get(label) if split is not None else None
    if number is None:
        raise ModelNotFound(f"Unrecognized servable version label: {label} (model '{model}' has "
                            + ("label 'stable' only: its alias has no canary" if split else "no version labels: "
                               "'stable' and 'canary' exist for a model served from a registry alias with a canary")
                            + ")")
    return str(number)


def _status(manager: ModelManager, model: str, version: str | None) -> Response:
    """TF Serving's model status and KServe V1's readiness in one object; 503 unless a version is AVAILABLE."""
    entry = manager.models.get(model)
    if entry is None and not manager.in_repository(model):
        raise ModelNotFound(f"Could not find any versions of model {model}")
    found: dict[int, tuple[str, str]] = {}
    if entry is not None:
        found = {n: (UNAVAILABLE, reason) for n, reason in entry.refused.items()}
        found.update({v.version: (v.state, v.reason) for v in entry.versions.values()})
    if version is not None:
        if int(version) not in found:
            raise ModelNotFound(f"Could not find version {version} of model {model}")
        found = {int(version): found[int(version)]}
    statuses = []
    for number, (state, reason) in sorted(found.items(), reverse=True):  # newest first
        failed = state == UNAVAILABLE and reason not in ("", "unloaded")
        statuses.append({"version": str(number), "state": _STATE_OF.get(state, "UNKNOWN"),
                         "status": {"error_code": "UNKNOWN" if failed else "OK", "error_message": reason if failed else ""}})
    ready = any(state == READY for state, _ in found.values())
    body = {"name": model, "ready": ready, "model_version_status": statuses}
    if ready:
        return json_response(body)
    reason = (entry.reason if entry is not None else "not loaded") \
        or "; ".join(f"version {n}: {r or s}" for n, (s, r) in sorted(found.items())) or "no version"
    body["error"] = f"model '{model}' is not ready: {reason}"
    return json_response(body, 503)


def _metadata(dataplane: Dataplane, model: str, version: str | None) -> dict:
    """One synthesized ``serving_default`` predict signature, printed as TF Serving prints SignatureDefs."""
    split = dataplane.manager.models[model].split if model in dataplane.manager.models else None
    if version is None and split is not None:
        version = str(split.primary)  # not a random pick between primary and canary
    served = dataplane.manager.get(model, version).version_str  # signature and version from the same one
    meta = dataplane.model_metadata(model, served)

    def tensor(t: dict) -> dict:
        dims = [{"size": str(d), "name": ""} for d in t["shape"]]
        return {"dtype": DT_OF[t["datatype"]], "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": t["name"]}

    signature = {"inputs": {t["name"]: tensor(t) for t in meta["inputs"]},
                 "outputs": {t["name"]: tensor(t) for t in meta["outputs"]},
                 "method_name": "tensorflow/serving/predict", "defaults": {}}
    return {"model_spec": {"name": model, "signature_name": "", "version": served},
            "metadata": {"signature_def": {"signature_def": {DEFAULT_SIGNATURE: signature}}}}


async def _predict(dataplane: Dataplane, doc: dict, model: str, version: str | None, scope) -> Response:
    signature = doc.get("signature_name")
    if signature not in (None, "", DEFAULT_SIGNATURE):
        raise InvalidInput(f'Serving signature name: "{signature}" not found in signature def '
                           f"(this model has '{DEFAULT_SIGNATURE}' only)")
    rows = "instances" in doc
    if rows and "inputs" in doc:
        raise InvalidInput("Expecting only one of 'inputs' or 'instances' keys in the request body, not both")
    if not rows and "inputs" not in doc:
        raise InvalidInput("Missing 'inputs' or 'instances' key")
    request = InferRequest(model, version, {}, headers=scope["headers"], protocol="v1-rest", client=peer(scope),
                           request_id=(header_value(scope["headers"], "x-request-id") or b"").decode("latin-1")
                           or new_request_id())
    # JSON carries no dtypes: read it against the signature of the version the dataplane's own routing
    # picks (the same one for a sticky split). Not pinned to it: infer() routes again, so a hot swap while
    # the request waits still moves it on to the successor version.
    config = dataplane.route(request).config
    specs = config.inputs
    request.inputs = _from_rows(doc["instances"], specs, bool(config.max_batch_size)) if rows \
        else _from_columns(doc["inputs"], specs)
    response = await dataplane.infer(request)

    nonfinite = False
    outputs = {}
    for name, array in response.outputs.items():
        outputs[name], bad = _jsonable(name, array)
        nonfinite |= bad
    if rows:
        shapes = {name: array.shape for name, array in response.outputs.items()}
        firsts = {shape[0] if shape else None for shape in shapes.values()}
        if None in firsts or len(firsts) > 1:
            raise InvalidInput(f"outputs {shapes} need a shared first (batch) dimension for the row format "
                               "('instances'); send the columnar format ('inputs') instead")
        if len(outputs) == 1:
            body = {"predictions": next(iter(outputs.values()))}
        else:
            body = {"predictions": [{n: col[i] for n, col in outputs.items()} for i in range(firsts.pop())]}
    else:
        body = {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
    if nonfinite:  # orjson writes NaN as null; TF Serving writes the NaN / Infinity tokens
        content = json.dumps(body, default=lambda o: o.tolist()).encode()
    else:
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, 200, {"x-request-id": request.request_id}, media_type="application/json")


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _check_names(names, specs: list[TensorConfig]) -> None:
    known = [s.name for s in specs]
    for name in names:
        if name not in known:
            raise InvalidInput(f"unknown input '{name}'; the model's inputs are {known}")


def _from_rows(instances, specs: list[TensorConfig], batching: bool = True) -> dict[str, np.ndarray]:
    """Row format: one element per batch row, stacked along a new first axis (shape [len] + row shape)."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty JSON array, one element per batch row")
    named = [isinstance(row, dict) and not _is_b64(row) for row in instances]
    if not any(named):
        if len(specs) != 1:
            raise InvalidInput(f"the model has {len(specs)} inputs {[s.name for s in specs]}: each instance must be "
                               "an object keyed by input name")
        return {specs[0].name: _row_tensor(instances, specs[0], batching)}
    if not all(named):
        raise InvalidInput("instances mix objects keyed by input name with bare values; use one form for every row")
    keys = set(instances[0])
    for i, row in enumerate(instances):
        if set(row) != keys:
            raise InvalidInput(f"instance {i} names inputs {sorted(row)}, instance 0 names {sorted(keys)}: "
                               "every instance must name the same inputs")
    _check_names(keys, specs)
    return {s.name: _row_tensor([row[s.name] for row in instances], s, batching) for s in specs if s.name in keys}


def _row_tensor(rows: list, spec: TensorConfig, batching: bool) -> np.ndarray:
    """Rows stacked; a bare value per row (TF Serving's ``{"b64": image}`` instance) fills a batched input of
    one element per row (dims [1], e.g. a vision model's ``image``) as shape [N, 1]."""
    array = _tensor(rows, spec)
    return array[:, None] if batching and array.ndim == 1 and spec.dims == [1] else array


def _from_columns(inputs, specs: list[TensorConfig]) -> dict[str, np.ndarray]:
    """Columnar format: each input's whole tensor, batch dimension included."""
    if isinstance(inputs, dict) and not _is_b64(inputs):
        _check_names(inputs, specs)
        return {s.name: _tensor(inputs[s.name], s) for s in specs if s.name in inputs}
    if len(specs) != 1:
        raise InvalidInput(f"the model has {len(specs)} inputs {[s.name for s in specs]}: 'inputs' must be an "
                           "object keyed by input name")
    return {specs[0].name: _tensor(inputs, specs[0])}


def _tensor(value, spec: TensorConfig) -> np.ndarray:
    """A JSON value (scalar or nested lists) -> an array of the input's datatype; the dataplane checks shapes."""
    if spec.datatype == "BYTES":
        return _bytes_tensor(value, spec.name)
    try:
        raw = np.asarray(value)
    except ValueError:  # nested lists of different lengths
        raise InvalidInput(f"input '{spec.name}': the values do not form a tensor (rows of different shapes)") from None
    kind, dt = raw.dtype.kind, DT_OF[spec.datatype]
    integer = spec.datatype.startswith(("INT", "UINT"))
    ok = raw.size == 0 or ((kind == "b") if spec.datatype == "BOOL" else kind in "iuf")
    if ok and integer and raw.size:
        if kind == "f" and not np.all(np.mod(raw, 1) == 0):  # also refuses NaN / Infinity
            raise InvalidInput(f"input '{spec.name}': {dt} needs integers, got non-integer numbers")
        info = np.iinfo(NUMPY_OF[spec.datatype])
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(f"input '{spec.name}': a value is outside the range of {dt} ({info.min}..{info.max})")
    if not ok:
        got = _KIND_NAMES.get(kind, "objects or mixed values")
        raise InvalidInput(f"input '{spec.name}': {dt} needs {'true/false' if dt == 'DT_BOOL' else 'numbers'}, got {got}"
                           + (" ({\"b64\": ...} values are for DT_STRING inputs)" if kind == "O" else ""))
    return raw.astype(NUMPY_OF[spec.datatype], copy=False)


def _bytes_tensor(value, name: str) -> np.ndarray:
    """Strings (UTF-8) and ``{"b64": ...}`` objects, nested -> an object array of bytes."""
    shape = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat: list[bytes] = []

    def visit(item, depth: int) -> None:
        if depth == len(shape):
            flat.append(_bytes_leaf(item, name))
        elif not isinstance(item, list) or len(item) != shape[depth]:
            raise InvalidInput(f"input '{name}': the values do not form a tensor (rows of different shapes)")
        else:
            for element in item:
                visit(element, depth + 1)

    visit(value, 0)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)


def _bytes_leaf(item, name: str) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if _is_b64(item) and isinstance(item["b64"], str):
        text = item["b64"]
        try:  # standard alphabet; missing padding tolerated
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"input '{name}': {text[:40]!r} is not valid base64") from None
    raise InvalidInput(f"input '{name}': DT_STRING values must be strings or {{\"b64\": \"...\"}} objects, "
                       f"got {type(item).__name__}")


def _jsonable(name: str, array: np.ndarray):
    """An output as JSON sees it (numpy for orjson, or nested lists), and whether it holds NaN/Infinity.
    Strings: UTF-8 text, except ``*_bytes`` outputs (TF Serving's rule) and non-UTF-8 values, as b64."""
    if array.dtype == object or array.dtype.kind in "US":
        as_b64 = name.endswith("_bytes")
        converted = np.frompyfunc(lambda v: _text_or_b64(v, as_b64), 1, 1)(array)
        return (converted.tolist() if isinstance(converted, np.ndarray) else converted), False  # 0-d: the value
    if array.dtype == BF16:
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array)
    nonfinite = array.dtype.kind == "f" and not np.isfinite(array).all()
    return (array[()] if array.ndim == 0 else array), nonfinite  # orjson takes numpy scalars, not 0-d arrays


def _text_or_b64(value, as_b64: bool):
    data = value if isinstance(value, bytes) else str(value).encode()
    if not as_b64:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass  # binary: lossless b64 rather than mangled text
    return {"b64": base64.b64encode(data).decode("ascii")}
