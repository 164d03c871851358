"""Every bad request gets a clear message with the right status, and the server keeps serving.

HTTP errors are JSON ``{"error": "..."}`` naming what was wrong (the input, the expected and the
received value); gRPC errors are status codes with the same messages. After each error a valid
request must still succeed.
"""

from __future__ import annotations

import gzip
import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from conftest import Server

X_JSON = {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
X_BYTES = np.linspace(-1, 1, 16, dtype=np.float32).tobytes()


def body(doc) -> bytes:
    return json.dumps(doc).encode()


def binary(doc: dict, payload: bytes, header_length: str | None = None) -> tuple[dict, bytes]:
    """Headers and body of a binary-extension request."""
    head = body(doc)
    return {"Inference-Header-Content-Length": header_length or str(len(head))}, head + payload


def x_binary(size: int = 64, shape=(1, 16)) -> dict:
    return {"name": "x", "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": size}}


def assert_still_serving(raw: httpx.Client) -> None:
    r = raw.post("/v2/models/mlp/infer", json={"inputs": [X_JSON]})
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"]) == 2


def assert_error(r: httpx.Response, status: int, *fragments: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str)
    for fragment in fragments:
        assert fragment in doc["error"], (fragment, doc["error"])
    return doc["error"]


# (id, path, headers, body, status, fragments the message must contain)
MLP = "/v2/models/mlp/infer"
HTTP_CASES = [
    ("unknown-model", "/v2/models/no_such_model/infer", {}, body({"inputs": [X_JSON]}), 404, ["'no_such_model'"]),
    ("unknown-version", "/v2/models/mlp/versions/7/infer", {}, body({"inputs": [X_JSON]}), 404, ["'mlp'", "7"]),
    ("missing-input", "/v2/models/multi/infer", {},
     body({"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}), 400,
     ["missing input 'b'", "multi"]),
    ("unknown-input", MLP, {},
     body({"inputs": [X_JSON, {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]}]}), 400,
     ["unexpected input 'extra'", "['x']"]),
    ("duplicate-input", MLP, {}, body({"inputs": [X_JSON, X_JSON]}), 400, ["'x'", "twice"]),
    ("wrong-datatype", MLP, {},
     body({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}]}), 400,
     ["input 'x'", "expected datatype FP32", "got INT32"]),
    ("wrong-rank", MLP, {},
     body({"inputs": [{"name": "x", "shape": [16], "datatype": "FP32", "data": [1.0] * 16}]}), 400,
     ["input 'x'", "[-1, 16]", "got [16]"]),
    ("wrong-fixed-dim", MLP, {},
     body({"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [1.0] * 15}]}), 400,
     ["input 'x'", "[-1, 16]", "got [1, 15]"]),
    ("batch-over-max", MLP, {},
     body({"inputs": [{"name": "x", "shape": [17, 16], "datatype": "FP32", "data": [1.0] * 272}]}), 400,
     ["batch size 17", "16", "max_batch_size"]),
    ("negative-dim", MLP, {},
     body({"inputs": [{"name": "x", "shape": [-1, 16], "datatype": "FP32", "data": [1.0] * 16}]}), 400,
     ["input 'x'", "shape"]),
    ("binary-size-vs-shape", MLP, *binary({"inputs": [x_binary(60)]}, X_BYTES[:60]), 400,
     ["input 'x'", "60 bytes", "expected 64"]),
    ("binary-short", MLP, *binary({"inputs": [x_binary(64)]}, X_BYTES[:40]), 400,
     ["input 'x'", "binary_data_size 64", "40 bytes"]),
    ("binary-leftover", MLP, *binary({"inputs": [x_binary(64)]}, X_BYTES + b"0123456789"), 400,
     ["10 bytes", "unclaimed"]),
    ("binary-without-header", MLP, {}, body({"inputs": [x_binary(64)]}) + X_BYTES, 400, ["not valid JSON"]),
    ("header-length-too-large", MLP, *binary({"inputs": [x_binary(64)]}, X_BYTES, header_length="99999"), 400,
     ["Inference-Header-Content-Length", "99999"]),
    ("header-length-not-a-number", MLP, *binary({"inputs": [x_binary(64)]}, X_BYTES, header_length="12a"), 400,
     ["Inference-Header-Content-Length", "'12a'"]),
    ("header-length-negative", MLP, *binary({"inputs": [x_binary(64)]}, X_BYTES, header_length="-5"), 400,
     ["Inference-Header-Content-Length", "'-5'"]),
    ("malformed-json", MLP, {}, b'{"inputs": [', 400, ["not valid JSON"]),
    ("json-not-object", MLP, {}, b"[1, 2, 3]", 400, ["JSON object"]),
    ("missing-inputs", MLP, {}, body({"outputs": [{"name": "probs"}]}), 400, ["'inputs'"]),
    ("empty-inputs", MLP, {}, body({"inputs": []}), 400, ["'inputs'"]),
    ("input-without-data", MLP, {}, body({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32"}]}), 400,
     ["input 'x'", "'data'"]),
    ("json-count-vs-shape", MLP, {},
     body({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15}]}), 400,
     ["input 'x'", "15 elements", "needs 16"]),
    ("json-nested-count-vs-shape", "/v2/models/identity_int32/infer", {},
     body({"inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "INT32", "data": [[1, 2, 3, 4], [5, 6, 7]]}]}),
     400, ["input 'INPUT0'", "7 elements", "needs 8"]),
    ("json-number-not-numeric", MLP, {},
     body({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ["a"] * 16}]}), 400,
     ["input 'x'", "FP32"]),
    ("bytes-data-not-strings", "/v2/models/identity_bytes/infer", {},
     body({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "BYTES", "data": [1, 2, 3, 4]}]}), 400,
     ["input 'INPUT0'", "BYTES data must be strings", "int"]),
    ("bool-data-not-bool", "/v2/models/identity_bool/infer", {},
     body({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "BOOL", "data": [1, 0, 1, 0]}]}), 400,
     ["input 'INPUT0'", "true/false"]),
    ("unknown-datatype", MLP, {},
     body({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FLOAT32", "data": [1.0] * 16}]}), 400,
     ["input 'x'", "unknown datatype", "FLOAT32"]),
    ("config-datatype-name", MLP, {},
     body({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "TYPE_FP32", "data": [1.0] * 16}]}), 400,
     ["input 'x'", "unknown datatype", "TYPE_FP32"]),
    ("reserved-parameter", MLP, {}, body({"inputs": [X_JSON], "parameters": {"triton_foo": 1}}), 400,
     ["'triton_foo'", "reserved"]),
    ("unknown-output", MLP, {}, body({"inputs": [X_JSON], "outputs": [{"name": "nope"}]}), 400,
     ["unknown output 'nope'", "probs", "logits"]),
    ("id-not-string", MLP, {}, body({"id": 5, "inputs": [X_JSON]}), 400, ["'id'"]),
    ("bad-content-encoding", MLP, {"Content-Encoding": "br"}, body({"inputs": [X_JSON]}), 400,
     ["Content-Encoding", "br"]),
    ("gzip-header-not-gzip", MLP, {"Content-Encoding": "gzip"}, body({"inputs": [X_JSON]}), 400, ["gzip"]),
    ("bf16-as-json", "/v2/models/identity_bf16/infer", {},
     body({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "BF16", "data": [1.0] * 4}]}), 400,
     ["input 'INPUT0'", "BF16"]),
]


