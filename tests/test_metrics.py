"""Prometheus metrics, end to end: a real server, an exact mix of requests over V2 REST, gRPC, TF Serving
REST (/v1) and a pipeline, some failing; then ``GET /metrics`` (and the metrics port) parsed with
prometheus_client's own parser. Counts must match the traffic exactly."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, mlp_model
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

SCALER = '''
import numpy as np
from modelserve import PythonModel


class Scaler(PythonModel):
    def preprocess(self, inputs):
        return {"x64": inputs["x"].astype(np.float64) + 1.0}

    def predict(self, batch):
        return {"scaled": batch["x64"] * 2.0}

    def postprocess(self, outputs):
        return {"y": outputs["scaled"].astype(np.float32)}
'''

# what the test sends (requests, rows each)
REST_OK, REST_ROWS, REST_BAD = 5, 2, 2
GRPC_OK, GRPC_BAD = 4, 1
V1_OK, V1_BAD = 3, 1
PIPE_OK = 2
SCALER_OK = 3


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("metrics_repo")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    (repo / "mlp" / "config.pbtxt").write_text(  # no batching delay: each request sent alone runs alone
        'name: "mlp"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "probs" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "logits" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    write(repo / "scaler" / "1" / "model.py", SCALER)
    write(repo / "scaler" / "config.yaml", """
        backend: python
        max_batch_size: 4
        inputs: [{name: x, datatype: FP32, dims: [4]}]
        outputs: [{name: y, datatype: FP32, dims: [4]}]
    """)
    write(repo / "pipe" / "config.yaml", """
        backend: pipeline
        inputs: [{name: raw, datatype: FP32, dims: [16]}]
        outputs: [{name: probs, datatype: FP32, dims: [4]}]
        steps:
          - {model: mlp, inputs: {x: raw}, outputs: {probs: probs}}
    """)
    return repo


@pytest.fixture(scope="module")
def server(repo):
    # the payload log stays off: these tests are about the metrics, and it would write a database in the cwd
    with Server(repo, "--metrics-port", "0", env={"MODELSERVE_PAYLOAD_LOG": "false"}) as srv:
        line = next(line for line in srv.output if line.startswith("modelserve ready"))
        srv.metrics_url = "127.0.0.1:" + re.search(r" metrics=[\d.]+:(\d+)", line).group(1)
        yield srv


def v2_body(name: str, array: np.ndarray) -> dict:
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                        "data": array.reshape(-1).tolist()}]}


@pytest.fixture(scope="module")
def traffic(server):
    """Send the exact mix once for the module; return the first scrape's families."""
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        for _ in range(REST_OK):
            r = client.post("/v2/models/mlp/infer", json=v2_body("x", rng.standard_normal((REST_ROWS, 16))))
            assert r.status_code == 200, r.text
        for _ in range(REST_BAD):  # wrong shape: the dataplane refuses it
            r = client.post("/v2/models/mlp/infer", json=v2_body("x", np.zeros((1, 3))))
            assert r.status_code == 400, r.text
        for _ in range(V1_OK):
            r = client.post("/v1/models/mlp:predict", json={"instances": [rng.standard_normal(16).tolist()]})
            assert r.status_code == 200, r.text
        for _ in range(V1_BAD):
            r = client.post("/v1/models/mlp:predict", json={"instances": [[1.0, 2.0, 3.0]]})
            assert r.status_code == 400, r.text
        for _ in range(PIPE_OK):
            r = client.post("/v2/models/pipe/infer", json=v2_body("raw", rng.standard_normal((1, 16))))
            assert r.status_code == 200, r.text
        for _ in range(SCALER_OK):
            r = client.post("/v2/models/scaler/infer", json=v2_body("x", np.ones((1, 4))))
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["outputs"][0]["data"], [4.0] * 4)
        # unknown model: not a model's request, so in no model's series; the server must simply go on
        assert client.post("/v2/models/nope/infer", json=v2_body("x", np.zeros((1, 16)))).status_code == 404
        assert client.post("/v1/models/nope:predict", json={"instances": [[1.0]]}).status_code == 404

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for _ in range(GRPC_OK):
            x = grpcclient.InferInput("x", [1, 16], "FP32")
            x.set_data_from_numpy(rng.standard_normal((1, 16)).astype(np.float32))
            grpc.infer("mlp", [x])
        for _ in range(GRPC_BAD):
            x = grpcclient.InferInput("x", [1, 3], "FP32")
            x.set_data_from_numpy(np.zeros((1, 3), np.float32))
            with pytest.raises(InferenceServerException, match="expected shape"):
                grpc.infer("mlp", [x])
        x = grpcclient.InferInput("x", [1, 16], "FP32")
        x.set_data_from_numpy(np.zeros((1, 16), np.float32))
        with pytest.raises(InferenceServerException, match="unknown model"):
            grpc.infer("nope", [x])
    finally:
        grpc.close()

    r = httpx.get(f"http://{server.http_url}/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def parse(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels) -> float:
    found = [s.value for s in families[family].samples
             if s.name == sample and all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(found) == 1, f"{sample}{labels}: {len(found)} samples in {families[family].samples}"
    return found[0]


def requests_by(families: dict, model: str) -> dict:
    return {(s.labels["protocol"], s.labels["status"]): s.value for s in families["modelserve_requests"].samples
            if s.name == "modelserve_requests_total" and s.labels["model"] == model}


def test_request_counts_are_exact(traffic):
    assert requests_by(traffic, "mlp") == {
        ("v2-rest", "200"): REST_OK, ("v2-rest", "400"): REST_BAD,
        ("v2-grpc", "200"): GRPC_OK, ("v2-grpc", "400"): GRPC_BAD,  # gRPC counted under the same HTTP-style codes
        ("v1-rest", "200"): V1_OK, ("v1-rest", "400"): V1_BAD,
        ("pipeline", "200"): PIPE_OK,  # the pipeline's step requests
    }
    assert requests_by(traffic, "pipe") == {("v2-rest", "200"): PIPE_OK}
    assert requests_by(traffic, "scaler") == {("v2-rest", "200"): SCALER_OK}
    assert not any(s.labels.get("model") == "nope" for f in traffic.values() for s in f.samples)


def test_stage_histograms_count_every_request(traffic):
    hist = "modelserve_request_duration_seconds"
    served = REST_OK + GRPC_OK + V1_OK + PIPE_OK  # successful requests mlp ran
    for stage in ("queue", "inference", "total"):
        assert value(traffic, hist, hist + "_count", model="mlp", version=1, stage=stage) == served
    for stage in ("preprocess", "postprocess"):  # an ONNX model has no per-request stage
        assert value(traffic, hist, hist + "_count", model="mlp", version=1, stage=stage) == 0
    for stage in ("queue", "preprocess", "inference", "postprocess", "total"):
        assert value(traffic, hist, hist + "_count", model="scaler", version=1, stage=stage) == SCALER_OK
        assert value(traffic, hist, hist + "_sum", model="scaler", version=1, stage=stage) > 0
    # a pipeline runs its steps instead of a batch queue: inference and total, no queue of its own
    assert value(traffic, hist, hist + "_count", model="pipe", version=1, stage="inference") == PIPE_OK
    assert value(traffic, hist, hist + "_count", model="pipe", version=1, stage="total") == PIPE_OK
    assert value(traffic, hist, hist + "_count", model="pipe", version=1, stage="queue") == 0
    # buckets are cumulative and end at the count; the sums are plausible seconds
    for stage in ("queue", "inference", "total"):
        buckets = [(float(s.labels["le"]), s.value) for s in traffic[hist].samples if s.name == hist + "_bucket"
                   and s.labels["model"] == "mlp" and s.labels["stage"] == stage]
        assert buckets[-1] == (float("inf"), served)
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        assert 0 < value(traffic, hist, hist + "_sum", model="mlp", version=1, stage=stage) < served * 10
    total = value(traffic, hist, hist + "_sum", model="mlp", version=1, stage="total")
    assert total >= value(traffic, hist, hist + "_sum", model="mlp", version=1, stage="inference")


def test_batch_sizes_queue_and_inflight(traffic):
    rows = REST_OK * REST_ROWS + GRPC_OK + V1_OK + PIPE_OK  # sent one at a time: one execution each
    assert value(traffic, "modelserve_batch_size", "modelserve_batch_size_sum", model="mlp", version=1) == rows
    assert value(traffic, "modelserve_batch_size", "modelserve_batch_size_count", model="mlp", version=1) \
        == REST_OK + GRPC_OK + V1_OK + PIPE_OK
    assert value(traffic, "modelserve_batch_size", "modelserve_batch_size_bucket", model="mlp", version=1, le="1.0") \
        == GRPC_OK + V1_OK + PIPE_OK
    assert value(traffic, "modelserve_queue_depth", "modelserve_queue_depth", model="mlp", version=1) == 0
    inflight = [s for s in traffic["modelserve_inflight_requests"].samples]
    assert {s.labels["protocol"] for s in inflight if s.labels["model"] == "mlp"} == \
        {"v2-rest", "v2-grpc", "v1-rest", "pipeline"}
    assert all(s.value == 0 for s in inflight)  # every request has been answered


def test_matches_the_statistics_extension(server, traffic):
    """The Triton statistics the server already keeps and the metrics are one set of numbers."""
    stats = httpx.get(f"http://{server.http_url}/v2/models/mlp/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == sum(
        n for (_, status), n in requests_by(traffic, "mlp").items() if status == "200")
    assert stats["inference_stats"]["fail"]["count"] == REST_BAD + GRPC_BAD + V1_BAD
    assert stats["inference_count"] == value(traffic, "modelserve_batch_size", "modelserve_batch_size_sum",
                                             model="mlp", version=1)


def test_model_load_time_and_state(traffic):
    for model in ("mlp", "scaler", "pipe"):
        assert value(traffic, "modelserve_model_load_duration_seconds", "modelserve_model_load_duration_seconds",
                     model=model, version=1) > 0
        assert value(traffic, "modelserve_model_state", "modelserve_model_state",
                     model=model, version=1, state="READY") == 1
        for state in ("LOADING", "UNLOADING", "UNAVAILABLE"):
            assert value(traffic, "modelserve_model_state", "modelserve_model_state",
                         model=model, version=1, state=state) == 0


def test_process_metrics(traffic):
    for family in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert family in traffic, sorted(traffic)
        assert traffic[family].samples[0].value > 0
    assert traffic["modelserve_http_connections"].samples[0].value >= 1  # the scrape's own connection at least


def test_metrics_port(server, traffic):
    with httpx.Client(base_url=f"http://{server.metrics_url}", timeout=30) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        families = parse(r.text)
        assert requests_by(families, "mlp") == requests_by(traffic, "mlp")  # the same numbers
        assert "process_cpu_seconds" in families
        assert client.get("/").status_code == 404
        assert client.post("/metrics").status_code == 405
        openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")


def test_counts_grow_with_more_traffic(server, traffic):
    """A second round moves the counters by exactly what was sent (and failures in the batch path count too)."""
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        for _ in range(3):
            assert client.post("/v2/models/scaler/infer", json=v2_body("x", np.ones((2, 4)))).status_code == 200
        assert client.post("/v2/models/scaler/infer", json=v2_body("x", np.ones((5, 4)))).status_code == 400
        after = parse(client.get("/metrics").text)
    assert requests_by(after, "scaler") == {("v2-rest", "200"): SCALER_OK + 3, ("v2-rest", "400"): 1}
    hist = "modelserve_request_duration_seconds"
    assert value(after, hist, hist + "_count", model="scaler", version=1, stage="preprocess") == SCALER_OK + 3
    assert value(after, "modelserve_batch_size", "modelserve_batch_size_sum", model="scaler", version=1) \
        == SCALER_OK + 3 * 2


def test_server_stops_cleanly(server, traffic):
    assert server.stop() == 0, server.log()
