"""Issue 7's fuzzing proof: bad input gets a clear 4xx (gRPC: INVALID_ARGUMENT, NOT_FOUND...), never a 5xx,
INTERNAL or UNKNOWN; nothing crashes; the server is healthy afterwards.

- schemathesis, against the OpenAPI schema the live server serves (``GET /openapi.json``, the V2 infer route
  included), every operation, checking ``not_a_server_error`` and ``response_schema_conformance``;
- hypothesis, for what a schema cannot say: malformed V2 JSON, the binary tensor extension, compressed
  bodies, and gRPC ``ModelInfer`` messages (typed, and random bytes on a raw channel).

One server process for the module (``conftest.Server``) on a throwaway repository, in explicit model-control
mode so load/unload are allowed; its payload log goes to a throwaway database. After every test it must still
answer health and a valid inference over REST and gRPC; at the end it must be alive with sane memory and no
traceback in its output. Every run is derandomized (``derandomize=True``): the same examples each time.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import socket
import time
import zlib
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import Server, identity_model, multi_io_model, scale_model  # noqa: E402
from modelserve.datatypes import NUMPY_OF  # noqa: E402
from modelserve.server.proto import inference_pb2 as pb  # noqa: E402

LIMIT = 1 << 20  # --max-request-bytes: small, so size limits are reachable
IDENTITY = {"FP32": "identity_fp32", "BYTES": "identity_bytes", "UINT8": "identity_uint8", "BOOL": "identity_bool",
            "INT64": "identity_int64", "INT8": "identity_int8"}
MODELS = [*IDENTITY.values(), "multi"]
SPARE = "spare"  # the model schemathesis loads and unloads: the others stay loaded whatever it does
DATATYPES = list(NUMPY_OF)
GOOD = {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
# gRPC codes a refused request may get; INTERNAL and UNKNOWN are bugs
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
           grpc.StatusCode.OUT_OF_RANGE}


def fuzz(n: int = 100):
    """Bounded and reproducible hypothesis settings (a real server answers each example)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    repo = folder / "repo"
    for datatype, name in IDENTITY.items():
        identity_model(repo / name / "1" / "model.onnx", datatype)
    multi_io_model(repo / "multi" / "1" / "model.onnx")
    scale_model(repo / SPARE / "1" / "model.onnx", 2.0)
    loads = [arg for name in MODELS for arg in ("--load-model", name)]
    with Server(repo, "--model-control-mode", "explicit", *loads, "--max-request-bytes", str(LIMIT),
                "--monitor-db", f"sqlite:///{folder / 'monitor.db'}", "--monitor-spill", str(folder / "spill.jsonl"),
                ) as server:
        yield server
        started = time.monotonic()
        assert server.stop() == 0, server.log()[-5000:]
        assert time.monotonic() - started < 20, "the server took its whole drain timeout to stop"


@pytest.fixture(scope="module")
def web(srv):
    with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def channel(srv):
    with grpc.insecure_channel(srv.grpc_url) as ch:
        yield ch


@pytest.fixture(scope="module")
def model_infer(channel):
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)


