"""``modelserve serve --ray``: two models on a local Ray cluster the test starts (127.0.0.1 only).

Real parts throughout: ``ray start --head``, the Ray Serve HTTP proxy, the driver's gRPC front, tritonclient
HTTP and gRPC, replicas as OS processes (killed with SIGKILL like a crashed node would). Slow by nature
(a cluster and three applications start): the whole module shares one cluster and one server.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import Server, metric_replicas, mlp_model, needs, replica_processes, scale_model, wait_for_value

pytestmark = [needs("ray"), pytest.mark.timeout(600)]

MLP_CONFIG = """\
max_batch_size: 32
dynamic_batching: {max_queue_delay_microseconds: 1000}
scaling:
  min_replicas: 1
  max_replicas: 2
  target_ongoing_requests: 1
  upscale_delay_s: 1
  downscale_delay_s: 3
  num_cpus: 0.5
"""
SCALE_CONFIG = """\
max_batch_size: 8
scaling: {min_replicas: 2, max_replicas: 2, num_cpus: 0.5}
"""
CHAIN_CONFIG = """\
backend: pipeline
inputs: [{name: raw, datatype: FP32, dims: [16]}]
outputs: [{name: probs, datatype: FP32, dims: [4]}]
steps:
  - {model: mlp, inputs: {x: raw}, outputs: {probs: probs}}
scaling: {num_cpus: 0.25}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-repo")
    mlp_model(root / "mlp" / "1" / "model.onnx")
    (root / "mlp" / "config.yaml").write_text(MLP_CONFIG)
    scale_model(root / "scale" / "1" / "model.onnx", 3.0)
    (root / "scale" / "config.yaml").write_text(SCALE_CONFIG)
    # a pipeline: its replicas load the step's model too (a pipeline calls its steps in its own process)
    (root / "chain").mkdir()
    (root / "chain" / "config.yaml").write_text(CHAIN_CONFIG)
    return root


@pytest.fixture(scope="module")
def ray_server(ray_cluster, repo, tmp_path_factory):
    work = tmp_path_factory.mktemp("ray-work")
    srv = Server(repo, "--ray", "--ray-address", ray_cluster, "--metrics-port", "0",
                 "--monitor-db", f"sqlite:///{work}/monitor.db", "--monitor-spill", str(work / "spill.jsonl"),
                 start_timeout=240)
    yield srv
    code = srv.stop(timeout=120)
    assert code == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def single_server(repo, tmp_path_factory):
    with Server(repo, "--no-payload-log") as srv:
        yield srv


