"""The V2 / Open Inference Protocol as tritonclient (HTTP, HTTP aio, gRPC) and raw HTTP see it.

Everything runs against the real server process of the session ``server`` fixture, on the
``datatype_repo`` models: ``mlp`` (config.pbtxt, max_batch_size 16, two outputs), ``multi`` and
the ``identity_<datatype>`` models (no config: derived from the ONNX file, batching).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import queue
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def models(datatype_repo) -> set[str]:
    """Every model folder of the repository (all load in mode "none")."""
    return {d.name for d in datatype_repo.iterdir() if d.is_dir()}


def mlp_batch(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def http_mlp_input(x: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def grpc_input(name: str, data: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def assert_mlp_outputs(probs: np.ndarray, logits: np.ndarray, rows: int) -> None:
    """probs = softmax(logits), row by row: a check of real model output without re-implementing it."""
    assert probs.shape == logits.shape == (rows, 4)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


# -- health ------------------------------------------------------------------------------------

def test_health_http(http, raw):
    assert http.is_server_live()
    assert http.is_server_ready()
    assert http.is_model_ready("mlp")
    assert http.is_model_ready("mlp", "1")
    assert not http.is_model_ready("no_such_model")
    assert not http.is_model_ready("mlp", "2")

    r = raw.get("/v2/models/mlp/versions/1/ready")
    assert r.status_code == 200
    r = raw.get("/v2/models/no_such_model/ready")
    assert r.status_code == 404 and "no_such_model" in r.json()["error"]
    r = raw.get("/v2/models/mlp/versions/one/ready")  # a non-numeric version does not match any route
    assert r.status_code == 404
    assert r.json() == {"error": "Not Found"}


def test_health_grpc(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("mlp")
    assert grpc_client.is_model_ready("mlp", "1")
    with pytest.raises(InferenceServerException) as info:
        grpc_client.is_model_ready("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()


# -- metadata ----------------------------------------------------------------------------------

def test_server_metadata(http, grpc_client):
    doc = http.get_server_metadata()
    assert isinstance(doc["name"], str) and isinstance(doc["version"], str)
    assert isinstance(doc["extensions"], list)
    assert {"binary_tensor_data", "statistics"} <= set(doc["extensions"])

    reply = grpc_client.get_server_metadata()
    assert reply.name == doc["name"] and reply.version == doc["version"]
    assert list(reply.extensions) == doc["extensions"]


def test_model_metadata_http(http):
    doc = http.get_model_metadata("mlp")
    assert doc == {
        "name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert http.get_model_metadata("mlp", "1") == doc
    # no config file: everything comes from the ONNX signature, symbolic first dim = batch
    doc = http.get_model_metadata("identity_bytes")
    assert doc["platform"] == "onnxruntime_onnx" and doc["versions"] == ["1"]
    assert doc["inputs"] == [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1, 4]}]
    assert doc["outputs"] == [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1, 4]}]


def test_model_metadata_grpc(grpc_client):
    reply = grpc_client.get_model_metadata("mlp")
    assert reply.name == "mlp" and list(reply.versions) == ["1"] and reply.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [
        ("probs", "FP32", [-1, 4]), ("logits", "FP32", [-1, 4])]
    reply = grpc_client.get_model_metadata("identity_int64", "1")
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.inputs] == [("INPUT0", "INT64", [-1, 4])]
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_model_metadata("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


# -- config ------------------------------------------------------------------------------------

def test_model_config_http(raw, http):
    r = raw.get("/v2/models/mlp/config")
    assert r.status_code == 200
    cfg = r.json()
    assert cfg["name"] == "mlp" and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["max_batch_size"] == 16 and type(cfg["max_batch_size"]) is int
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [("x", "TYPE_FP32", [16])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["output"]] == [
        ("probs", "TYPE_FP32", [4]), ("logits", "TYPE_FP32", [4])]
    for tensor in cfg["input"] + cfg["output"]:  # int64 rendered as JSON numbers, not strings
        assert all(type(d) is int for d in tensor["dims"])
        assert tensor["is_shape_tensor"] is False
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert cfg["instance_group"][0]["count"] == 2 and cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert "sequence_batching" not in cfg and "ensemble_scheduling" not in cfg
    assert http.get_model_config("mlp", "1") == cfg

    derived = raw.get("/v2/models/identity_bytes/config").json()
    assert derived["input"][0]["data_type"] == "TYPE_STRING"  # BYTES is TYPE_STRING in configs
    assert derived["max_batch_size"] > 0 and derived["input"][0]["dims"] == [4]


def test_model_config_grpc(grpc_client):
    doc = grpc_client.get_model_config("mlp", as_json=True)
    cfg = doc["config"]
    assert cfg["name"] == "mlp"
    assert int(cfg["max_batch_size"]) == 16
    assert cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in cfg["input"][0]["dims"]] == [16]  # protobuf's printer quotes int64
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert cfg["instance_group"][0]["count"] == 2
    reply = grpc_client.get_model_config("identity_fp32")
    assert reply.config.input[0].name == "INPUT0" and list(reply.config.input[0].dims) == [4]


# -- statistics --------------------------------------------------------------------------------

def _walk_counters(node, path=""):
    """Every leaf under a stats entry except name/version/type strings."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in ("name", "version", "type"):
                yield from _walk_counters(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_counters(value, f"{path}[{i}]")
    else:
        yield path, node


def test_statistics_http(http, raw, models):
    def mlp_stats():
        entries = raw.get("/v2/models/mlp/stats").json()["model_stats"]
        assert len(entries) == 1
        return entries[0]

    before = mlp_stats()
    n = 5
    for i in range(n):
        http.infer("mlp", [http_mlp_input(mlp_batch(1, i))])
    after = mlp_stats()
    assert after["name"] == "mlp" and after["version"] == "1"
    for path, value in _walk_counters(after):
        assert type(value) is int and value >= 0, path
    stats_before, stats_after = before["inference_stats"], after["inference_stats"]
    assert stats_after["success"]["count"] - stats_before["success"]["count"] >= n
    assert stats_after["queue"]["count"] - stats_before["queue"]["count"] >= n
    assert stats_after["compute_infer"]["ns"] > stats_before["compute_infer"]["ns"]
    assert after["inference_count"] - before["inference_count"] >= n
    assert after["execution_count"] >= 1
    assert after["last_inference"] > 0
    assert {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
            "cache_hit", "cache_miss"} <= set(stats_after)

    assert http.get_inference_statistics("mlp", "1")["model_stats"] == [mlp_stats()]
    every = raw.get("/v2/models/stats").json()["model_stats"]
    assert {e["name"] for e in every} == models
    assert all(e["version"] == "1" for e in every)


def test_statistics_grpc(grpc_client, models):
    def success_count():
        reply = grpc_client.get_inference_statistics("mlp")
        assert [(s.name, s.version) for s in reply.model_stats] == [("mlp", "1")]
        return reply.model_stats[0].inference_stats

    before = success_count()
    grpc_client.infer("mlp", [grpc_input("x", mlp_batch(3))])
    after = success_count()
    assert after.success.count == before.success.count + 1
    assert after.queue.count == before.queue.count + 1
    every = grpc_client.get_inference_statistics()
    assert {s.name for s in every.model_stats} == models


# -- repository --------------------------------------------------------------------------------

def test_repository_index(http, grpc_client, models):
    rows = http.get_model_repository_index()
    assert isinstance(rows, list)
    assert {r["name"] for r in rows} == models
    assert all(r["version"] == "1" and r["state"] == "READY" for r in rows)

    reply = grpc_client.get_model_repository_index()
    assert sorted((m.name, m.version, m.state) for m in reply.models) == sorted(
        (r["name"], r["version"], r["state"]) for r in rows)


# -- compression -------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_http_compression_tritonclient(http, algorithm):
    x = mlp_batch(4)
    result = http.infer("mlp", [http_mlp_input(x)], request_compression_algorithm=algorithm,
                        response_compression_algorithm=algorithm)
    assert_mlp_outputs(result.as_numpy("probs"), result.as_numpy("logits"), 4)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_http_compression_on_the_wire(raw, algorithm):
    x = np.arange(8, dtype=np.int32).reshape(2, 4)
    doc = {"inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "INT32", "parameters": {"binary_data_size": 32}}],
           "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}
    header = json.dumps(doc).encode()
    body = header + x.tobytes()
    packed = gzip.compress(body) if algorithm == "gzip" else zlib.compress(body)
    with raw.stream("POST", "/v2/models/identity_int32/infer", content=packed, headers={
            "Content-Encoding": algorithm, "Accept-Encoding": algorithm,
            "Inference-Header-Content-Length": str(len(header))}) as r:
        wire = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert r.headers["content-encoding"] == algorithm
    assert int(r.headers["content-length"]) == len(wire)
    plain = gzip.decompress(wire) if algorithm == "gzip" else zlib.decompress(wire)
    # the header length refers to the uncompressed body
    json_len = int(r.headers["inference-header-content-length"])
    out = json.loads(plain[:json_len])["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 32
    assert len(plain) == json_len + 32
    np.testing.assert_array_equal(np.frombuffer(plain[json_len:], np.int32).reshape(2, 4), x)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_grpc_compression(grpc_client, algorithm):
    x = mlp_batch(2)
    result = grpc_client.infer("mlp", [grpc_input("x", x)], compression_algorithm=algorithm)
    assert_mlp_outputs(result.as_numpy("probs"), result.as_numpy("logits"), 2)


# -- infer details -----------------------------------------------------------------------------

def test_request_id_echo(http, grpc_client):
    x = mlp_batch(1)
    assert http.infer("mlp", [http_mlp_input(x)], request_id="req-7").get_response()["id"] == "req-7"
    assert "id" not in http.infer("mlp", [http_mlp_input(x)]).get_response()
    assert grpc_client.infer("mlp", [grpc_input("x", x)], request_id="req-8").get_response().id == "req-8"


def test_no_outputs_binary_data_output_true(raw):
    x = mlp_batch(2)
    doc = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.tolist()}],
           "parameters": {"binary_data_output": True}}
    r = raw.post("/v2/models/mlp/infer", json=doc)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    json_len = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:json_len])
    assert [o["name"] for o in head["outputs"]] == ["probs", "logits"]  # every output, model order
    assert all(o["parameters"] == {"binary_data_size": 32} and "data" not in o for o in head["outputs"])
    assert len(r.content) == json_len + 64
    probs = np.frombuffer(r.content[json_len:json_len + 32], np.float32).reshape(2, 4)
    logits = np.frombuffer(r.content[json_len + 32:], np.float32).reshape(2, 4)
    assert_mlp_outputs(probs, logits, 2)