@pytest.fixture(autouse=True)
def stays_healthy(request):
    """After each test: ready, and a valid inference answered over both protocols."""
    yield
    if "srv" not in request.fixturenames:
        return
    srv = request.getfixturevalue("srv")
    assert srv.proc.poll() is None, "server died:\n" + srv.log()[-5000:]
    with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as client:
        assert client.get("/v2/health/ready").status_code == 200
        r = client.post("/v2/models/identity_fp32/infer", json={"inputs": [GOOD]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == GOOD["data"]
    with grpc.insecure_channel(srv.grpc_url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=pb.ModelInferRequest.SerializeToString,
                              response_deserializer=pb.ModelInferResponse.FromString)
        answer = call(grpc_request("identity_fp32", "FP32", [1, 4], raw=np.arange(4, dtype=np.float32).tobytes()),
                      timeout=30)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [0, 1, 2, 3]


def refused(r: httpx.Response) -> None:
    """A 4xx with the JSON error body every route answers; or 501 for an extension the server does not have
    (shared memory, classification: PROTOCOLS.md §2.5 and Triton answer 501 there, a refusal, not a failure)."""
    assert 400 <= r.status_code < 500 or r.status_code == 501, (r.status_code, r.text[:500])
    assert isinstance(r.json().get("error"), str) and r.json()["error"], r.text[:500]


def answered(r: httpx.Response) -> None:
    """Either a 200 (the input happened to be valid) or a clear refusal."""
    if r.status_code != 200:
        refused(r)


def post(web: httpx.Client, body: bytes, model: str = "identity_fp32", headers: dict | None = None) -> httpx.Response:
    return web.post(f"/v2/models/{model}/infer", content=body, headers=headers)


# -- schemathesis: every operation of the served OpenAPI schema ------------------------------------------------------


def test_openapi_documents_infer(web):
    doc = web.get("/openapi.json").json()
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        operation = doc["paths"][path]["post"]
        assert {"200", "400", "404", "413", "503"} <= set(operation["responses"])
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["inputs"]
        tensor = body["properties"]["inputs"]["items"]
        assert set(tensor["properties"]) == {"name", "shape", "datatype", "parameters", "data"}
        assert set(body["properties"]["outputs"]["items"]["properties"]) == {"name", "parameters"}
    # documented only: InferRoute still answers (its own 405 for a GET, which FastAPI would not give this way)
    r = web.get("/v2/models/identity_fp32/infer")
    assert r.status_code == 405 and r.json()["error"] == "Method Not Allowed"


def test_schemathesis(srv):
    """Every operation of the served schema, with data that fits it (positive) and data that breaks it (negative):
    no 5xx, and documented answers match their schema. One test looping over the operations, not
    ``@schema.parametrize()`` with ``schemathesis.pytest.from_fixture``: that one needs the server at collection
    time or breaks on pytest 9 (``Function._nodeid``). A random model name only ever finds a 404, so each operation
    on ``{model}`` also runs with the real ones; load/unload only ever name SPARE, so the other models stay loaded
    (unloading them would make every later check flaky, not find bugs)."""
    from schemathesis import GenerationMode

    api = schemathesis.openapi.from_url(f"http://{srv.http_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert any(op.path.endswith("/infer") for op in operations)
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance]
    failures, statuses = [], collections.Counter()
    for op in operations:
        strategies = [op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)]
        if "{model}" in op.path:
            models = [SPARE] if op.path.endswith(("/load", "/unload")) else MODELS
            fixed = {"version": 1} if "{version}" in op.path else {}
            strategies.append(st.sampled_from(models).flatmap(
                lambda m, op=op, fixed=fixed: op.as_strategy(path_parameters={"model": m, **fixed})))

        @fuzz(60 if op.path.endswith("/infer") else 30)  # the V2 infer route gets twice the examples
        @given(case=st.one_of(strategies))
        def run(case):
            statuses[op.label, case.call_and_validate(checks=checks).status_code] += 1

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - every operation's failure, then one assertion
            failures.append(f"{op.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    print(sorted(statuses.items()))
    infer = {status for (label, status) in statuses if label == "POST /v2/models/{model}/infer"}
    assert {400, 404} <= infer, statuses  # it reached real models (400: their validation) and unknown ones


def test_schemathesis_registry_api(tmp_path_factory):
    """The registry's management API (``/v2/registry/...``, served with ``--registry``) under schemathesis, on its own
    server following a throwaway SQLite registry. Half the cases name its real model ``alpha``; deleting versions
    and aliases, moving and rolling back are all allowed (the follower loads and unloads as they happen)."""
    from schemathesis import GenerationMode

    from modelserve.registry import Registry

    root = tmp_path_factory.mktemp("fuzz-registry")
    url = f"sqlite:///{root}/registry.db"
    registry = Registry(url, root / "artifacts", actor="fuzz")
    for factor in (1.0, 2.0):
        registry.register(scale_model(root / f"scale-{factor:g}.onnx", factor), "alpha")
    registry.set_alias("alpha", "production", 1)
    registry.close()
    with Server(root / "no-repository", "--registry", url, "--alias", "production", "--registry-poll", "0.3",
                "--registry-cache", str(root / "cache"), "--max-request-bytes", str(LIMIT),
                "--monitor-db", f"sqlite:///{root / 'monitor.db'}", "--monitor-spill", str(root / "spill.jsonl"),
                ) as server:
        api = schemathesis.openapi.from_url(f"http://{server.http_url}/openapi.json")
        operations = [r.ok() for r in api.get_all_operations() if "/v2/registry" in r.ok().path]
        assert len(operations) >= 10
        checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance]
        failures, statuses = [], collections.Counter()
        for op in operations:
            strategies = [op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)]
            if "{name}" in op.path:
                fixed = {"version": st.sampled_from([1, 2])} if "{version}" in op.path else {}
                strategies.append(st.fixed_dictionaries(fixed).flatmap(
                    lambda extra, op=op: op.as_strategy(path_parameters={"name": "alpha", **extra})))

            @fuzz(25)
            @given(case=st.one_of(strategies))
            def run(case):
                statuses[case.call_and_validate(checks=checks).status_code] += 1

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - every operation's failure, then one assertion
                failures.append(f"{op.label}: {exc}")
        assert not failures, "\n\n".join(failures)
        assert 200 in statuses and 404 in statuses, statuses
        assert server.proc.poll() is None
        with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
            assert client.get("/v2/health/live").status_code == 200
        bad = [line[:3000] for line in server.log().splitlines() if "Traceback" in line or "unexpected error" in line]
        assert not bad, "\n".join(bad)


