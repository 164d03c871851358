"""Replay what perf_analyzer's C++ client does, byte for byte where it matters (PROTOCOLS.md §7.3, §8).

perf_analyzer is not installable here (the PyPI package is a placeholder), so these tests send
its call sequence with httpx and raw gRPC stubs and parse the answers by its rules:

- HTTP: ``GET /v2/models/M``, ``GET .../config``, ``GET /v2``, stats around a window, then infer
  requests with ``Expect:`` empty, ``Inference-Header-Content-Length`` on every request,
  ``"id":""`` and every metadata output listed with ``binary_data``;
- gRPC: ServerMetadata, ModelMetadata, ModelConfig (read through protobuf's JSON printer),
  ModelStatistics, ModelInfer carrying ``triton_enable_empty_final_response``.
"""

from __future__ import annotations

import json
import re

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict, MessageToJson
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import Server, save_model

V2_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BYTES", "BF16"}
NUMPY = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}
#: every inference_stats entry perf_analyzer reads (it skips only ``fail``)
PA_STAT_KINDS = ("success", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
CPP_HEADERS = {"User-Agent": "libcurl-agent/1.0", "Accept": "*/*", "Expect": ""}


def _int(value, what: str) -> int:
    """perf_analyzer reads ints from JSON numbers or integer strings (gRPC replies via protobuf's printer)."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    assert isinstance(value, int) and not isinstance(value, bool), f"{what}: {value!r} is not an integer"
    return value


def check_pa_consistency(metadata: dict, config: dict, server_metadata: dict) -> dict:
    """Apply perf_analyzer's model_parser rules (§8.3); return the per-request input shapes it would use
    (metadata shapes with the batch dim dropped when ``max_batch_size`` > 0)."""
    assert isinstance(metadata.get("name"), str) and metadata["name"], "metadata needs a name"
    assert isinstance(server_metadata.get("extensions"), list), "server metadata needs an 'extensions' array"
    assert all(isinstance(e, str) for e in server_metadata["extensions"])

    max_batch_size = _int(config.get("max_batch_size", 0), "max_batch_size")
    assert max_batch_size >= 0
    tensors: dict[str, dict[str, list[int]]] = {}
    for kind in ("inputs", "outputs"):
        tensors[kind] = {}
        for tensor in metadata.get(kind, []):
            assert isinstance(tensor["name"], str), tensor
            assert tensor["datatype"] in V2_DATATYPES, f"{tensor['name']}: datatype {tensor['datatype']!r}"
            shape = [_int(d, f"{tensor['name']} shape") for d in tensor["shape"]]
            if max_batch_size > 0:
                # perf_analyzer drops shape[0] blindly: it must be the batch dimension
                assert shape and shape[0] == -1, f"{tensor['name']}: batching model but shape {shape}"
                shape = shape[1:]
            tensors[kind][tensor["name"]] = shape
    assert tensors["inputs"], "metadata lists no inputs"
    for key, kind in (("input", "inputs"), ("output", "outputs")):
        for tensor in config.get(key, []):
            assert tensor["name"] in tensors[kind], f"no metadata found for {key} tensor {tensor['name']!r}"
            for flag in ("is_shape_tensor", "optional"):
                if flag in tensor:
                    assert isinstance(tensor[flag], bool), (tensor["name"], flag)
    # keys whose mere presence switches perf_analyzer into another mode
    if "model_transaction_policy" in config:
        assert isinstance(config["model_transaction_policy"]["decoupled"], bool)
    if "response_cache" in config:
        assert isinstance(config["response_cache"]["enable"], bool)
    if config.get("platform") == "ensemble":
        for step in config["ensemble_scheduling"]["step"]:
            assert isinstance(step["model_name"], str)
            _int(step["model_version"], "ensemble step model_version")
    return {"max_batch_size": max_batch_size, **tensors}


def check_pa_statistics(doc: dict, model: str, json_numbers: bool = True) -> dict[str, dict]:
    """perf_analyzer's reading of a stats reply (§8.4): every field present, counters unsigned ints,
    version a numeric string. ``json_numbers``: HTTP must send JSON numbers; protobuf's JSON printer
    (gRPC) quotes uint64. Returns the entries by version."""
    def uint(value, what):
        if json_numbers:
            assert type(value) is int, f"{what}: {value!r} is not a JSON integer"
        value = _int(value, what)
        assert value >= 0, what
        return value

    by_version = {}
    for entry in doc["model_stats"]:
        assert entry["name"] == model
        assert isinstance(entry["version"], str) and entry["version"].isdigit(), entry["version"]
        uint(entry["inference_count"], "inference_count")
        uint(entry["execution_count"], "execution_count")
        for kind in PA_STAT_KINDS:
            for field in ("count", "ns"):
                uint(entry["inference_stats"][kind][field], f"inference_stats.{kind}.{field}")
        by_version[entry["version"]] = entry
    return by_version


def queue_counts(by_version: dict) -> dict[str, int]:
    return {v: int(e["inference_stats"]["queue"]["count"]) for v, e in by_version.items()}


def cpp_infer_body(metadata: dict, batch: int, data: dict[str, np.ndarray], binary_outputs: bool,
                   request_id: str = "") -> tuple[dict, bytes]:
    """The body the C++ HTTP client builds: ``id`` always present, inputs as binary, every metadata
    output listed with ``binary_data``; header length sent even when nothing binary follows."""
    inputs, chunks = [], []
    for tensor in metadata["inputs"]:
        array = data[tensor["name"]]
        raw = array.tobytes()
        inputs.append({"name": tensor["name"], "shape": list(array.shape), "datatype": tensor["datatype"],
                       "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    doc = {"id": request_id, "inputs": inputs,
           "outputs": [{"name": t["name"], "parameters": {"binary_data": binary_outputs}} for t in metadata["outputs"]]}
    head = json.dumps(doc, separators=(",", ":")).encode()
    headers = {**CPP_HEADERS, "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return headers, head + b"".join(chunks)


def parse_cpp_response(r: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """Parse as the C++ client does: JSON of exactly the header's length, then a slice per output that
    has parameters (which must then carry binary_data_size), in ``outputs`` order."""
    assert r.status_code == 200, r.text
    content = r.content
    length = r.headers.get("inference-header-content-length")
    json_len = int(length) if length is not None else len(content)
    doc = json.loads(content[:json_len])
    slices, offset = {}, json_len
    for out in doc["outputs"]:
        if "parameters" in out:
            size = out["parameters"]["binary_data_size"]  # KeyError = what breaks perf_analyzer
            slices[out["name"]] = content[offset:offset + size]
            offset += size
    assert offset == len(content), f"{len(content) - offset} bytes not claimed by any output"
    return doc, slices


def pa_http_setup(raw: httpx.Client, model: str, version: str | None) -> tuple[dict, dict, dict, str]:
    """§8.1 steps 1-3, in perf_analyzer's order."""
    base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    metadata = raw.get(base)
    assert metadata.status_code == 200, metadata.text
    config = raw.get(base + "/config")
    assert config.status_code == 200, "failed to get model config: " + config.text
    server_metadata = raw.get("/v2")
    assert server_metadata.status_code == 200
    return metadata.json(), config.json(), server_metadata.json(), base


# -- HTTP --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [None, "1"], ids=["no-x", "x1"])
def test_http_benchmark_sequence_mlp(raw, version):
    metadata, config, server_metadata, base = pa_http_setup(raw, "mlp", version)
    spec = check_pa_consistency(metadata, config, server_metadata)
    assert spec == {"max_batch_size": 16, "inputs": {"x": [16]}, "outputs": {"probs": [4], "logits": [4]}}
    assert "statistics" in server_metadata["extensions"]

    before = check_pa_statistics(raw.get(base + "/stats").json(), "mlp")
    batch = 4  # perf_analyzer -b 4
    rng = np.random.default_rng(1)
    for i in range(3):
        x = rng.standard_normal((batch, *spec["inputs"]["x"])).astype(np.float32)
        headers, content = cpp_infer_body(metadata, batch, {"x": x}, binary_outputs=True)
        r = raw.post(base + "/infer", content=content, headers=headers)
        doc, slices = parse_cpp_response(r)
        assert doc["id"] == ""  # echoed even when empty
        assert doc["model_name"] == "mlp" and doc["model_version"] == "1"
        assert [o["name"] for o in doc["outputs"]] == ["probs", "logits"]  # the order they were asked in
        for out in doc["outputs"]:
            assert out["shape"] == [batch, 4] and out["datatype"] == "FP32" and "data" not in out
            assert out["parameters"]["binary_data_size"] == batch * 4 * 4
        probs = np.frombuffer(slices["probs"], np.float32).reshape(batch, 4)
        logits = np.frombuffer(slices["logits"], np.float32).reshape(batch, 4)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    after = check_pa_statistics(raw.get(base + "/stats").json(), "mlp")
    # with no -x perf_analyzer picks the version whose queue count rose during the window
    grew = [v for v, n in queue_counts(after).items() if n > queue_counts(before).get(v, 0)]
    assert grew == ["1"]
    assert queue_counts(after)["1"] - queue_counts(before)["1"] == 3


def test_http_output_order_and_sizes_multi(raw):
    """Outputs of different sizes and datatypes: the binary slices must follow ``outputs`` order."""
    metadata, config, server_metadata, base = pa_http_setup(raw, "multi", None)
    spec = check_pa_consistency(metadata, config, server_metadata)
    assert spec["inputs"] == {"a": [3], "b": [2]}
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, -2], [3, 40]], dtype=np.int64)
    headers, content = cpp_infer_body(metadata, 2, {"a": a, "b": b}, binary_outputs=True, request_id="17")
    doc, slices = parse_cpp_response(raw.post(base + "/infer", content=content, headers=headers))
    assert doc["id"] == "17"
    assert [o["name"] for o in doc["outputs"]] == [t["name"] for t in metadata["outputs"]]
    for out in doc["outputs"]:
        itemsize = np.dtype(NUMPY[out["datatype"]]).itemsize
        assert out["parameters"]["binary_data_size"] == int(np.prod(out["shape"])) * itemsize
    np.testing.assert_array_equal(np.frombuffer(slices["sum"], np.float32).reshape(2, 3), a + 1)
    np.testing.assert_array_equal(np.frombuffer(slices["prod"], np.int64).reshape(2, 2), b * 2)
    np.testing.assert_array_equal(np.frombuffer(slices["cat"], np.float32).reshape(2, 5),
                                  np.concatenate([a, b.astype(np.float32)], axis=1))


