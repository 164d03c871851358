"""The model repository: config sources, broken models, version policies, load/unload, poll swaps."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Server, identity_model, mlp_model, scale_model


def _infer_scale(url: str, model: str = "scale", version: str = "") -> float:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    return float(client.infer(model, [inp], model_version=version).as_numpy("y")[0, 0])


def _index(url: str) -> dict:
    rows = httpx.post(f"http://{url}/v2/repository/index").json()
    return {(r["name"], r.get("version")): r for r in rows}


def test_config_sources_and_broken_models(tmp_path):
    repo = tmp_path
    mlp_model(repo / "plain" / "1" / "model.onnx")  # no config: derived from the file
    mlp_model(repo / "yaml" / "1" / "model.onnx")
    (repo / "yaml" / "config.yaml").write_text(
        "max_batch_size: 4\ninputs:\n  - {name: x, datatype: FP32, dims: [16]}\n"
        "dynamic_batching: {max_queue_delay_microseconds: 100}\ninstances: 2\n")
    mlp_model(repo / "fixed" / "1" / "model.onnx")
    (repo / "fixed" / "config.pbtxt").write_text("max_batch_size: 0\n")
    # broken: a corrupt file, a config that does not parse, a config naming a missing input, no version
    (repo / "corrupt" / "1").mkdir(parents=True)
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not onnx")
    mlp_model(repo / "badconfig" / "1" / "model.onnx")
    (repo / "badconfig" / "config.pbtxt").write_text("max_batch_size: [[[")
    mlp_model(repo / "wrongname" / "1" / "model.onnx")
    (repo / "wrongname" / "config.yaml").write_text("inputs:\n  - {name: nope, datatype: FP32, dims: [16]}\n")
    (repo / "empty").mkdir()
    mlp_model(repo / "negbatch" / "1" / "model.onnx")
    (repo / "negbatch" / "config.yaml").write_text("max_batch_size: -3\n")

    with Server(repo) as srv:
        url = f"http://{srv.http_url}"
        plain = httpx.get(f"{url}/v2/models/plain").json()
        assert plain["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
        assert httpx.get(f"{url}/v2/models/plain/config").json()["max_batch_size"] == 32
        config = httpx.get(f"{url}/v2/models/yaml/config").json()
        assert config["max_batch_size"] == 4 and config["instance_group"][0]["count"] == 2
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
        assert config["output"][0]["dims"] == [4]  # completed from the file
        fixed = httpx.get(f"{url}/v2/models/fixed").json()
        assert fixed["inputs"][0]["shape"] == [-1, 16]  # no batching: the model's own dims, -1 and all
        assert httpx.get(f"{url}/v2/models/fixed/config").json()["max_batch_size"] == 0

        index = _index(srv.http_url)
        assert index[("plain", "1")]["state"] == "READY"
        assert index[("corrupt", "1")]["state"] == "UNAVAILABLE"
        assert "cannot load" in index[("corrupt", "1")]["reason"]
        assert "parse" in index[("badconfig", None)]["reason"]
        assert "nope" in index[("wrongname", "1")]["reason"]
        assert "no version folder" in index[("empty", None)]["reason"]
        assert "max_batch_size" in index[("negbatch", None)]["reason"]  # refused, not served with a batch of -3
        # the broken ones answer clearly, the good ones serve
        r = httpx.post(f"{url}/v2/models/corrupt/infer", json={"inputs": []})
        assert r.status_code == 503 and "error" in r.json()
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        client = httpclient.InferenceServerClient(srv.http_url)
        inp = httpclient.InferInput("x", [2, 16], "FP32")
        inp.set_data_from_numpy(np.zeros((2, 16), np.float32))
        assert client.infer("yaml", [inp]).as_numpy("probs").shape == (2, 4)


def test_external_data_model(tmp_path):
    import onnx

    path = mlp_model(tmp_path / "ext" / "1" / "model.onnx", features=16, hidden=256)
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (path.parent / "weights.bin").stat().st_size > 16 * 256 * 4
    with Server(tmp_path) as srv:
        client = httpclient.InferenceServerClient(srv.http_url)
        inp = httpclient.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(np.ones((1, 16), np.float32))
        assert client.infer("ext", [inp]).as_numpy("probs").sum() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("policy, served", [
    ("", [3]),
    ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
    ("version_policy: { all: {} }", [1, 2, 3]),
    ("version_policy: { specific: { versions: [1, 3] } }", [1, 3]),
])
def test_version_policies(tmp_path, policy, served):
    for v in (1, 2, 3):
        scale_model(tmp_path / "scale" / str(v) / "model.onnx", float(v))
    (tmp_path / "scale" / "config.pbtxt").write_text(f'name: "scale"\nmax_batch_size: 8\n{policy}\n')
    with Server(tmp_path) as srv:
        meta = httpx.get(f"http://{srv.http_url}/v2/models/scale").json()
        assert meta["versions"] == [str(v) for v in served]
        assert _infer_scale(srv.http_url) == float(max(served))  # no version: the highest ready one
        for v in (1, 2, 3):
            if v in served:
                assert _infer_scale(srv.http_url, version=str(v)) == float(v)
            else:
                with pytest.raises(InferenceServerException) as err:
                    _infer_scale(srv.http_url, version=str(v))
                assert err.value.status() == "404"
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)
        assert grpc.get_model_metadata("scale").versions == [str(v) for v in served]


def test_explicit_load_unload(tmp_path):
    scale_model(tmp_path / "scale" / "1" / "model.onnx", 5.0)
    identity_model(tmp_path / "other" / "1" / "model.onnx", "FP32")
    with Server(tmp_path, "--model-control-mode", "explicit", "--load-model", "other") as srv:
        http = httpclient.InferenceServerClient(srv.http_url)
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)
        assert http.is_model_ready("other")
        assert not http.is_model_ready("scale")
        states = {r["name"]: r.get("state") for r in http.get_model_repository_index()}
        assert states == {"other": "READY", "scale": "UNAVAILABLE"}
        http.load_model("scale")
        assert http.is_model_ready("scale") and _infer_scale(srv.http_url) == 5.0
        http.unload_model("scale")
        assert not http.is_model_ready("scale")
        grpc.load_model("scale")
        assert grpc.is_model_ready("scale")
        # a config given with the load request overrides the one on disk
        http.load_model("scale", config='{"max_batch_size": 2, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]}')
        assert http.get_model_config("scale")["max_batch_size"] == 2
        grpc.unload_model("scale")
        assert not grpc.is_model_ready("scale")
        with pytest.raises(InferenceServerException) as err:
            http.load_model("missing")
        assert err.value.status() == "404"


def test_poll_mode_swaps_under_traffic_without_failures(tmp_path):
    scale_model(tmp_path / "scale" / "1" / "model.onnx", 1.0)
    with Server(tmp_path, "--model-control-mode", "poll", "--poll-interval", "0.2") as srv:
        answers: list[float] = []
        failures: list[str] = []
        stop = threading.Event()

        def traffic():
            client = httpclient.InferenceServerClient(srv.http_url)
            inp = httpclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            while not stop.is_set():
                try:
                    answers.append(float(client.infer("scale", [inp]).as_numpy("y")[0, 0]))
                except Exception as exc:  # noqa: BLE001 - counted, the test fails on any
                    failures.append(str(exc))

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            # a new version folder appears (written beside, then moved in, as deploy tools do)
            scale_model(tmp_path / "incoming" / "model.onnx", 2.0)
            shutil.move(tmp_path / "incoming", tmp_path / "scale" / "2")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (not answers or answers[-1] != 2.0):
                time.sleep(0.1)
            time.sleep(0.5)
            # a changed config (now: serve all versions) is reloaded too
            (tmp_path / "scale" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and httpx.get(
                    f"http://{srv.http_url}/v2/models/scale").json()["versions"] != ["1", "2"]:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:3]
        assert 1.0 in answers and answers[-1] == 2.0
        assert _infer_scale(srv.http_url, version="1") == 1.0
        # a model folder that disappears is unloaded
        shutil.rmtree(tmp_path / "scale")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and httpclient.InferenceServerClient(srv.http_url).is_model_ready("scale"):
            time.sleep(0.1)
        assert not httpclient.InferenceServerClient(srv.http_url).is_model_ready("scale")
        assert "Traceback" not in srv.log()
