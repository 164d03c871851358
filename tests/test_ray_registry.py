"""``modelserve serve --ray --registry``: every replica follows the registry alias of its model.

A SQLite registry (one node: every replica opens the same file), a model with two versions that answer
differently, two replicas; moving the alias must reach both replicas, seen from their own metrics and from
the answers through Ray Serve's proxy.
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import Server, metric_replicas, needs, scale_model, wait_for_value
from modelserve.registry import Registry

pytestmark = [needs("ray"), pytest.mark.timeout(600)]

SCALING = {"max_batch_size": 8, "scaling": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5}}


def served_versions(srv: Server, model: str) -> dict[str, set[str]]:
    """Replica -> the versions its metrics say are READY."""
    text = httpx.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).text
    found: dict[str, set[str]] = {}
    for labels in re.findall(r'^modelserve_model_state\{(.*)\} 1\.0$', text, re.M):
        parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if parts.get("model") == model and parts.get("state") == "READY":
            found.setdefault(parts["replica"], set()).add(parts["version"])
    return found


def answer(client: httpx.Client) -> tuple[str, float]:
    r = client.post("/v2/models/alpha/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]})
    assert r.status_code == 200, r.text
    return r.json()["model_version"], r.json()["outputs"][0]["data"][0]


def test_an_alias_move_reaches_every_replica(ray_cluster, tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db"
    registry = Registry(url, tmp_path / "artifacts", actor="test")
    for factor in (2.0, 5.0):
        registry.register(scale_model(tmp_path / f"scale-{factor:g}.onnx", factor), "alpha", config=SCALING)
    registry.set_alias("alpha", "production", 1)
    srv = Server(tmp_path / "unused", "--ray", "--ray-address", ray_cluster, "--registry", url,
                 "--alias", "production", "--registry-poll", "0.5", "--registry-cache", str(tmp_path / "cache"),
                 "--metrics-port", "0", "--monitor-db", f"sqlite:///{tmp_path}/monitor.db",
                 "--monitor-spill", str(tmp_path / "spill.jsonl"), start_timeout=240)
    try:
        client = httpx.Client(base_url=f"http://{srv.http_url}", timeout=30)
        before = wait_for_value(lambda: (v := served_versions(srv, "alpha")) and len(v) == 2 and v, 60,
                                "two replicas serving version 1")
        assert all(versions == {"1"} for versions in before.values()), before
        assert {answer(client) for _ in range(10)} == {("1", 2.0)}

        registry.set_alias("alpha", "production", 2, reason="ray test")
        after = wait_for_value(
            lambda: (v := served_versions(srv, "alpha")) and len(v) == 2
            and all(versions == {"2"} for versions in v.values()) and v, 60,
            "both replicas to serve version 2")
        assert set(after) == set(before)  # the same replicas swapped, none restarted
        assert {answer(client) for _ in range(20)} == {("2", 5.0)}
        assert metric_replicas(srv, "alpha") == set(before)

        # a model given the alias after start gets its application; taking the alias away deletes it
        registry.register(scale_model(tmp_path / "scale-7.onnx", 7.0), "gamma",
                          config={"max_batch_size": 8, "scaling": {"num_cpus": 0.25}})
        registry.set_alias("gamma", "production", 1)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
        r = wait_for_value(lambda: (r := client.post("/v2/models/gamma/infer", json=body)).status_code == 200 and r,
                           90, "the new model's application")
        assert r.json()["outputs"][0]["data"][0] == 7.0
        with grpcclient.InferenceServerClient(srv.grpc_url) as g:
            def grpc_ready() -> bool:
                try:
                    return g.is_model_ready("gamma")
                except Exception:  # noqa: BLE001 - NOT_FOUND until the driver has added its handle
                    return False

            assert wait_for_value(grpc_ready, 10, "the gRPC front to know gamma")
        registry.delete_alias("gamma", "production", reason="ray test")
        wait_for_value(lambda: client.post("/v2/models/gamma/infer", json=body).status_code == 404, 60,
                       "the application of a model without the alias to go")
        assert answer(client) == ("2", 5.0)  # the others untouched
    finally:
        code = srv.stop(timeout=120)
        registry.close()
    assert code == 0, srv.log()[-3000:]


def test_authentication_holds_on_every_path_of_the_ray_deployment(ray_cluster, tmp_path):
    """--auth keys on Ray: the replicas (behind Ray's proxy), the gRPC front and the gathered metrics all
    check the same keys."""
    from modelserve.security import KeyStore

    scale_model(tmp_path / "repo" / "beta" / "1" / "model.onnx", 4.0)
    url = f"sqlite:///{tmp_path}/keys.db"
    with KeyStore.open(url, client="test") as store:
        reader, _ = store.create("reader", "reader", "beta", created_by="test")
        operator, _ = store.create("operator", "operator", None, created_by="test")
    srv = Server(tmp_path / "repo", "--ray", "--ray-address", ray_cluster, "--auth", "keys", "--keys-db", url,
                 "--metrics-port", "0", "--no-payload-log", start_timeout=240)
    try:
        assert srv.output[-1].rstrip().endswith("auth=keys")
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
        rest = httpx.Client(base_url=f"http://{srv.http_url}", timeout=30)
        assert rest.post("/v2/models/beta/infer", json=body).status_code == 401
        r = rest.post("/v2/models/beta/infer", json=body, headers={"Authorization": f"Bearer {reader}"})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] == 4.0
        assert rest.get("/v2/health/ready").status_code == 200  # health stays open

        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        with grpcclient.InferenceServerClient(srv.grpc_url) as g:
            with pytest.raises(Exception, match="UNAUTHENTICATED"):
                g.infer("beta", [x])
            result = g.infer("beta", [x], headers={"authorization": f"Bearer {reader}"})
            assert float(result.as_numpy("y")[0, 0]) == 4.0

        metrics = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        assert httpx.get(metrics, timeout=10).status_code == 401
        assert httpx.get(metrics, headers={"Authorization": f"Bearer {reader}"}, timeout=10).status_code == 403
        r = httpx.get(metrics, headers={"Authorization": f"Bearer {operator}"}, timeout=10)
        assert r.status_code == 200 and 'model="beta"' in r.text and "replica=" in r.text
    finally:
        code = srv.stop(timeout=120)
    assert code == 0, srv.log()[-3000:]
    for secret in (reader, operator):
        assert secret not in srv.log()


def test_a_model_that_cannot_load_stops_the_deployment_with_its_reason(ray_cluster, tmp_path):
    """A bad config is refused before Ray is touched; a corrupt model file is refused by its replicas, and the
    driver exits 2 with the replica's reason (not Ray's traceback), its applications deleted."""
    import subprocess
    import sys

    bad_config = tmp_path / "config-repo"
    scale_model(bad_config / "m" / "1" / "model.onnx", 1.0)
    (bad_config / "m" / "config.yaml").write_text("scaling: {min_replicas: 3, max_replicas: 1}\n")
    corrupt = tmp_path / "file-repo"
    (corrupt / "broken" / "1").mkdir(parents=True)
    (corrupt / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    for repo, reason in ((bad_config, "min_replicas (3) is above max_replicas (1)"), (corrupt, "INVALID_PROTOBUF")):
        done = subprocess.run([sys.executable, "-m", "modelserve", "serve", "--ray", "--ray-address", ray_cluster,
                               "--model-repository", str(repo), "--http-port", "0", "--grpc-port", "-1",
                               "--no-payload-log"], capture_output=True, text=True, timeout=180)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1 and reason in errors[0], done.stderr[-3000:]
        # the driver's own output has no traceback (Ray forwards its replicas' logs, prefixed "(… pid=…)")
        assert not [line for line in done.stderr.splitlines() if "Traceback" in line and "pid=" not in line]