@pytest.mark.parametrize("parameters", [{"binary_data_output": False}, None])
def test_no_outputs_binary_data_output_false(raw, parameters):
    x = mlp_batch(2)
    doc = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    if parameters is not None:
        doc["parameters"] = parameters
    r = raw.post("/v2/models/mlp/infer", json=doc)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in r.headers
    outputs = r.json()["outputs"]
    assert [o["name"] for o in outputs] == ["probs", "logits"]
    assert all("parameters" not in o and o["shape"] == [2, 4] and len(o["data"]) == 8 for o in outputs)
    assert_mlp_outputs(np.array(outputs[0]["data"], np.float32).reshape(2, 4),
                       np.array(outputs[1]["data"], np.float32).reshape(2, 4), 2)


@pytest.mark.parametrize("data", [[[1, 2, 3, 4], [5, 6, 7, 8]], [1, 2, 3, 4, 5, 6, 7, 8], [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]],
                         ids=["nested", "flat", "deeper"])
def test_json_data_nested_or_flat(raw, data):
    doc = {"inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "INT32", "data": data}],
           "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}]}
    r = raw.post("/v2/models/identity_int32/infer", json=doc)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 4] and out["data"] == [1, 2, 3, 4, 5, 6, 7, 8]  # written flat


def test_versioned_infer_path(http, raw):
    x = mlp_batch(1)
    result = http.infer("mlp", [http_mlp_input(x)], model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert_mlp_outputs(result.as_numpy("probs"), result.as_numpy("logits"), 1)

    doc = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    assert raw.post("/v2/models/mlp/versions/1/infer", json=doc).status_code == 200
    r = raw.post("/v2/models/mlp/versions/7/infer", json=doc)
    assert r.status_code == 404 and "7" in r.json()["error"]
    with pytest.raises(InferenceServerException) as info:
        http.infer("mlp", [http_mlp_input(x)], model_version="7")
    assert info.value.status() == "404"


def test_http_aio_round_trip(server):
    x = mlp_batch(3)

    async def go():
        client = aiohttpclient.InferenceServerClient(server.http_url)
        try:
            assert await client.is_server_ready()
            assert (await client.get_model_metadata("mlp"))["name"] == "mlp"
            inp = aiohttpclient.InferInput("x", [3, 16], "FP32")
            inp.set_data_from_numpy(x)
            outs = [aiohttpclient.InferRequestedOutput("probs"), aiohttpclient.InferRequestedOutput("logits", binary_data=False)]
            return await client.infer("mlp", [inp], outputs=outs, request_id="aio-1")
        finally:
            await client.close()

    result = asyncio.run(go())
    assert result.get_response()["id"] == "aio-1"
    assert_mlp_outputs(result.as_numpy("probs"), result.as_numpy("logits"), 3)


# -- gRPC streaming ----------------------------------------------------------------------------

def test_grpc_stream_survives_a_failing_request(server):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = {}
        for i in range(3):
            data = np.full((1, 4), i + 0.5, np.float32)
            client.async_stream_infer("identity_fp32", [grpc_input("INPUT0", data)], request_id=f"ok-{i}")
            sent[f"ok-{i}"] = data
        client.async_stream_infer("identity_fp32", [grpc_input("INPUT0", np.zeros((1, 3), np.float32))],
                                  request_id="bad")
        got = [answers.get(timeout=10) for _ in range(4)]
        results = {r.get_response().id: r for r, e in got if e is None}
        errors = [e for r, e in got if e is not None]
        assert len(errors) == 1 and "INPUT0" in errors[0].message() and "[1, 3]" in errors[0].message()
        assert set(results) == set(sent)
        for rid, data in sent.items():
            np.testing.assert_array_equal(results[rid].as_numpy("OUTPUT0"), data)

        # the stream is still usable after the failure
        data = np.arange(8, dtype=np.float32).reshape(2, 4)
        client.async_stream_infer("identity_fp32", [grpc_input("INPUT0", data)], request_id="after")
        result, error = answers.get(timeout=10)
        assert error is None and result.get_response().id == "after"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    finally:
        client.stop_stream()
        client.close()


def test_grpc_stream_error_carries_request_id(stub):
    """In-stream errors name the request (``infer_response.id``) and mark it final."""
    def request(rid: str, cols: int) -> service_pb2.ModelInferRequest:
        req = service_pb2.ModelInferRequest(model_name="identity_fp32", id=rid)
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, cols])
        req.raw_input_contents.append(np.ones((1, cols), np.float32).tobytes())
        return req

    responses = list(stub.ModelStreamInfer(iter([request("good", 4), request("bad", 2)]), timeout=10))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"good", "bad"}
    assert by_id["good"].error_message == ""
    assert by_id["bad"].error_message and "INPUT0" in by_id["bad"].error_message
    assert by_id["bad"].infer_response.model_name == "identity_fp32"
    for r in responses:
        assert r.infer_response.parameters["triton_final_response"].bool_param is True
    np.testing.assert_array_equal(np.frombuffer(by_id["good"].infer_response.raw_output_contents[0], np.float32),
                                  np.ones(4, np.float32))