def test_http_pure_json_request_with_header_length(raw):
    """``--input-data`` JSON + ``--output-tensor-format json``: the C++ client still sends the header,
    equal to the whole body; JSON outputs must come back without ``parameters``."""
    metadata, config, server_metadata, base = pa_http_setup(raw, "mlp", None)
    check_pa_consistency(metadata, config, server_metadata)
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    doc = {"id": "", "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.reshape(-1).tolist()}],
           "outputs": [{"name": t["name"], "parameters": {"binary_data": False}} for t in metadata["outputs"]]}
    content = json.dumps(doc, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Inference-Header-Content-Length": str(len(content))}
    r = raw.post(base + "/infer", content=content, headers=headers)
    assert r.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in r.headers
    reply, slices = parse_cpp_response(r)
    assert slices == {} and reply["id"] == ""
    assert [o["name"] for o in reply["outputs"]] == ["probs", "logits"]
    for out in reply["outputs"]:
        assert "parameters" not in out  # the C++ client would take it for a binary output
        assert out["shape"] == [2, 4] and len(out["data"]) == 8


def test_http_async_ids_are_echoed(raw):
    """--async: a distinct decimal id per request, matched on the response's id."""
    metadata, _, _, base = pa_http_setup(raw, "identity_fp32", None)
    for rid in ("0", "1", "123456789"):
        x = np.full((1, 4), float(rid), np.float32)
        headers, content = cpp_infer_body(metadata, 1, {"INPUT0": x}, binary_outputs=True, request_id=rid)
        doc, slices = parse_cpp_response(raw.post(base + "/infer", content=content, headers=headers))
        assert doc["id"] == rid
        np.testing.assert_array_equal(np.frombuffer(slices["OUTPUT0"], np.float32), x.reshape(-1))


# -- a non-batching model with a variable dim (zero-size tensors) ------------------------------

@pytest.fixture(scope="module")
def vec_server(tmp_path_factory):
    """``vec``: x FP32 [2, n] -> y = x, z FP32 [3] -> w = z; fixed first dim, so max_batch_size 0."""
    repo = tmp_path_factory.mktemp("pa_repo")
    save_model(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["z"], ["w"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "n"]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "n"]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])],
        repo / "vec" / "1" / "model.onnx",
    )
    with Server(repo) as srv:
        yield srv