# -- hypothesis: malformed V2 JSON ---------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


def dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # NaN / Infinity tokens included


@fuzz(150)
@given(tree=json_trees, wrap=st.sampled_from(["bare", "inputs", "input", "shape", "data", "outputs", "params"]))
def test_random_json_trees(web, tree, wrap):
    doc = {"bare": tree, "inputs": {"inputs": tree}, "input": {"inputs": [tree]},
           "shape": {"inputs": [{**GOOD, "shape": tree}]}, "data": {"inputs": [{**GOOD, "data": tree}]},
           "outputs": {"inputs": [GOOD], "outputs": tree}, "params": {"inputs": [GOOD], "parameters": tree}}[wrap]
    answered(post(web, dumps(doc)))


def jtype(value) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", list: "list", dict: "dict"}.get(
        type(value), "null")


# field -> (JSON types the server accepts there, whether a falsy value means "absent")
FIELDS = {
    ("id",): ({"str"}, False), ("parameters",): ({"dict"}, True), ("inputs",): ({"list"}, False),
    ("outputs",): ({"list"}, True), ("inputs", 0): ({"dict"}, False), ("inputs", 0, "name"): ({"str"}, False),
    ("inputs", 0, "shape"): ({"list"}, False), ("inputs", 0, "datatype"): ({"str"}, False),
    ("inputs", 0, "parameters"): ({"dict"}, True), ("inputs", 0, "data"): ({"list"}, False),
    ("outputs", 0): ({"dict"}, False), ("outputs", 0, "name"): ({"str"}, False),
    ("outputs", 0, "parameters"): ({"dict"}, True),
    ("parameters", "binary_data_output"): (set(), True),
}


