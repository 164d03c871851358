"""Process lifecycle: the parseable ready line, SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

from conftest import Server, save_model


def _slow_model(path):
    """Four chained 768x768 matmuls per row: tens of milliseconds a request on this machine."""
    w = numpy_helper.from_array(np.eye(768, dtype=np.float32), "w")
    nodes, prev = [], "x"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return save_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [768, 768])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [768, 768])], path, [w])


def _inflight(srv: Server, model: str) -> int:
    """``modelserve_inflight_requests`` of ``model``, all protocols (``GET /metrics``)."""
    text = httpx.get(f"http://{srv.http_url}/metrics").text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("modelserve_inflight_requests{") and f'model="{model}"' in line))


def test_sigterm_drains_in_flight_requests(tmp_path):
    _slow_model(tmp_path / "slow" / "1" / "model.onnx")
    srv = Server(tmp_path)
    x = np.ones((768, 768), dtype=np.float32)
    results, errors = [], []

    def call(protocol):
        try:
            if protocol == "http":
                client = httpclient.InferenceServerClient(srv.http_url, network_timeout=120)
                inp = httpclient.InferInput("x", [768, 768], "FP32")
            else:
                client = grpcclient.InferenceServerClient(srv.grpc_url)
                inp = grpcclient.InferInput("x", [768, 768], "FP32")
            inp.set_data_from_numpy(x)
            results.append(client.infer("slow", [inp]).as_numpy("y"))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=call, args=("http" if i % 2 else "grpc",)) for i in range(8)]
    for t in threads:
        t.start()
    # wait until the server has work in flight, then ask it to stop. What it had taken (in flight or answered)
    # must all be answered; a request still on its way in may be refused (connection closed), never lost
    # halfway. (Answered read first: one answered between the two reads is counted in neither, never twice.)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answered = httpx.get(f"http://{srv.http_url}/v2/models/slow/stats").json()["model_stats"][0][
            "inference_stats"]["success"]["count"]
        in_flight = _inflight(srv, "slow")
        if in_flight >= 2 or (in_flight and answered + in_flight >= 8):
            break
        time.sleep(0.01)
    assert in_flight >= 1  # the signal finds work to drain
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    code = srv.proc.wait(60)
    srv.stop()
    assert code == 0, srv.log()
    assert len(results) >= answered + in_flight, errors
    assert len(results) + len(errors) == 8
    assert all(np.array_equal(r, x) for r in results)
    assert all("connection closed" in e.lower() or "UNAVAILABLE" in e for e in errors), errors
    assert "Traceback" not in srv.log()


def test_ready_line_and_missing_repository(tmp_path):
    with Server(tmp_path) as srv:  # an empty repository serves nothing, but serves
        assert srv.http_port > 0 and srv.grpc_port > 0
        assert httpx.get(f"http://{srv.http_url}/v2/health/ready").status_code == 200
        assert grpcclient.InferenceServerClient(srv.grpc_url).is_server_live()
    proc = subprocess.run([sys.executable, "-m", "modelserve", "serve", "--model-repository", str(tmp_path / "nope"),
                           "--http-port", "0", "--grpc-port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "not a folder" in proc.stderr
