"""The README's registry journey, end to end with the real CLI: optimize a model, register both versions
with lineage, serve the production alias, promote the optimized version while clients keep sending
requests, roll it back in one command, and read the history and lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort

from conftest import Server, mlp_model


def cli(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "modelserve", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, f"modelserve {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_optimize_register_promote_under_traffic_and_roll_back(tmp_path):
    env = {**os.environ, "MODELSERVE_REGISTRY_URL": f"sqlite:///{tmp_path}/registry.db",
           "MODELSERVE_REGISTRY_ARTIFACTS": str(tmp_path / "artifacts")}
    fp32 = mlp_model(tmp_path / "mlp.onnx", features=64, hidden=256, classes=4)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((256, 64)).astype(np.float32))
    cli("optimize", str(fp32), "--quantize", "static", "--calibration", str(tmp_path / "calib.npz"),
        "--no-speed-gate", "-o", str(tmp_path / "mlp-int8.onnx"), "--json", env=env)
    assert (tmp_path / "mlp-int8.report.json").is_file()

    v1 = json.loads(cli("models", "register", str(fp32), "--name", "mlp", "--json", env=env))
    v2 = json.loads(cli("models", "register", str(tmp_path / "mlp-int8.onnx"), "--name", "mlp",
                        "--from-version", "1", "--step", "quantize", "--json", env=env))
    assert (v1["version"], v2["version"], v2["parent"], v2["step"]) == (1, 2, "1", "quantize")
    assert v2["metrics"]["size_ratio"] > 1.5 and v2["metrics"]["size_bytes"] == (tmp_path / "mlp-int8.onnx").stat().st_size
    cli("models", "alias", "set", "mlp", "production", "1", "--protect", env=env)

    x = rng.standard_normal((1, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(fp32)).run(["probs"], {"x": x})[0]
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "probs"}]}
    with Server(tmp_path / "unused", "--registry", env["MODELSERVE_REGISTRY_URL"], "--registry-poll", "0.3",
                "--registry-cache", str(tmp_path / "cache"), env=env) as srv:
        answers: list[tuple[int, list[float]]] = []
        errors: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/v2/models/mlp/infer", json=body)
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    doc = r.json()
                    answers.append((int(doc["model_version"]), doc["outputs"][0]["data"]))

        def served_now(version: int, timeout: float = 20) -> None:
            seen = len(answers)
            deadline = time.monotonic() + timeout
            while not (len(answers) > seen + 5 and answers[-1][0] == version):
                assert time.monotonic() < deadline, f"version {version} not served after {timeout}s"
                time.sleep(0.05)

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            served_now(1)
            cli("models", "alias", "set", "mlp", "staging", "2", env=env)
            refused = subprocess.run([sys.executable, "-m", "modelserve", "models", "promote", "mlp"],
                                     capture_output=True, text=True, env=env)
            assert refused.returncode == 1 and "protected" in refused.stderr  # production is protected
            cli("models", "promote", "mlp", "--force", "--reason", "int8: smaller, same answers", env=env)
            served_now(2)
            out = cli("models", "rollback", "mlp", "production", "--force", "--reason", "p99 regression", env=env)
            assert "2 → 1" in out
            served_now(1)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not errors, errors[:3]
    versions = [v for v, _ in answers]
    changes = [v for k, v in enumerate(versions) if k == 0 or versions[k - 1] != v]
    assert changes[0] == 1 and changes[-1] == 1 and 2 in changes
    for version, probs in answers:
        if version == 1:  # the fp32 model, exactly
            np.testing.assert_allclose(probs, expected.ravel(), rtol=1e-5, atol=1e-6)
        else:  # int8: close to it
            np.testing.assert_allclose(probs, expected.ravel(), atol=0.1)

    shown = json.loads(cli("models", "show", "mlp", "--json", env=env))
    moves = [(h["action"], h["from_version"], h["to_version"]) for h in reversed(shown["history"])
             if h["alias"] == "production"]
    assert moves == [("alias_set", None, 1), ("promote", 1, 2), ("rollback", 2, 1)]
    assert [h["reason"] for h in shown["history"] if h["alias"] == "production"][:2] == \
        ["p99 regression", "int8: smaller, same answers"]
    assert {a["alias"]: a["version"] for a in shown["aliases"]} == {"production": 1, "staging": 2}
    lineage = json.loads(cli("models", "lineage", "mlp", "2", "--json", env=env))
    assert [(v["version"], v["step"]) for v in lineage] == [(2, "quantize"), (1, None)]