@fuzz(200)
@given(field=st.sampled_from(sorted(FIELDS, key=repr)), value=json_trees)
@example(field=("outputs", 0, "parameters"), value=[1])  # was a 500: 'list' object has no attribute 'get'
@example(field=("inputs", 0, "parameters"), value="binary_data_size")  # was a 500: string indices must be integers
@example(field=("inputs", 0, "parameters"), value=5)  # was a 500: argument of type 'int' is not iterable
def test_wrong_type_in_every_field(web, field, value):
    """Each field of a valid request replaced by a random JSON value: a wrong JSON type is a 400 naming the problem."""
    doc = {"id": "x", "parameters": {"binary_data_output": False}, "inputs": [dict(GOOD, parameters={})],
           "outputs": [{"name": "OUTPUT0", "parameters": {}}]}
    target = doc
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    r = post(web, dumps(doc))
    accepted, falsy_ok = FIELDS[field]
    if value is None and field in {("id",), ("inputs", 0, "parameters"), ("outputs", 0, "parameters")}:
        falsy_ok = True
    if field[-1] == "binary_data_output" or jtype(value) in accepted or (falsy_ok and not value):
        answered(r)
    else:
        refused(r)


dims = st.integers(-(2**66), 2**66) | st.integers(0, 8) | st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64])


@fuzz(200)
@example(shape=[0, 2**66], count=0, datatype="FP32", model="FP32", nan=False)  # was a 500: Maximum allowed dimension
@example(shape=[0, 2**62, 2**62], count=0, datatype="FP32", model="FP32", nan=False)  # was a 500: array is too big
@given(shape=st.lists(dims, max_size=6), count=st.integers(0, 12), datatype=st.sampled_from(DATATYPES),
       model=st.sampled_from(sorted(IDENTITY)), nan=st.booleans())
def test_shapes_datatypes_and_data_length(web, shape, count, datatype, model, nan):
    """Huge, negative, int64-overflowing, mismatched shapes; every datatype against every model; data of the
    wrong length; NaN/Infinity values. Valid only when it all agrees."""
    data = [float("nan"), float("inf"), -float("inf"), 1e300][:count] if nan else [1] * count
    data += [1] * (count - len(data))
    if datatype == "BOOL":
        data = [True] * count
    elif datatype == "BYTES":
        data = ["a"] * count
    r = post(web, dumps({"inputs": [{"name": "INPUT0", "shape": shape, "datatype": datatype, "data": data}]}),
             IDENTITY[model])
    valid = (datatype == model and len(shape) == 2 and shape[1] == 4 and 1 <= shape[0] <= 32
             and count == math.prod(shape))
    if valid:
        answered(r)  # NaN into an integer type is refused, into FP32 it is a value
    else:
        refused(r)


@fuzz(100)
@given(datatype=st.text(max_size=12).filter(lambda s: s not in NUMPY_OF) | st.sampled_from(["fp32", "TYPE_FP32",
       "FP32 ", "float32", "STRING"]), model=st.sampled_from(MODELS))
def test_unknown_datatypes(web, datatype, model):
    refused(post(web, dumps({"inputs": [{**GOOD, "datatype": datatype}]}), model))


@fuzz(100)
@given(values=st.lists(st.integers(-(2**80), 2**80) | st.floats() | st.booleans() | st.text(max_size=3)
                       | st.none(), min_size=4, max_size=4), model=st.sampled_from(sorted(IDENTITY)))
def test_values_out_of_range_for_the_datatype(web, values, model):
    """300 for UINT8, 2**70 for INT64, strings for numbers, null, NaN for integers: 200 or a 400 saying why."""
    r = post(web, dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": model, "data": values}]}),
             IDENTITY[model])
    answered(r)


@fuzz(40)
@example(depth=100_000, where="body")  # was a 500: RecursionError from the json fallback for NaN tokens
@given(depth=st.integers(1, 200_000), where=st.sampled_from(["body", "data", "shape", "params"]))
def test_deeply_nested_json(web, depth, where):
    nest = "[" * depth + "]" * depth
    body = {"body": nest, "data": '{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":%s}]}' % nest,
            "shape": '{"inputs":[{"name":"INPUT0","shape":%s,"datatype":"FP32","data":[1,2,3,4]}]}' % nest,
            "params": '{"inputs":[],"parameters":{"a":%s}}' % nest}[where]
    refused(post(web, body.encode()))