@pytest.mark.parametrize("path,headers,content,status,fragments",
                         [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_http_infer_errors(raw, path, headers, content, status, fragments):
    assert_error(raw.post(path, content=content, headers=headers), status, *fragments)
    assert_still_serving(raw)


def test_reserved_parameter_empty_final_response_accepted_over_http(raw):
    r = raw.post(MLP, json={"inputs": [X_JSON], "parameters": {"triton_enable_empty_final_response": True}})
    assert r.status_code == 200, r.text


def test_tritonclient_sees_status_and_message(server):
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inp = httpclient.InferInput("x", [1, 16], "INT32")
        inp.set_data_from_numpy(np.zeros((1, 16), np.int32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [inp])
        assert info.value.status() == "400"
        assert "expected datatype FP32, got INT32" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("no_such_model")
        assert info.value.status() == "404" and "no_such_model" in info.value.message()
    finally:
        client.close()


# -- routing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,status,message", [
    ("GET", "/v3/whatever", 404, "Not Found"),
    ("GET", "/v2/models/mlp/versions/latest", 404, "Not Found"),
    ("GET", "/v2/models/mlp/versions/x/infer", 404, "Not Found"),
    ("GET", "/v2/models/mlp/infer", 405, "Method Not Allowed"),
    ("DELETE", "/v2", 405, "Method Not Allowed"),
    ("GET", "/v2/repository/index", 405, "Method Not Allowed"),
])
def test_routing_errors(raw, method, path, status, message):
    r = raw.request(method, path)
    assert r.status_code == status
    assert r.json() == {"error": message}
    assert_still_serving(raw)


def test_metadata_errors(raw):
    assert_error(raw.get("/v2/models/no_such_model"), 404, "'no_such_model'")
    assert_error(raw.get("/v2/models/no_such_model/config"), 404, "'no_such_model'")
    assert_error(raw.get("/v2/models/no_such_model/stats"), 404, "'no_such_model'")
    assert_error(raw.get("/v2/models/mlp/versions/3"), 404, "'mlp'", "3")
    assert_error(raw.get("/v2/models/mlp/versions/3/config"), 404, "'mlp'", "3")
    assert_error(raw.post("/v2/repository/index", content=b"{nope"), 400, "not valid JSON")


# -- repository control in mode "none" ---------------------------------------------------------

def test_load_unload_refused_without_model_control(server, raw, grpc_client):
    http = httpclient.InferenceServerClient(server.http_url)
    try:
        for call in (lambda: http.load_model("mlp"), lambda: http.unload_model("mlp")):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "501"
            assert "--model-control-mode explicit or poll" in info.value.message()
    finally:
        http.close()
    for call in (lambda: grpc_client.load_model("mlp"), lambda: grpc_client.unload_model("mlp")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "model-control-mode" in info.value.message()
    assert_error(raw.post("/v2/repository/other/models/mlp/load"), 501, "named repositories")
    assert grpc_client.is_model_ready("mlp")  # nothing was unloaded
    assert_still_serving(raw)


# -- size limit --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(datatype_repo):
    with Server(datatype_repo, "--max-request-bytes", "1000") as srv:
        yield srv


def test_request_over_size_limit(small_server):
    with httpx.Client(base_url=f"http://{small_server.http_url}", timeout=10) as client:
        big = {"inputs": [{"name": "x", "shape": [16, 16], "datatype": "FP32", "data": [0.25] * 256}]}
        content = body(big)
        assert len(content) > 1000
        assert_error(client.post(MLP, content=content), 413, "1000")

        # small on the wire, big once inflated: still refused
        packed = gzip.compress(content)
        assert len(packed) < 1000
        assert_error(client.post(MLP, content=packed, headers={"Content-Encoding": "gzip"}), 413, "decompressed", "1000")

        # a request under the limit works on the same server
        r = client.post(MLP, content=gzip.compress(body({"inputs": [X_JSON]})), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text


def test_grpc_request_over_size_limit(small_server):
    grpc_client = grpcclient.InferenceServerClient(small_server.grpc_url)
    status, message = _grpc_code(lambda: grpc_client.infer("mlp", [_x(np.zeros((16, 16), np.float32))]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED"
    assert "1000" in message or "larger than max" in message
    assert grpc_client.infer("mlp", [_x(np.zeros((1, 16), np.float32))]).as_numpy("probs").shape == (1, 4)


# -- gRPC --------------------------------------------------------------------------------------

def _grpc_code(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def _x(data: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def assert_grpc_still_serving(grpc_client) -> None:
    result = grpc_client.infer("mlp", [_x(np.zeros((1, 16), np.float32))])
    assert result.as_numpy("probs").shape == (1, 4)


def test_grpc_unknown_model_and_version(grpc_client):
    x = np.zeros((1, 16), np.float32)
    status, message = _grpc_code(lambda: grpc_client.infer("no_such_model", [_x(x)]))
    assert status == "StatusCode.NOT_FOUND" and "'no_such_model'" in message
    status, message = _grpc_code(lambda: grpc_client.infer("mlp", [_x(x)], model_version="7"))
    assert status == "StatusCode.NOT_FOUND" and "7" in message
    status, message = _grpc_code(lambda: grpc_client.infer("mlp", [_x(x)], model_version="one"))
    assert status == "StatusCode.INVALID_ARGUMENT" and "'one'" in message
    status, message = _grpc_code(lambda: grpc_client.get_model_metadata("mlp", "one"))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_grpc_still_serving(grpc_client)


@pytest.mark.parametrize("data,datatype,fragments", [
    (np.zeros((1, 15), np.float32), "FP32", ["input 'x'", "[-1, 16]", "[1, 15]"]),
    (np.zeros((16,), np.float32), "FP32", ["input 'x'", "[-1, 16]", "[16]"]),
    (np.zeros((1, 16), np.int32), "INT32", ["input 'x'", "expected datatype FP32", "got INT32"]),
    (np.zeros((17, 16), np.float32), "FP32", ["batch size 17", "max_batch_size"]),
], ids=["wrong-dim", "wrong-rank", "wrong-datatype", "batch-over-max"])
def test_grpc_invalid_input(grpc_client, data, datatype, fragments):
    status, message = _grpc_code(lambda: grpc_client.infer("mlp", [_x(data, datatype)]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert_grpc_still_serving(grpc_client)


def _mlp_request(**fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="mlp", **fields)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    return request


def test_grpc_raw_contents_count_mismatch(stub, grpc_client):
    request = _mlp_request()
    request.raw_input_contents.extend([X_BYTES, X_BYTES])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 raw_input_contents for 1 inputs" in info.value.details()

    request = _mlp_request()
    request.raw_input_contents.append(X_BYTES[:60])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in info.value.details() and "expected 64" in info.value.details()

    request = _mlp_request()  # neither raw nor typed contents: zero elements for a [1, 16] tensor
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'x'" in info.value.details()
    assert_grpc_still_serving(grpc_client)


def test_grpc_reserved_parameters(stub, grpc_client):
    request = _mlp_request(id="r1")
    request.raw_input_contents.append(X_BYTES)
    request.parameters["triton_foo"].bool_param = True
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'triton_foo'" in info.value.details()

    del request.parameters["triton_foo"]
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == "r1" and len(response.raw_output_contents) == 2
    assert_grpc_still_serving(grpc_client)


def test_grpc_unknown_output_and_datatype(stub, grpc_client):
    request = _mlp_request()
    request.raw_input_contents.append(X_BYTES)
    request.outputs.add(name="nope")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'nope'" in info.value.details()

    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FLOAT32", shape=[1, 16])
    request.raw_input_contents.append(X_BYTES)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in info.value.details() and "FLOAT32" in info.value.details()
    assert_grpc_still_serving(grpc_client)