def test_http_non_batching_and_zero_size(vec_server):
    with httpx.Client(base_url=f"http://{vec_server.http_url}", timeout=10, headers=CPP_HEADERS) as client:
        metadata, config, server_metadata, base = pa_http_setup(client, "vec", None)
        spec = check_pa_consistency(metadata, config, server_metadata)
        assert spec == {"max_batch_size": 0, "inputs": {"x": [2, -1], "z": [3]}, "outputs": {"y": [2, -1], "w": [3]}}
        z = np.array([1, 2, 3], np.float32)
        headers, content = cpp_infer_body(metadata, 0, {"x": np.zeros((2, 0), np.float32), "z": z}, binary_outputs=True)
        doc, slices = parse_cpp_response(client.post(base + "/infer", content=content, headers=headers))
        assert [(o["name"], o["shape"], o["parameters"]["binary_data_size"]) for o in doc["outputs"]] == [
            ("y", [2, 0], 0), ("w", [3], 12)]
        assert slices["y"] == b"" and np.frombuffer(slices["w"], np.float32).tolist() == [1, 2, 3]


# -- gRPC --------------------------------------------------------------------------------------

def _json(message) -> dict:
    """How perf_analyzer reads gRPC metadata/config replies: protobuf's JSON printer."""
    return json.loads(MessageToJson(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True))