@fuzz(40)
@given(depth=st.integers(1, 200_000))
def test_deeply_nested_data_with_four_leaves(web, depth):
    """Nested data is walked to its leaves (PROTOCOLS.md §2.5): any depth with 4 leaves is a valid [1, 4]."""
    data = "[" * depth + "1,2,3,4" + "]" * depth
    r = post(web, ('{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":%s}]}' % data).encode())
    answered(r)


@fuzz(150)
@given(tree=json_trees, wrap=st.sampled_from(["bare", "instances", "inputs", "named", "b64", "signature"]),
       model=st.sampled_from(MODELS), op=st.sampled_from([":predict", "/versions/1:predict", ":classify"]))
def test_v1_predict_random_json(web, tree, wrap, model, op):
    """TF Serving / KServe V1 ``:predict`` (not in the OpenAPI schema: one catch-all route) with random JSON."""
    doc = {"bare": tree, "instances": {"instances": tree}, "inputs": {"inputs": tree},
           "named": {"inputs": {"INPUT0": tree, "a": tree}}, "b64": {"instances": [{"b64": tree}]},
           "signature": {"signature_name": tree, "instances": [[1, 2, 3, 4]]}}[wrap]
    answered(web.post(f"/v1/models/{model}{op}", content=dumps(doc)))