def mlp_input(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def http_infer(client, model: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer(model, [inp])
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def grpc_infer(client, model: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp])
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def test_same_answers_as_the_single_process_server(ray_server, single_server):
    on_ray_http = httpclient.InferenceServerClient(ray_server.http_url)
    on_ray_grpc = grpcclient.InferenceServerClient(ray_server.grpc_url)
    local = httpclient.InferenceServerClient(single_server.http_url)
    local_grpc = grpcclient.InferenceServerClient(single_server.grpc_url)
    assert on_ray_http.is_server_ready() and on_ray_grpc.is_server_ready()
    for model, name in (("mlp", "x"), ("scale", "x"), ("chain", "raw")):
        assert on_ray_http.is_model_ready(model) and on_ray_grpc.is_model_ready(model)
        assert on_ray_http.get_model_metadata(model) == local.get_model_metadata(model)
        assert on_ray_grpc.get_model_metadata(model, as_json=True) == local_grpc.get_model_metadata(model, as_json=True)
        for seed in range(3):
            x = mlp_input(seed + 1, seed)[:, :4] if model == "scale" else mlp_input(seed + 1, seed)
            want = http_infer(local, model, name, x)
            for got in (http_infer(on_ray_http, model, name, x), grpc_infer(on_ray_grpc, model, name, x)):
                assert got.keys() == want.keys()
                for key in want:
                    np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
    # the scale model multiplies by 3: not only equal, right
    np.testing.assert_allclose(grpc_infer(on_ray_grpc, "scale", "x", np.ones((1, 4), np.float32))["y"], 3.0)


def test_bad_requests_get_clear_errors_on_both_protocols(ray_server):
    rest = httpx.Client(base_url=f"http://{ray_server.http_url}", timeout=30)
    r = rest.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = rest.post("/v2/models/mlp/infer", json={"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                                            "data": [1, 2, 3]}]})
    assert r.status_code == 400 and "x" in r.json()["error"]
    r = rest.post("/v2/models/mlp/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    client = grpcclient.InferenceServerClient(ray_server.grpc_url)
    with pytest.raises(Exception, match="NOT_FOUND.*nope"):
        grpc_infer(client, "nope", "x", mlp_input(1, 0))
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        grpc_infer(client, "mlp", "x", mlp_input(1, 0)[:, :3])
    assert client.is_server_live() and rest.get("/v2/health/ready").status_code == 200


def _load(url: str, model: str, x_cols: int, threads: int, stop: threading.Event, outcomes: list) -> list:
    """``threads`` clients sending back-to-back V2 REST requests until ``stop``; outcomes: (time, status)."""
    body = {"inputs": [{"name": "x", "shape": [1, x_cols], "datatype": "FP32", "data": [0.5] * x_cols}]}

    def worker():
        with httpx.Client(base_url=f"http://{url}", timeout=30) as client:
            while not stop.is_set():
                try:
                    status = client.post(f"/v2/models/{model}/infer", json=body).status_code
                except httpx.HTTPError:
                    status = -1
                outcomes.append((time.monotonic(), status))

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return workers


def test_replicas_grow_under_load_within_bounds_and_shrink_after(ray_server):
    assert len(metric_replicas(ray_server, "mlp")) == 1
    stop, outcomes, most = threading.Event(), [], 0
    workers = _load(ray_server.http_url, "mlp", 16, 8, stop, outcomes)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            count = len(metric_replicas(ray_server, "mlp"))
            most = max(most, count, len(replica_processes("mlp")))
            if count == 2:
                break
            time.sleep(0.5)
        time.sleep(3)  # stays at the bound under load
        most = max(most, len(metric_replicas(ray_server, "mlp")), len(replica_processes("mlp")))
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    print(f"autoscaling: at most {most} replicas of mlp under load, {len(outcomes)} requests")
    assert most == 2, f"expected the autoscaler to reach max_replicas=2 (and no more), saw {most}"
    assert outcomes and all(status == 200 for _, status in outcomes), {s for _, s in outcomes}
    wait_for_value(lambda: len(metric_replicas(ray_server, "mlp")) == 1 and len(replica_processes("mlp")) == 1, 90,
             "the mlp model to shrink back to min_replicas=1")


def test_killing_a_replica_fails_only_its_in_flight_requests_and_ray_restores_it(ray_server):
    assert len(replica_processes("scale")) == 2
    threads = 4
    stop, outcomes = threading.Event(), []
    workers = _load(ray_server.http_url, "scale", 4, threads, stop, outcomes)
    try:
        time.sleep(2)
        victim = replica_processes("scale")[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(6)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    failures = [(t, s) for t, s in outcomes if s != 200]
    print(f"replica {victim} killed: {len(failures)} of {len(outcomes)} requests failed {[s for _, s in failures]}")
    after = [s for t, s in outcomes if t > killed_at + 1]
    # each client has at most one request in flight: at most `threads` can have been on the killed replica
    assert len(failures) <= threads, f"{len(failures)} failed: {failures}"
    assert after and all(s == 200 for s in after[len(failures):]), "the surviving replica kept answering"
    wait_for_value(lambda: len(replica_processes("scale")) == 2 and victim not in replica_processes("scale"), 90,
             "Ray to start a replacement replica")
    wait_for_value(lambda: len(metric_replicas(ray_server, "scale")) == 2, 60, "the new replica to serve")
    client = httpclient.InferenceServerClient(ray_server.http_url)
    for _ in range(6):
        np.testing.assert_allclose(http_infer(client, "scale", "x", np.ones((1, 4), np.float32))["y"], 3.0)


def test_metrics_carry_the_replica_identity(ray_server):
    client = httpclient.InferenceServerClient(ray_server.http_url)
    for _ in range(5):
        http_infer(client, "mlp", "x", mlp_input(1, 1))
    text = httpx.get(f"http://127.0.0.1:{ray_server.metrics_port}/metrics", timeout=10).text
    counted = {}
    for line in text.splitlines():
        if line.startswith("modelserve_requests_total{") and 'model="mlp"' in line and 'status="200"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            counted[replica] = counted.get(replica, 0) + float(line.rsplit(" ", 1)[1])
    assert counted and sum(counted.values()) >= 5
    # the mlp application's replicas, and the chain pipeline's (which runs mlp in its own process)
    assert counted and all(replica.startswith(("mlp/", "chain/")) for replica in counted), counted
    assert len(metric_replicas(ray_server, "scale")) == 2  # one series set per replica, each labelled
    # one family per name in the merged exposition (Prometheus refuses repeated TYPE lines)
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
