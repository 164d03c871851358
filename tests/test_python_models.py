"""Python models and pipelines, end to end: a real server, REST (httpx, V2 JSON) and gRPC (tritonclient).

The repository holds a Python model with pre/postprocess that proves it was batched, an ONNX MLP,
Python steps around it, a pipeline chaining them (python -> ONNX -> python), the same pipeline as a
Triton ``ensemble`` config.pbtxt, and broken models that must fail alone.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, mlp_model, scale_model
from tritonclient.utils import InferenceServerException

LABELS = ["cat", "dog", "bird", "fish"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


SCALER = '''
import time

import numpy as np
from modelserve import PythonModel


class Scaler(PythonModel):
    """y = (x + 1) * factor; each row also reports how many rows its predict call saw."""

    def setup(self, context):
        self.factor = float(context.parameters["factor"])
        self.name = context.name

    def preprocess(self, inputs):
        return {"x64": inputs["x"].astype(np.float64) + 1.0}

    def predict(self, batch):
        x = batch["x64"]
        time.sleep(0.02)  # slow enough that concurrent requests queue up behind it
        return {"scaled": x * self.factor, "rows": np.full((len(x), 1), len(x))}

    def postprocess(self, outputs):
        y = outputs["scaled"]
        return {"y": y, "total": y.sum(axis=1, keepdims=True), "batch_rows": outputs["rows"]}
'''

NORMALIZE = '''
from modelserve import PythonModel


class Normalize(PythonModel):
    def predict(self, batch):
        x = batch["x"]
        return {"y": (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)}
'''

LABELER = '''
import numpy as np
from modelserve import PythonModel


class Helper:
    pass


class Labels(PythonModel):
    def setup(self, context):
        self.names = np.array(context.parameters["labels"].split(","))

    def predict(self, batch):
        best = batch["probs"].argmax(axis=1)
        return {"label": self.names[best][:, None], "cls": best[:, None]}
'''

VERSIONED = '''
from modelserve import PythonModel

ADD = {add}


class Model(PythonModel):
    def predict(self, batch):
        return {{"y": batch["x"] + ADD}}
'''

SHARED = '''
from modelserve import PythonModel


class Model(PythonModel):
    def setup(self, context):
        self.version = context.version

    def predict(self, batch):
        return {"y": batch["x"] * self.version}
'''

XY = """
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pyrepo")
    write(repo / "scaler" / "1" / "model.py", SCALER)
    write(repo / "scaler" / "config.yaml", """
        backend: python
        max_batch_size: 8
        dynamic_batching: {max_queue_delay_microseconds: 20000}
        parameters: {factor: "3"}
        inputs: [{name: x, datatype: FP32, dims: [4]}]
        outputs:
          - {name: y, datatype: FP32, dims: [4]}
          - {name: total, datatype: FP32, dims: [1]}
          - {name: batch_rows, datatype: INT64, dims: [1]}
    """)
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    write(repo / "normalize" / "1" / "model.py", NORMALIZE)
    write(repo / "normalize" / "config.yaml", """
        backend: python
        max_batch_size: 8
        inputs: [{name: x, datatype: FP32, dims: [16]}]
        outputs: [{name: y, datatype: FP32, dims: [16]}]
    """)
    write(repo / "labels" / "1" / "model.py", LABELER)
    write(repo / "labels" / "config.yaml", f"""
        backend: python
        class: Labels
        max_batch_size: 8
        parameters: {{labels: "{','.join(LABELS)}"}}
        inputs: [{{name: probs, datatype: FP32, dims: [4]}}]
        outputs: [{{name: label, datatype: BYTES, dims: [1]}}, {{name: cls, datatype: INT64, dims: [1]}}]
    """)
    write(repo / "classify" / "config.yaml", """
        backend: pipeline
        inputs: [{name: raw, datatype: FP32, dims: [16]}]
        outputs:
          - {name: label, datatype: BYTES, dims: [1]}
          - {name: class_id, datatype: INT64, dims: [1]}
          - {name: probs, datatype: FP32, dims: [4]}
        steps:
          - {model: normalize, inputs: {x: raw}, outputs: {y: normed}}
          - {model: mlp, inputs: {x: normed}, outputs: {probs: probs}}
          - {model: labels, inputs: {probs: probs}, outputs: {label: label, cls: class_id}}
    """)
    write(repo / "ensemble" / "config.pbtxt", """
        name: "ensemble"
        platform: "ensemble"
        max_batch_size: 8
        input [ { name: "RAW" data_type: TYPE_FP32 dims: [ 16 ] } ]
        output [ { name: "PROBS" data_type: TYPE_FP32 dims: [ 4 ] } ]
        ensemble_scheduling {
          step [
            { model_name: "normalize" model_version: -1 input_map { key: "x" value: "RAW" }
              output_map { key: "y" value: "normed" } },
            { model_name: "mlp" model_version: -1 input_map { key: "x" value: "normed" }
              output_map { key: "probs" value: "PROBS" } }
          ]
        }
    """)
    (repo / "ensemble" / "1").mkdir()
    for version, add in ((1, 10), (2, 20)):  # same module and class names in both versions
        write(repo / "versioned" / str(version) / "model.py", VERSIONED.format(add=add))
    write(repo / "versioned" / "config.yaml", "backend: python\nversion_policy: {all: true}\n" + XY)
    write(repo / "shared" / "model.py", SHARED)  # one file for every version folder
    for version in (1, 2):
        (repo / "shared" / str(version)).mkdir(parents=True)
    write(repo / "shared" / "config.yaml", "backend: python\nmax_batch_size: 4\nversion_policy: {all: true}\n" + XY)
    # broken ones: each must fail alone, with a reason a person can act on
    write(repo / "bad_syntax" / "1" / "model.py", "def broken(:\n    pass\n")
    write(repo / "bad_syntax" / "config.yaml", "backend: python\n" + XY)
    write(repo / "bad_setup" / "1" / "model.py", """
        from modelserve import PythonModel

        class Broken(PythonModel):
            def setup(self, context):
                raise RuntimeError("no weights in " + context.version_dir.name)

            def predict(self, batch):
                return batch
    """)
    write(repo / "bad_setup" / "config.yaml", "backend: python\n" + XY)
    write(repo / "no_predict" / "1" / "model.py", """
        from modelserve import PythonModel

        class Forgetful(PythonModel):
            def setup(self, context):
                self.ready = True
    """)
    write(repo / "no_predict" / "config.yaml", "backend: python\n" + XY)
    write(repo / "bad_predict" / "1" / "model.py", """
        from modelserve import PythonModel

        class Exploding(PythonModel):
            def predict(self, batch):
                raise ValueError("predict exploded")
    """)
    write(repo / "bad_predict" / "config.yaml", "backend: python\nmax_batch_size: 4\n" + XY)
    write(repo / "no_io" / "1" / "model.py", NORMALIZE)
    write(repo / "no_io" / "config.yaml", "backend: python\n")
    write(repo / "boom" / "config.yaml", """
        backend: pipeline
        inputs: [{name: x, datatype: FP32, dims: [4]}]
        outputs: [{name: out, datatype: FP32, dims: [4]}]
        steps:
          - {model: scaler, inputs: {x: x}, outputs: {y: scaled}}
          - {model: bad_predict, inputs: {x: scaled}, outputs: {y: out}}
    """)
    write(repo / "bad_pipe" / "config.yaml", """
        backend: pipeline
        inputs: [{name: raw, datatype: FP32, dims: [16]}]
        outputs: [{name: out, datatype: FP32, dims: [16]}]
        steps:
          - {model: normalize, inputs: {x: raw}, outputs: {y: normed}}
          - {model: missing, inputs: {x: normed}, outputs: {y: out}}
    """)
    return repo