@fuzz(60)
@given(request_id=st.text(max_size=8))
@example(request_id="a\nb")  # was: REST connection dropped ("Invalid HTTP header value"), gRPC INTERNAL
@example(request_id="\u20ac")  # was: REST 500 (latin-1 encode), gRPC INTERNAL ("Invalid metadata")
def test_any_request_id(web, model_infer, request_id):
    """Any string ``id`` is echoed as sent in the body; X-Request-ID / the gRPC trailer carry it only when it is
    printable ASCII (else an id of the server's own), never a dropped connection or INTERNAL."""
    r = post(web, dumps({"id": request_id, "inputs": [GOOD]}))
    assert r.status_code == 200, r.text
    assert r.json().get("id", "") == request_id and r.headers["x-request-id"]
    message = grpc_request("identity_fp32", "FP32", [1, 4], raw=b"\0" * 16, id=request_id)
    answer, call = model_infer.with_call(message, timeout=30)
    assert answer.id == request_id and dict(call.trailing_metadata())["x-request-id"]
    bad = grpc_request("identity_fp32", "FP32", [9], raw=b"\0" * 16, id=request_id)
    with pytest.raises(grpc.RpcError) as err:
        model_infer(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_empty_tensor_with_huge_dimensions(web, model_infer):
    """A zero-size tensor whose other dimensions are huge ([10739, 43422, 43422, 0]: 0 bytes of data) is refused
    cheaply, and the payload log that records the refusal does not build the 2e13 empty lists ``tolist()`` would
    (it used to: the writer thread ran for minutes and the server could not stop within its drain timeout)."""
    shape = [10739, 43422, 43422, 0]
    refused(post(web, dumps({"inputs": [{"name": "INPUT0", "shape": shape, "datatype": "FP32", "data": []}]})))
    with pytest.raises(grpc.RpcError) as err:
        model_infer(grpc_request("identity_fp32", "FP32", shape, contents=("fp32_contents", [])), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = web.post("/v2/logs/flush", params={"timeout_s": 20})
    assert r.status_code == 200 and r.json()["flushed"], r.text


# -- hypothesis: the binary tensor extension and compressed bodies -------------------------------------------------


def binary_request(sizes: list, payload: bytes, outputs_binary: bool = True) -> tuple[bytes, int]:
    inputs = [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": s}}
              for s in sizes]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": outputs_binary}}).encode()
    return header + payload, len(header)


VALID_BINARY, VALID_HEADER = binary_request([16], np.arange(4, dtype=np.float32).tobytes())
header_texts = st.text(st.characters(codec="latin-1", exclude_characters="\r\n\x00\x7f",
                                     exclude_categories=("Cc",)), max_size=12)


@fuzz(150)
@given(value=st.integers(-(2**70), 2**70).map(str) | header_texts
       | st.sampled_from(["", "+58", "0x10", "\xb2", "\xb9\xb3", "58.0", "-0", "00058", "1e3"])
       | st.integers(0, len(VALID_BINARY) + 4).map(str))
@example(value="\xb2")  # was a 500: '²'.isdigit() is True, int('²') raises
def test_header_content_length(web, value):
    """Inference-Header-Content-Length wrong, negative, huge, non-numeric, non-ASCII digits ('²')."""
    r = post(web, VALID_BINARY, headers={"Inference-Header-Content-Length": value.encode("latin-1")})
    stripped = value.strip(" \t")
    if stripped.isascii() and stripped.isdigit() and int(stripped) == VALID_HEADER:
        assert r.status_code == 200, r.text
    else:
        refused(r)


@fuzz(150)
@given(sizes=st.lists(st.integers(-(2**65), 2**65) | st.integers(0, 40) | st.booleans() | st.floats()
                      | st.text(max_size=3) | st.none(), min_size=1, max_size=3), payload=st.binary(max_size=48))
def test_binary_data_size_mismatch(web, sizes, payload):
    body, header = binary_request(sizes, payload)
    r = post(web, body, headers={"Inference-Header-Content-Length": str(header)})
    valid = (len(sizes) == 1 and type(sizes[0]) is int and sizes[0] == 16 == len(payload))
    if valid:
        assert r.status_code == 200, r.text
    else:
        refused(r)


@fuzz(100)
@given(cut=st.integers(0, len(VALID_BINARY) - 1), declared=st.booleans())
def test_truncated_bodies(web, cut, declared):
    """A body cut short: the JSON, or the binary tensor after it."""
    headers = {"Inference-Header-Content-Length": str(VALID_HEADER)} if declared else {}
    refused(post(web, VALID_BINARY[:cut], headers=headers))


def test_body_shorter_than_content_length(srv, web):
    """The client promises more bytes than it sends, then stops sending: the server answers (a 4xx) or closes;
    either way nothing breaks."""
    for path in ("/v2/models/identity_fp32/infer", "/v2/repository/index", "/v1/models/identity_fp32:predict"):
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"in".encode())
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(4096)
        assert not answer or answer.startswith(b"HTTP/1.1 4"), answer


@fuzz(100)
@given(body=st.binary(max_size=200), encoding=st.sampled_from(["gzip", "deflate", "GZIP", "br", "compress", "x"]))
def test_invalid_compressed_bodies(web, body, encoding):
    refused(post(web, body, headers={"Content-Encoding": encoding}))


@fuzz(60)
@given(cut=st.integers(1, 200), encoding=st.sampled_from(["gzip", "deflate"]))
@example(cut=1, encoding="gzip")  # was a 200: a gzip stream without its trailer was read as whole
def test_truncated_compressed_bodies(web, cut, encoding):
    """A compressed stream cut short (even just its checksum) is refused, not read as if it were whole."""
    doc = dumps({"inputs": [GOOD]})
    packed = gzip.compress(doc) if encoding == "gzip" else zlib.compress(doc)
    cut = min(cut, len(packed) - 1)
    refused(post(web, packed[:-cut], headers={"Content-Encoding": encoding}))


def test_compression_bombs(web):
    """Small on the wire, over the limit once inflated: 413, without inflating it all."""
    for encoding, pack in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        for filler in (b"\0", b"[" ):
            bomb = pack(filler * (64 * LIMIT), 9)
            assert len(bomb) < LIMIT
            r = post(web, bomb, headers={"Content-Encoding": encoding})
            assert r.status_code == 413, r.text
            refused(r)
        r = post(web, pack(dumps({"inputs": [GOOD]})), headers={"Content-Encoding": encoding})
        assert r.status_code == 200, r.text


def test_declared_and_real_size_limits(web):
    r = post(web, b"x" * (LIMIT + 1))
    assert r.status_code == 413
    refused(r)


# -- hypothesis: gRPC ModelInfer messages ---------------------------------------------------------------------------


def grpc_request(model: str, datatype: str, shape, raw: bytes | None = None, contents=None, **extra):
    tensor = pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=datatype, shape=shape)
    if contents is not None:
        field, values = contents
        getattr(tensor.contents, field).extend(values)
    message = pb.ModelInferRequest(model_name=model, inputs=[tensor], **extra)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return message


