"""Every V2 datatype round-trips through an identity model: HTTP binary, HTTP JSON, gRPC."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import ALL_DATATYPES, sample

JSON_DATATYPES = [d for d in ALL_DATATYPES if d != "BF16"]  # tritonclient refuses BF16 as JSON


def _assert_same(got: np.ndarray, sent: np.ndarray) -> None:
    assert got.shape == sent.shape
    if sent.dtype == object:
        assert [bytes(v) for v in got.reshape(-1)] == [bytes(v) for v in sent.reshape(-1)]
    else:
        assert got.dtype == sent.dtype
        np.testing.assert_array_equal(got.view(np.uint8), sent.view(np.uint8))


def _http_roundtrip(server, datatype: str, shape, binary: bool, **kwargs):
    data = sample(datatype, shape)
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    inp.set_data_from_numpy(data, binary_data=binary)
    result = client.infer(f"identity_{datatype.lower()}", [inp],
                          outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)], **kwargs)
    return data, result


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_http_binary(server, datatype):
    data, result = _http_roundtrip(server, datatype, (3, 4), True, request_id="r-1")
    _assert_same(result.as_numpy("OUTPUT0"), data)
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("datatype", JSON_DATATYPES)
def test_http_json(server, datatype):
    data, result = _http_roundtrip(server, datatype, (2, 4), False)
    out = result.get_output("OUTPUT0")
    assert "data" in out and "parameters" not in out  # JSON outputs carry no parameters (perf_analyzer)
    got = result.as_numpy("OUTPUT0")
    if datatype == "BYTES":
        assert [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)] == list(data.reshape(-1))
    else:
        np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_grpc(server, datatype):
    data = sample(datatype, (2, 4))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    result = client.infer(f"identity_{datatype.lower()}", [inp], request_id="g-1")
    _assert_same(result.as_numpy("OUTPUT0"), data)
    assert result.get_response().id == "g-1"


@pytest.mark.parametrize("datatype", ["FP32", "INT32", "BOOL", "BYTES", "FP64", "UINT64"])
def test_grpc_typed_contents(server, datatype):
    """Other OIP clients send typed `contents` instead of raw bytes; outputs still come back raw."""
    from google.protobuf import json_format  # noqa: F401
    from tritonclient.grpc import service_pb2

    data = sample(datatype, (1, 4))
    field = {"FP32": "fp32_contents", "INT32": "int_contents", "BOOL": "bool_contents",
             "BYTES": "bytes_contents", "FP64": "fp64_contents", "UINT64": "uint64_contents"}[datatype]
    request = service_pb2.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 4])
    getattr(tensor.contents, field).extend(data.reshape(-1).tolist())
    client = grpcclient.InferenceServerClient(server.grpc_url)
    response = client._client_stub.ModelInfer(request)
    assert len(response.raw_output_contents) == 1
    result = grpcclient.InferResult(response)
    _assert_same(result.as_numpy("OUTPUT0"), data)


def test_multiple_inputs_and_outputs(server):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, 2], [3, 4]], dtype=np.int64)
    http = httpclient.InferenceServerClient(server.http_url)
    ins = [httpclient.InferInput("a", [2, 3], "FP32"), httpclient.InferInput("b", [2, 2], "INT64")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b, binary_data=False)
    # outputs requested in a different order than the model declares, mixed binary/JSON
    outs = [httpclient.InferRequestedOutput("cat", binary_data=True), httpclient.InferRequestedOutput("sum", binary_data=False)]
    result = http.infer("multi", ins, outputs=outs)
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["cat", "sum"]  # only what was asked, in that order
    np.testing.assert_array_equal(result.as_numpy("sum"), a + 1)
    np.testing.assert_array_equal(result.as_numpy("cat"), np.concatenate([a, b.astype(np.float32)], axis=1))
    assert result.as_numpy("prod") is None

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    gins = [grpcclient.InferInput("a", [2, 3], "FP32"), grpcclient.InferInput("b", [2, 2], "INT64")]
    gins[0].set_data_from_numpy(a)
    gins[1].set_data_from_numpy(b)
    result = grpc.infer("multi", gins)  # no outputs listed: all of them
    np.testing.assert_array_equal(result.as_numpy("sum"), a + 1)
    np.testing.assert_array_equal(result.as_numpy("prod"), b * 2)
    np.testing.assert_array_equal(result.as_numpy("cat"), np.concatenate([a, b.astype(np.float32)], axis=1))