@pytest.fixture(scope="module")
def server(repo) -> Server:
    with Server(repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def rest(server):
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def rest_infer(rest, model: str, inputs: dict[str, np.ndarray], version: str | None = None) -> httpx.Response:
    body = {"inputs": [{"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}
                       for n, a in inputs.items()]}
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return rest.post(path, json=body)


def outputs_of(doc: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


def grpc_infer(client, model: str, inputs: dict[str, np.ndarray], version: str = ""):
    tensors = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client.infer(model, tensors, model_version=version)


def expected_pipeline(repo: Path, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What classify should answer, computed here: numpy normalize, onnxruntime MLP, argmax -> labels."""
    normed = (raw - raw.mean(axis=1, keepdims=True)) / (raw.std(axis=1, keepdims=True) + 1e-6)
    session = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["probs"], {"x": normed})[0]
    best = probs.argmax(axis=1)
    return probs, best[:, None], np.array(LABELS)[best][:, None]


# -- a Python model ----------------------------------------------------------------------------------


def test_python_model_rest(rest):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    response = rest_infer(rest, "scaler", {"x": x})
    assert response.status_code == 200, response.text
    out = outputs_of(response.json())
    want = (x.astype(np.float64) + 1) * 3
    np.testing.assert_allclose(out["y"], want, rtol=1e-6)
    np.testing.assert_allclose(out["total"], want.sum(axis=1, keepdims=True), rtol=1e-6)
    assert {o["name"]: o["datatype"] for o in response.json()["outputs"]} == \
        {"y": "FP32", "total": "FP32", "batch_rows": "INT64"}  # cast to the declared datatypes
    assert out["batch_rows"].shape == (2, 1) and (out["batch_rows"] >= 2).all()


def test_python_model_grpc(grpc_client):
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    result = grpc_infer(grpc_client, "scaler", {"x": x})
    np.testing.assert_allclose(result.as_numpy("y"), (x.astype(np.float64) + 1) * 3, rtol=1e-6)
    assert result.as_numpy("y").dtype == np.float32
    assert result.as_numpy("batch_rows").dtype == np.int64


def test_python_model_is_batched_under_concurrency(rest, grpc_client):
    before = rest.get("/v2/models/scaler/stats").json()["model_stats"][0]
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(48)]

    def call(i: int) -> np.ndarray:
        if i % 2:
            result = grpc_infer(grpc_client, "scaler", {"x": xs[i]})
            np.testing.assert_allclose(result.as_numpy("y"), (xs[i].astype(np.float64) + 1) * 3, rtol=1e-6)
            return result.as_numpy("batch_rows")
        response = rest_infer(rest, "scaler", {"x": xs[i]})
        assert response.status_code == 200, response.text
        out = outputs_of(response.json())
        np.testing.assert_allclose(out["y"], (xs[i].astype(np.float64) + 1) * 3, rtol=1e-6)
        return out["batch_rows"]

    with ThreadPoolExecutor(16) as pool:
        seen = [int(r[0, 0]) for r in pool.map(call, range(len(xs)))]
    assert max(seen) > 1, f"predict never saw more than one row: {seen}"
    after = rest.get("/v2/models/scaler/stats").json()["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 48
    assert after["execution_count"] - before["execution_count"] < 48
    assert max(b["batch_size"] for b in after["batch_stats"]) > 1


def test_client_facing_signature(rest, grpc_client):
    meta = rest.get("/v2/models/scaler").json()
    assert meta["platform"] == "python"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["y", "total", "batch_rows"]
    response = rest.post("/v2/models/scaler/infer", json={"inputs": [
        {"name": "x64", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    assert response.status_code == 400 and "x64" in response.json()["error"]
    pipe = grpc_client.get_model_metadata("classify", as_json=True)
    assert pipe["platform"] == "ensemble"
    assert [(i["name"], i["datatype"], i["shape"]) for i in pipe["inputs"]] == [("raw", "FP32", ["-1", "16"])]
    assert [o["name"] for o in pipe["outputs"]] == ["label", "class_id", "probs"]
    config = rest.get("/v2/models/classify/config").json()
    assert config["max_batch_size"] == 8  # the smallest of its steps'
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["normalize", "mlp", "labels"]


def test_versions_and_shared_file_do_not_collide(rest, grpc_client):
    x = np.ones((1, 4), np.float32)
    for version, add in (("1", 10), ("2", 20)):
        response = rest_infer(rest, "versioned", {"x": x[0]}, version)  # max_batch_size 0: no batch dim
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(outputs_of(response.json())["y"], x[0] + add)
    for version in ("1", "2"):
        result = grpc_infer(grpc_client, "shared", {"x": x}, version)
        np.testing.assert_allclose(result.as_numpy("y"), x * int(version))


# -- a pipeline ----------------------------------------------------------------------------------------


def test_pipeline_rest(rest, repo):
    raw = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    response = rest_infer(rest, "classify", {"raw": raw})
    assert response.status_code == 200, response.text
    doc = response.json()
    out = outputs_of(doc)
    probs, best, labels = expected_pipeline(repo, raw)
    np.testing.assert_allclose(out["probs"], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["class_id"], best)
    np.testing.assert_array_equal(out["label"], labels)
    steps = json.loads(doc["parameters"]["pipeline_step_ms"])
    assert list(steps) == ["normalize", "mlp", "labels"] and all(ms >= 0 for ms in steps.values())


def test_pipeline_grpc(grpc_client, repo):
    raw = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    result = grpc_infer(grpc_client, "classify", {"raw": raw})
    probs, best, labels = expected_pipeline(repo, raw)
    np.testing.assert_allclose(result.as_numpy("probs"), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("class_id"), best)
    assert [b.decode() for b in result.as_numpy("label").ravel()] == labels.ravel().tolist()
    steps = json.loads(result.get_response().parameters["pipeline_step_ms"].string_param)
    assert set(steps) == {"normalize", "mlp", "labels"}
    only = grpc_client.infer("classify", [_grpc_input("raw", raw)],
                             outputs=[grpcclient.InferRequestedOutput("label")])
    assert [o.name for o in only.get_response().outputs] == ["label"]


def _grpc_input(name: str, array: np.ndarray):
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def test_pipeline_counts_in_each_step_models_statistics(rest):
    def counts() -> dict[str, int]:
        stats = rest.get("/v2/models/stats").json()["model_stats"]
        return {s["name"]: s["inference_stats"]["success"]["count"] for s in stats}

    before = counts()
    raw = np.zeros((2, 16), np.float32)
    for _ in range(3):
        assert rest_infer(rest, "classify", {"raw": raw}).status_code == 200
    after = counts()
    for model in ("classify", "normalize", "mlp", "labels"):
        assert after[model] - before[model] == 3, model
    assert after["scaler"] == before["scaler"]


def test_triton_ensemble_config(rest, repo):
    raw = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    response = rest_infer(rest, "ensemble", {"RAW": raw})
    assert response.status_code == 200, response.text
    probs, _, _ = expected_pipeline(repo, raw)
    np.testing.assert_allclose(outputs_of(response.json())["PROBS"], probs, rtol=1e-5, atol=1e-6)


def test_pipeline_errors(rest, grpc_client):
    raw = np.zeros((9, 16), np.float32)  # more rows than the pipeline's max_batch_size
    response = rest_infer(rest, "classify", {"raw": raw})
    assert response.status_code == 400 and "max_batch_size" in response.json()["error"]
    response = rest_infer(rest, "boom", {"x": np.ones((2, 4), np.float32)})
    assert response.status_code == 500
    assert "pipeline 'boom' step 2 (model 'bad_predict')" in response.json()["error"]
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(grpc_client, "boom", {"x": np.ones((1, 4), np.float32)})
    assert info.value.status() == "StatusCode.INTERNAL" and "predict exploded" in info.value.message()


# -- broken models fail alone ---------------------------------------------------------------------------


def test_broken_models_are_unavailable_with_reasons(rest, grpc_client):
    index = {row["name"]: row for row in rest.post("/v2/repository/index", json={}).json()}
    assert index["bad_syntax"]["state"] == "UNAVAILABLE"
    assert "SyntaxError" in index["bad_syntax"]["reason"] and "line 1" in index["bad_syntax"]["reason"]
    assert "RuntimeError: no weights in 1" in index["bad_setup"]["reason"]
    assert index["no_predict"]["state"] == "UNAVAILABLE"
    assert "Forgetful in model.py must define predict(self, batch)" in index["no_predict"]["reason"]
    assert "declared in config.yaml" in index["no_io"]["reason"]
    assert "step 2 model 'missing' is not loaded" in index["bad_pipe"]["reason"]
    for name in ("scaler", "classify", "ensemble", "mlp", "bad_predict"):
        assert index[name]["state"] == "READY", index[name]
    assert rest.get("/v2/models/bad_setup/ready").status_code == 503
    assert not grpc_client.is_model_ready("bad_syntax")


def test_predict_error_fails_only_that_request(rest, grpc_client, server):
    response = rest_infer(rest, "bad_predict", {"x": np.ones((2, 4), np.float32)})
    assert response.status_code == 500
    error = response.json()["error"]
    assert "bad_predict" in error and "ValueError: predict exploded" in error
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(grpc_client, "bad_predict", {"x": np.ones((1, 4), np.float32)})
    assert info.value.status() == "StatusCode.INTERNAL" and "predict exploded" in info.value.message()
    assert server.proc.poll() is None
    result = grpc_infer(grpc_client, "scaler", {"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_allclose(result.as_numpy("y"), np.full((1, 4), 3.0))
    assert rest.get("/v2/health/ready").status_code == 200


# -- the stage mechanism itself, in process: what the vision integration plugs into ---------------------


def test_request_stage_own_signature_state_and_threads(tmp_path):
    from modelserve.errors import InvalidInput
    from modelserve.server.config import TensorConfig
    from modelserve.server.dataplane import Dataplane, InferRequest
    from modelserve.server.models import ModelManager
    from modelserve.server.stages import RequestStage, client_config

    scale_model(tmp_path / "m" / "1" / "model.onnx", 2.0)  # y = 2x on [batch, 4]
    threads: list[int] = []

    class CsvStage(RequestStage):
        """Clients send comma-separated text; the model sees floats; state carries each text's length."""

        def __init__(self):
            self.inputs = [TensorConfig(name="text", datatype="BYTES", dims=[1])]
            self.outputs = [TensorConfig(name="total", datatype="FP64", dims=[1]),
                            TensorConfig(name="length", datatype="INT64", dims=[1])]

        def before(self, inputs):
            threads.append(threading.get_ident())
            texts = [b.decode() for b in inputs["text"][:, 0]]
            return {"x": np.array([[float(v) for v in t.split(",")] for t in texts], np.float32)}, \
                [len(t) for t in texts]

        def after(self, outputs, state):
            threads.append(threading.get_ident())
            return {"total": outputs["y"].sum(axis=1, keepdims=True).astype(np.float64),
                    "length": np.array(state, np.int64)[:, None]}

    async def main():
        manager = ModelManager(tmp_path)
        await manager.start()
        mv = manager.get("m")
        mv.stage = CsvStage()
        mv.config = client_config(mv.config, mv.stage)
        dataplane = Dataplane(manager)
        try:
            texts = [f"{i},1,1,1" for i in range(12)]
            responses = await asyncio.gather(*(
                dataplane.infer(InferRequest("m", None, {"text": np.array([[t.encode()]], dtype=object)}))
                for t in texts))
            with pytest.raises(InvalidInput, match="text"):
                await dataplane.infer(InferRequest("m", None, {"x": np.ones((1, 4), np.float32)}))
            only = await dataplane.infer(InferRequest("m", None, {"text": np.array([[b"1,2,3,4"]], dtype=object)},
                                                      ["length"]))
            return responses, only, dataplane.model_metadata("m"), threading.get_ident()
        finally:
            await manager.close()

    responses, only, meta, loop_thread = asyncio.run(main())
    for i, response in enumerate(responses):
        assert response.outputs["total"].tolist() == [[2.0 * (i + 3)]]
        assert response.outputs["length"].tolist() == [[len(f"{i},1,1,1")]]
    assert list(only.outputs) == ["length"]
    assert [t["name"] for t in meta["inputs"]] == ["text"] and [t["name"] for t in meta["outputs"]] == ["total", "length"]
    assert threads and loop_thread not in threads  # before/after never ran on the event loop


def test_poll_mode_reloads_an_edited_shared_model_py(tmp_path):
    """A shared ``<model>/model.py`` is watched like the version folders; loading writes no __pycache__."""
    import time

    write(tmp_path / "m" / "model.py", VERSIONED.format(add=1))
    (tmp_path / "m" / "1").mkdir()
    write(tmp_path / "m" / "config.yaml", "backend: python\n" + XY)
    with Server(tmp_path, "--model-control-mode", "poll", "--poll-interval", "0.2") as srv, \
            httpx.Client(base_url=f"http://{srv.http_url}", timeout=10) as client:
        x = np.zeros(4, np.float32)
        assert outputs_of(rest_infer(client, "m", {"x": x}).json())["y"].tolist() == [1.0] * 4
        time.sleep(0.6)
        assert not list(tmp_path.rglob("__pycache__"))
        assert srv.log().count("model 'm' loaded") == 1  # no reload triggered by the load itself
        write(tmp_path / "m" / "model.py", VERSIONED.format(add=2))
        deadline = time.monotonic() + 10
        while outputs_of(rest_infer(client, "m", {"x": x}).json())["y"].tolist() != [2.0] * 4:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