def grpc_refused_or_ok(call, message, must_refuse: bool = False) -> None:
    try:
        call(message, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in REFUSED, (exc.code(), exc.details())
        assert exc.details()
        return
    assert not must_refuse, f"accepted: {message}"


@fuzz(150)
@given(model=st.sampled_from(sorted(IDENTITY)), raw=st.binary(max_size=40), shape=st.sampled_from([[1, 4], [2, 4]]))
def test_grpc_random_raw_input_contents(model_infer, model, raw, shape):
    grpc_refused_or_ok(model_infer, grpc_request(IDENTITY[model], model, shape, raw=raw))


@fuzz(100)
@given(model=st.sampled_from(sorted(IDENTITY)), extra_raw=st.integers(0, 3), values=st.lists(st.integers(0, 9),
       max_size=8))
def test_grpc_contents_and_raw_mismatch(model_infer, model, extra_raw, values):
    """Typed contents and raw_input_contents both, or a raw entry count that differs from the inputs'."""
    field = {"FP32": "fp32_contents", "BYTES": "bytes_contents", "UINT8": "uint_contents", "BOOL": "bool_contents",
             "INT64": "int64_contents", "INT8": "int_contents"}[model]
    typed = [str(v).encode() if model == "BYTES" else bool(v) if model == "BOOL" else v for v in values]
    message = grpc_request(IDENTITY[model], model, [1, 4], contents=(field, typed))
    message.raw_input_contents.extend([b"\0" * 16] * extra_raw)
    maybe_valid = (extra_raw == 0 and len(values) == 4) or (extra_raw == 1 and not values)  # never mixed (§5.3)
    grpc_refused_or_ok(model_infer, message, must_refuse=not maybe_valid)


typed_values = {
    "fp32_contents": st.lists(st.floats(width=32), max_size=8),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=8),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=8),
    "bool_contents": st.lists(st.booleans(), max_size=8),
    "bytes_contents": st.lists(st.binary(max_size=5), max_size=8),
    "fp64_contents": st.lists(st.floats(), max_size=8),
}


@fuzz(200)
@given(data=st.data(), datatype=st.sampled_from(DATATYPES) | st.text(max_size=6),
       model=st.sampled_from(sorted(IDENTITY)), shape=st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5),
                                                               max_size=4))
def test_grpc_typed_contents(model_infer, data, datatype, model, shape):
    """Any typed contents field with any values (300 in uint_contents of a UINT8 tensor), any datatype, any int64
    shape: accepted only when it all agrees, else refused with INVALID_ARGUMENT and the like."""
    field = data.draw(st.sampled_from(sorted(typed_values)))
    values = data.draw(typed_values[field])
    grpc_refused_or_ok(model_infer, grpc_request(IDENTITY[model], datatype, shape, contents=(field, values)))