def _stub(url: str):
    channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 2**31 - 1),
                                                  ("grpc.max_send_message_length", 2**31 - 1)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def pa_grpc_setup(stub, model: str, version: str = "") -> tuple[dict, dict, dict]:
    """§8.2: ServerMetadata, ModelMetadata, ModelConfig, each through the JSON printer."""
    server_metadata = _json(stub.ServerMetadata(service_pb2.ServerMetadataRequest(), timeout=10))
    metadata = _json(stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model, version=version), timeout=10))
    config = _json(stub.ModelConfig(service_pb2.ModelConfigRequest(name=model, version=version), timeout=10))
    return metadata, config["config"], server_metadata


def cpp_grpc_request(metadata: dict, data: dict[str, np.ndarray], request_id: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=metadata["name"], model_version="", id=request_id)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for tensor in metadata["inputs"]:
        array = data[tensor["name"]]
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    for tensor in metadata["outputs"]:
        request.outputs.add(name=tensor["name"])
    return request


def test_grpc_benchmark_sequence_mlp(stub):
    metadata, config, server_metadata = pa_grpc_setup(stub, "mlp")
    assert metadata["inputs"][0]["shape"] == ["-1", "16"]  # int64 quoted by the printer, as perf sees it
    spec = check_pa_consistency(metadata, config, server_metadata)
    assert spec == {"max_batch_size": 16, "inputs": {"x": [16]}, "outputs": {"probs": [4], "logits": [4]}}

    def stats():
        reply = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="mlp"), timeout=10)
        return check_pa_statistics(_json(reply), "mlp", json_numbers=False)

    before = stats()
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    response = stub.ModelInfer(cpp_grpc_request(metadata, {"x": x}, request_id="5"), timeout=10)
    assert response.id == "5" and response.model_name == "mlp" and response.model_version == "1"
    assert len(response.raw_output_contents) == len(response.outputs) == 2
    assert [o.name for o in response.outputs] == ["probs", "logits"]
    for out, raw in zip(response.outputs, response.raw_output_contents):
        assert list(out.shape) == [3, 4] and out.datatype == "FP32"
        assert len(raw) == 3 * 4 * 4
        assert not out.contents.fp32_contents  # data only in raw_output_contents
    after = stats()
    assert queue_counts(after)["1"] == queue_counts(before)["1"] + 1


def test_grpc_statistics_every_model(stub):
    reply = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=""), timeout=10)
    entries = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    names = {e["name"] for e in entries["model_stats"]}
    assert {"mlp", "multi", "identity_fp32"} <= names
    for name in names:
        check_pa_statistics({"model_stats": [e for e in entries["model_stats"] if e["name"] == name]},
                            name, json_numbers=False)


def test_grpc_versioned_setup(stub):
    metadata, config, server_metadata = pa_grpc_setup(stub, "multi", "1")
    spec = check_pa_consistency(metadata, config, server_metadata)
    assert spec["max_batch_size"] > 0 and spec["outputs"] == {"sum": [3], "prod": [2], "cat": [5]}


def test_grpc_zero_size_output_keeps_its_raw_entry(vec_server):
    channel, stub = _stub(vec_server.grpc_url)
    with channel:
        metadata, config, server_metadata = pa_grpc_setup(stub, "vec")
        spec = check_pa_consistency(metadata, config, server_metadata)
        assert spec["max_batch_size"] == 0
        z = np.array([4, 5, 6], np.float32)
        response = stub.ModelInfer(cpp_grpc_request(metadata, {"x": np.zeros((2, 0), np.float32), "z": z}), timeout=10)
        assert len(response.raw_output_contents) == len(response.outputs) == 2
        assert [(o.name, list(o.shape)) for o in response.outputs] == [("y", [2, 0]), ("w", [3])]
        assert response.raw_output_contents[0] == b""  # present, empty, at its index
        assert np.frombuffer(response.raw_output_contents[1], np.float32).tolist() == [4, 5, 6]


def test_grpc_streaming_mode(stub):
    """--streaming: ids matched on the stream responses; every response marked final."""
    metadata, _, _ = pa_grpc_setup(stub, "identity_fp32")
    requests = [cpp_grpc_request(metadata, {"INPUT0": np.full((1, 4), i, np.float32)}, request_id=str(i))
                for i in range(5)]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=10))
    assert sorted(r.infer_response.id for r in responses) == [str(i) for i in range(5)]
    for r in responses:
        assert r.error_message == ""
        assert r.infer_response.parameters["triton_final_response"].bool_param is True
        assert len(r.infer_response.raw_output_contents) == len(r.infer_response.outputs) == 1
        expected = float(r.infer_response.id)
        assert np.frombuffer(r.infer_response.raw_output_contents[0], np.float32).tolist() == [expected] * 4
