"""TensorFlow Serving REST and KServe V1 on ``/v1``, against a real server process.

Requests are written as the TF Serving REST API docs and the KServe V1 docs show them (plain JSON over
httpx). Where both protocols can carry the same input, the answer must equal the V2 infer route's.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from conftest import Server, mlp_model, multi_io_model, save_model, scale_model
from onnx import TensorProto, helper

MLP_CONFIG = (
    'name: "mlp"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 16\n'
    'input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    'output [ { name: "probs" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "logits" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
)
ECHO = "echo.bytes-v1"  # dots and dashes in a model name


def half_plus_two(path):
    """TF Serving's example model: y = 0.5 x + 2 on a 1-D batch."""
    half = helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    return save_model(
        [helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Add", ["hx", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        path, [half, two],
    )


def echo_bytes(path):
    """One BYTES input, echoed as ``echo`` (plain strings in TF JSON) and ``echo_bytes`` (b64 in TF JSON)."""
    return save_model(
        [helper.make_node("Identity", ["text"], ["echo"]), helper.make_node("Identity", ["text"], ["echo_bytes"])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("echo_bytes", TensorProto.STRING, ["batch"])],
        path,
    )


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    repo = tmp_path_factory.mktemp("v1repo")
    half_plus_two(repo / "half_plus_two" / "1" / "model.onnx")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    (repo / "mlp" / "config.pbtxt").write_text(MLP_CONFIG)
    multi_io_model(repo / "multi" / "1" / "model.onnx")
    echo_bytes(repo / ECHO / "1" / "model.onnx")
    scale_model(repo / "fixed" / "1" / "model.onnx", 3.0, dims=(2, 3))  # fixed first dim: no batching
    scale_model(repo / "scale" / "1" / "model.onnx", 1.0)
    scale_model(repo / "scale" / "2" / "model.onnx", 2.0)
    (repo / "scale" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
    (repo / "corrupt" / "1").mkdir(parents=True)
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not onnx")
    with Server(repo) as server:
        yield server


@pytest.fixture(scope="module")
def c(srv):
    with httpx.Client(base_url=f"http://{srv.http_url}", timeout=20) as client:
        yield client


def predict(c, path: str, body) -> httpx.Response:
    return c.post(f"/v1/models/{path}:predict", content=body if isinstance(body, bytes) else json.dumps(body))


def v2_infer(c, model: str, inputs: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    doc = {"inputs": [{"name": n, "datatype": dt, "shape": list(a.shape), "data": a.reshape(-1).tolist()}
                      for n, (dt, a) in inputs.items()]}
    r = c.post(f"/v2/models/{model}/infer", json=doc)
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


# -- TF Serving: status and metadata --------------------------------------------------------------

def test_status(c):
    r = c.get("/v1/models/half_plus_two")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"name": "half_plus_two", "ready": True, "model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    both = c.get("/v1/models/scale").json()["model_version_status"]
    assert sorted(s["version"] for s in both) == ["1", "2"] and {s["state"] for s in both} == {"AVAILABLE"}
    one = c.get("/v1/models/scale/versions/1").json()["model_version_status"]
    assert [s["version"] for s in one] == ["1"]
    r = c.get("/v1/models/scale/versions/7")
    assert r.status_code == 404 and "version 7" in r.json()["error"]
    r = c.get("/v1/models/nope")
    assert r.status_code == 404 and r.json() == {"error": "Could not find any versions of model nope"}
    r = c.get("/v1/models/corrupt")  # loaded and failed: not ready, the reason shown the TF way
    body = r.json()
    assert r.status_code == 503 and body["ready"] is False and "not ready" in body["error"]
    (status,) = body["model_version_status"]
    assert status["state"] == "END" and status["status"]["error_code"] == "UNKNOWN" and status["status"]["error_message"]


def test_metadata(c):
    r = c.get("/v1/models/mlp/metadata")
    assert r.status_code == 200
    doc = r.json()
    assert doc["model_spec"] == {"name": "mlp", "signature_name": "", "version": "1"}
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict" and sig["defaults"] == {}
    assert sig["inputs"] == {"x": {"dtype": "DT_FLOAT", "name": "x", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}, {"size": "16", "name": ""}], "unknown_rank": False}}}
    assert set(sig["outputs"]) == {"probs", "logits"}
    assert [d["size"] for d in sig["outputs"]["probs"]["tensor_shape"]["dim"]] == ["-1", "4"]
    sig = c.get("/v1/models/multi/metadata").json()["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["b"]["dtype"] == "DT_INT64" and sig["outputs"]["prod"]["dtype"] == "DT_INT64"
    assert c.get(f"/v1/models/{ECHO}/metadata").json()["metadata"]["signature_def"]["signature_def"][
        "serving_default"]["inputs"]["text"]["dtype"] == "DT_STRING"
    assert c.get("/v1/models/scale/versions/1/metadata").json()["model_spec"]["version"] == "1"
    assert c.get("/v1/models/scale/metadata").json()["model_spec"]["version"] == "2"  # latest
    fixed = c.get("/v1/models/fixed/metadata").json()["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert [d["size"] for d in fixed["inputs"]["x"]["tensor_shape"]["dim"]] == ["2", "3"]  # no batch dim
    assert c.get("/v1/models/nope/metadata").status_code == 404


# -- TF Serving: predict ---------------------------------------------------------------------------

def test_predict_docs_example(c):
    # the TF Serving REST docs' half_plus_two calls, verbatim
    r = predict(c, "half_plus_two", {"instances": [1.0, 2.0, 5.0]})
    assert r.status_code == 200 and r.json() == {"predictions": [2.5, 3.0, 4.5]}
    assert predict(c, "half_plus_two", {"signature_name": "serving_default", "inputs": [1.0, 2.0, 5.0]}).json() \
        == {"outputs": [2.5, 3.0, 4.5]}
    # named single input, row and columnar; versioned path; case-insensitive keyword
    assert predict(c, "half_plus_two", {"instances": [{"x": 1.0}, {"x": 3.0}]}).json() == {"predictions": [2.5, 3.5]}
    assert predict(c, "half_plus_two", {"inputs": {"x": [4.0]}}).json() == {"outputs": [4.0]}
    assert predict(c, "half_plus_two/versions/1", {"instances": [0.0]}).json() == {"predictions": [2.0]}
    assert c.post("/v1/models/half_plus_two:PREDICT", json={"instances": [0]}).json() == {"predictions": [2.0]}
    # NaN / Infinity tokens in and out, as TF Serving's JSON allows
    r = predict(c, "half_plus_two", b'{"instances": [NaN, Infinity, -Infinity]}')
    assert r.status_code == 200 and b"NaN" in r.content
    got = r.json()["predictions"]
    assert np.isnan(got[0]) and got[1:] == [float("inf"), float("-inf")]


def test_predict_mlp_equals_v2(c):
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    expected = v2_infer(c, "mlp", {"x": ("FP32", x)})
    r = predict(c, "mlp", {"instances": x.tolist()})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]  # several outputs: one object per row
    assert len(preds) == 3 and all(set(p) == {"probs", "logits"} for p in preds)
    for name in ("probs", "logits"):
        np.testing.assert_allclose(np.array([p[name] for p in preds]), expected[name], rtol=1e-6, atol=1e-7)
    cols = predict(c, "mlp", {"inputs": {"x": x.tolist()}}).json()["outputs"]
    for name in ("probs", "logits"):
        np.testing.assert_allclose(np.array(cols[name]), expected[name], rtol=1e-6, atol=1e-7)


def test_predict_multi_input_equals_v2(c):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    b = np.array([[1, -2], [3, 2**40]], dtype=np.int64)
    expected = v2_infer(c, "multi", {"a": ("FP32", a), "b": ("INT64", b)})
    rows = [{"a": a[i].tolist(), "b": b[i].tolist()} for i in range(2)]
    preds = predict(c, "multi", {"instances": rows}).json()["predictions"]
    assert [p["prod"] for p in preds] == (b * 2).tolist() == expected["prod"].tolist()
    assert all(isinstance(v, int) for p in preds for v in p["prod"])  # int64 stays an integer
    np.testing.assert_allclose([p["sum"] for p in preds], expected["sum"])
    np.testing.assert_allclose([p["cat"] for p in preds], expected["cat"])
    cols = predict(c, "multi", {"inputs": {"a": a.tolist(), "b": b.tolist()}}).json()["outputs"]
    assert cols["prod"] == expected["prod"].tolist() and set(cols) == {"sum", "prod", "cat"}
    np.testing.assert_allclose(cols["cat"], expected["cat"])


def test_predict_bytes_b64(c):
    data = "ünï ✓".encode()  # ONNX Runtime strings must be UTF-8; b64 carries them as bytes all the same
    b64 = base64.b64encode(data).decode()
    r = predict(c, ECHO, {"instances": [{"b64": b64}, "hello"]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [  # plain strings, except the _bytes output: b64, as TF Serving writes it
        {"echo": data.decode(), "echo_bytes": {"b64": b64}},
        {"echo": "hello", "echo_bytes": {"b64": base64.b64encode(b"hello").decode()}},
    ]
    r = predict(c, ECHO, {"instances": [{"b64": base64.b64encode(b"\xff\x00").decode()}]})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]  # decoded to bytes; this model refuses them
    r = predict(c, ECHO, {"inputs": {"text": [{"b64": "aGk="}, "x"]}})
    assert r.json()["outputs"] == {"echo": ["hi", "x"], "echo_bytes": [{"b64": "aGk="}, {"b64": "eA=="}]}
    r = predict(c, ECHO, {"instances": [{"b64": "not base64!"}]})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = predict(c, "half_plus_two", {"instances": [{"b64": "aGk="}]})
    assert r.status_code == 400 and "DT_STRING" in r.json()["error"]


def test_versions_and_labels(c):
    one = predict(c, "scale/versions/1", {"instances": [[1, 2, 3, 4]]}).json()
    two = predict(c, "scale/versions/2", {"instances": [[1, 2, 3, 4]]}).json()
    assert one == {"predictions": [[1.0, 2.0, 3.0, 4.0]]} and two == {"predictions": [[2.0, 4.0, 6.0, 8.0]]}
    assert predict(c, "scale", {"instances": [[1, 2, 3, 4]]}).json() == two  # latest
    r = predict(c, "scale/labels/canary", {"instances": [[1, 2, 3, 4]]})
    assert r.status_code == 404 and "label: canary" in r.json()["error"]
    assert predict(c, "scale/versions/9", {"instances": [[1, 2, 3, 4]]}).status_code == 404


def test_non_batching_model(c):
    # max_batch_size 0: the stacked instances are the whole tensor, so they must match its dims [2, 3]
    r = predict(c, "fixed", {"instances": [[1, 2, 3], [4, 5, 6]]})
    assert r.json() == {"predictions": [[3.0, 6.0, 9.0], [12.0, 15.0, 18.0]]}
    r = predict(c, "fixed", {"instances": [[1, 2, 3]]})
    assert r.status_code == 400 and "shape" in r.json()["error"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "object"),
    ({"instances": [[0.0] * 16], "inputs": [[0.0] * 16]}, 400, "only one"),
    ({"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances'"),
    ({"instances": []}, 400, "non-empty"),
    ({"instances": [[0.0] * 3]}, 400, "shape"),  # 3 features, the model takes 16
    ({"instances": [[0.0] * 16, [0.0] * 15]}, 400, "different shapes"),
    ({"instances": [["a"] * 16]}, 400, "DT_FLOAT"),
    ({"instances": [{"y": [0.0] * 16}]}, 400, "unknown input 'y'"),
    ({"instances": [[0.0] * 16] * 17}, 400, "batch size 17"),
    ({"signature_name": "other", "instances": [[0.0] * 16]}, 400, "other"),
])
def test_predict_errors(c, body, status, words):
    r = predict(c, "mlp", body)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_other_errors_and_still_serving(c, srv):
    r = predict(c, "multi", {"instances": [{"a": [1, 2, 3]}, {"a": [1, 2, 3], "b": [1, 2]}]})
    assert r.status_code == 400 and "same inputs" in r.json()["error"]
    r = predict(c, "multi", {"inputs": {"a": [[1, 2, 3]], "b": [[1.5, 2]]}})
    assert r.status_code == 400 and "integers" in r.json()["error"]
    r = predict(c, "multi", {"instances": [[1, 2, 3]]})
    assert r.status_code == 400 and "keyed by input name" in r.json()["error"]
    r = predict(c, "nope", {"instances": [1.0]})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert predict(c, "corrupt", {"instances": [1.0]}).status_code == 503
    for op in ("classify", "regress"):
        r = c.post(f"/v1/models/half_plus_two:{op}", json={"examples": [{"x": 1.0}]})
        assert r.status_code == 501 and f"tensorflow/serving/{op}" in r.json()["error"]
    assert c.post("/v1/models/nope:regress", json={"examples": []}).status_code == 404
    r = c.get("/v1/models/mlp:predict")
    assert r.status_code == 400 and r.json()["error"] == "Malformed request: GET /v1/models/mlp:predict"
    assert c.get("/v1/models/mlp/bogus").status_code == 400
    assert c.get("/v1/models/").json() == {"error": "Missing model name in request."}
    # after all that, the same server answers
    assert predict(c, "half_plus_two", {"instances": [1.0]}).json() == {"predictions": [2.5]}
    assert srv.proc.poll() is None


# -- KServe V1 ---------------------------------------------------------------------------------------

def test_kserve_v1(c):
    r = c.get("/v1/models")
    assert r.status_code == 200
    assert {"half_plus_two", "mlp", "multi", ECHO, "scale"} <= set(r.json()["models"])
    r = c.get("/v1/models/mlp")  # readiness: KServe's keys beside TF Serving's
    assert r.status_code == 200 and {"name": "mlp", "ready": True}.items() <= r.json().items()
    assert c.get("/v1/models/nope").status_code == 404
    assert c.get("/v1/models/corrupt").status_code == 503
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    r = c.post("/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    expected = v2_infer(c, "mlp", {"x": ("FP32", x)})
    np.testing.assert_allclose([p["probs"] for p in r.json()["predictions"]], expected["probs"], rtol=1e-6, atol=1e-7)
    r = c.post("/v1/models/mlp:predict", json={"instances": "not a list"})
    assert r.status_code == 400 and "error" in r.json()
    assert c.post("/v1/models/mlp:explain", json={"instances": x.tolist()}).status_code == 501
    assert c.post("/v1/models/nope:predict", json={"instances": [1]}).status_code == 404


# -- labels over a registry split (in process: a split needs a registry server otherwise) ------------

def test_labels_follow_the_split(tmp_path):
    from modelserve.server.config import ModelConfig
    from modelserve.server.dataplane import Dataplane
    from modelserve.server.models import READY, ModelEntry, ModelManager, ModelVersion, Split
    from modelserve.server.rest import create_app

    manager = ModelManager(tmp_path, control_mode="registry")
    versions = {n: ModelVersion("m", n, ModelConfig(name="m"), state=READY) for n in (3, 4)}
    manager.models["m"] = ModelEntry("m", versions, split=Split(primary=3, canary=4, weight=0.1))
    manager.models["plain"] = ModelEntry("plain", {1: ModelVersion("plain", 1, ModelConfig(name="plain"), state=READY)})
    app = create_app(Dataplane(manager), 1 << 20)

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://v1") as client:
            return await client.get(path)

    def versions_of(path: str) -> list[str]:
        return [s["version"] for s in asyncio.run(get(path)).json()["model_version_status"]]

    assert versions_of("/v1/models/m/labels/stable") == ["3"]
    assert versions_of("/v1/models/m/labels/canary") == ["4"]
    r = asyncio.run(get("/v1/models/m/labels/beta"))
    assert r.status_code == 404 and "beta" in r.json()["error"]
    r = asyncio.run(get("/v1/models/plain/labels/stable"))
    assert r.status_code == 404 and "no version labels" in r.json()["error"]


def test_json_values():
    """The conversions no test model exercises end to end: ranges, bools, non-UTF-8 and BF16 outputs."""
    from modelserve.datatypes import BF16
    from modelserve.errors import InvalidInput
    from modelserve.server.config import TensorConfig
    from modelserve.server.v1_rest import _jsonable, _tensor

    def spec(datatype: str) -> TensorConfig:
        return TensorConfig(name="t", datatype=datatype, dims=[-1])

    assert _tensor([0, 255], spec("UINT8")).dtype == np.uint8
    assert _tensor([2**64 - 1], spec("UINT64"))[0] == 2**64 - 1
    assert _tensor([True, False], spec("BOOL")).tolist() == [True, False]
    assert _tensor([1.0, 2.0], spec("INT32")).tolist() == [1, 2]  # integral floats are integers
    for value, datatype in (([256], "UINT8"), ([-1], "UINT32"), ([1, 0], "BOOL"), ([True], "FP32"), ([2**70], "INT64")):
        with pytest.raises(InvalidInput):
            _tensor(value, spec(datatype))
    text, _ = _jsonable("out", np.array([b"ok", b"\xff"], dtype=object))
    assert text == ["ok", {"b64": "/w=="}]  # binary that is not UTF-8 travels as b64, losslessly
    assert _jsonable("out_bytes", np.array(b"ok", dtype=object))[0] == {"b64": "b2s="}
    value, nonfinite = _jsonable("y", np.array([1.5, np.nan], dtype=BF16))
    assert value.dtype == np.float32 and nonfinite