@fuzz(200)
@given(blob=st.binary(max_size=200) | st.sampled_from([b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05ab"]),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4), mutate=st.booleans())
def test_grpc_random_bytes_as_the_message(channel, blob, flips, mutate):
    """Random bytes, or a valid message with bytes flipped, through a raw channel: never INTERNAL/UNKNOWN."""
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=None, response_deserializer=None)
    if mutate:
        blob = bytearray(grpc_request("identity_fp32", "FP32", [1, 4],
                                      raw=np.arange(4, dtype=np.float32).tobytes()).SerializeToString())
        for where, xor in flips:
            blob[where % len(blob)] ^= xor
        blob = bytes(blob)
    grpc_refused_or_ok(call, blob)


@pytest.mark.parametrize("datatype, field, values", [
    ("UINT8", "uint_contents", [300, 1, 2, 3]),  # was INTERNAL: Python integer 300 out of bounds for uint8
    ("INT8", "int_contents", [-200, 1, 2, 3]),
    ("BOOL", "bool_contents", [True] * 3),
    ("FP32", "int64_contents", [1, 2, 3, 4]),  # the wrong field for the datatype: no FP32 values
])
def test_grpc_typed_contents_regressions(model_infer, datatype, field, values):
    model = IDENTITY[datatype]
    with pytest.raises(grpc.RpcError) as err:
        model_infer(grpc_request(model, datatype, [1, 4], contents=(field, values)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_grpc_contents_and_raw_together_are_refused(model_infer):
    """PROTOCOLS.md §5.3: never mixed. Was: the typed contents silently ignored."""
    message = grpc_request("identity_fp32", "FP32", [1, 4], raw=b"\0" * 16, contents=("fp32_contents", [1, 2, 3, 4]))
    with pytest.raises(grpc.RpcError) as err:
        model_infer(message, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "both" in err.value.details()


def test_grpc_stream_survives_random_bytes(channel):
    """ModelStreamInfer: a message that does not parse ends the stream with a status, never a crash; a valid
    message on a new stream is answered."""
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    for blob in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05ab"):
        try:
            answers = list(stream(iter([blob]), timeout=30))
        except grpc.RpcError as exc:  # was: no answer at all, the stream waited for ever (DEADLINE_EXCEEDED here)
            assert exc.code() in REFUSED, (exc.code(), exc.details())
        else:  # it parsed (as unknown fields): answered in the stream
            for raw in answers:
                message = pb.ModelStreamInferResponse.FromString(raw)
                assert message.error_message and "internal error" not in message.error_message
    valid = grpc_request("identity_fp32", "FP32", [1, 4], raw=b"\0" * 16).SerializeToString()
    answers = stream(iter([valid, b"\xff\xff\xff"]), timeout=30)
    first = pb.ModelStreamInferResponse.FromString(next(answers))
    assert not first.error_message and first.infer_response.model_name == "identity_fp32"
    with pytest.raises(grpc.RpcError) as err:
        next(answers)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_grpc_undecodable_message_on_every_rpc(channel):
    """A message that does not parse is INVALID_ARGUMENT on every unary RPC, not grpcio's UNKNOWN."""
    for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelInfer"):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, err.value.details())


@fuzz(60)
@example(version="\xb2")  # was INTERNAL: '²'.isdigit() passed the check, int() failed in the payload-log path
@given(version=st.text(max_size=6) | st.sampled_from(["\xb2", "\u0661", "1 ", "-1", "99999999999999999999"]))
def test_grpc_versions(model_infer, channel, version):
    """Model versions that are not (ASCII) numbers: INVALID_ARGUMENT or NOT_FOUND, also on the metadata RPCs."""
    message = grpc_request("identity_fp32", "FP32", [1, 4], raw=b"\0" * 16, model_version=version)
    grpc_refused_or_ok(model_infer, message, must_refuse=version not in ("", "1"))
    metadata = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                   request_serializer=pb.ModelMetadataRequest.SerializeToString,
                                   response_deserializer=pb.ModelMetadataResponse.FromString)
    grpc_refused_or_ok(metadata, pb.ModelMetadataRequest(name="identity_fp32", version=version))


# -- and afterwards -----------------------------------------------------------------------------------------------


def test_zz_server_survived(srv, web):
    """Last in the file: alive, ready, memory sane, and no traceback or unexpected error in its output."""
    assert srv.proc.poll() is None
    assert web.get("/v2/health/ready").status_code == 200
    rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:")))
    assert rss_kib < 1_500_000, f"server RSS {rss_kib} KiB"
    lines = srv.log().splitlines()
    bad = [i for i, line in enumerate(lines) if "Traceback" in line or "unexpected error" in line]
    assert not bad, "\n".join(line[:3000] for line in lines[bad[0]:bad[0] + 40])
