"""Rate limits, per-model concurrency caps and request deadlines (issue 7 part 4; ``server/limits.py``).

The token bucket's exact counts are checked on a fake clock; the wiring on real ``modelserve serve``
processes: REST (V2 and TF Serving /v1), gRPC (``RESOURCE_EXHAUSTED`` + ``retry-after``, deadlines),
two API keys with buckets of their own, a slow Python model (its input says how long it sleeps) for the
concurrency cap and the deadlines, a client that sends its body too slowly (408), and the in-flight
gauge back at 0 after errors, time-outs and cancelled clients.
"""

from __future__ import annotations

import re
import socket
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
from conftest import Server, scale_model
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve.errors import InvalidInput, RateLimited
from modelserve.security import KeyStore
from modelserve.server.config import ModelConfig
from modelserve.server.limits import Limits, client_host, parse_rate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NO_LOG = {"MODELSERVE_PAYLOAD_LOG": "false"}


# -- the token bucket and the caps, on a fake clock ------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusals(limits: Limits, name: str | None, n: int, host: str | None = None) -> list[int | None]:
    """``n`` checks in a row: None for each admitted, the Retry-After seconds for each refused."""
    out = []
    for _ in range(n):
        try:
            limits.check_rate(name, host)
            out.append(None)
        except RateLimited as exc:
            assert exc.http_status == 429 and exc.grpc_code == "RESOURCE_EXHAUSTED"
            out.append(exc.retry_after_s)
    return out


def test_bucket_gives_the_burst_then_the_rate_exactly():
    clock = Clock()
    limits = Limits(rate=2, burst=5, clock=clock)
    assert refusals(limits, "a", 6) == [None] * 5 + [1]  # 5 at once, then 0.5 s to the next token: 1 s
    clock.now += 1.0  # two tokens
    assert refusals(limits, "a", 3) == [None, None, 1]
    clock.now += 0.25  # half a token
    assert refusals(limits, "a", 1) == [1]
    clock.now += 0.25
    assert refusals(limits, "a", 2) == [None, 1]
    clock.now += 3600  # refills to the burst, never past it
    assert refusals(limits, "a", 6) == [None] * 5 + [1]


def test_retry_after_is_the_wait_for_one_token_rounded_up():
    clock = Clock()
    limits = Limits(rate=0.25, burst=1, clock=clock)  # one request every 4 s
    assert refusals(limits, "k", 2) == [None, 4]
    clock.now += 1.5
    assert refusals(limits, "k", 1) == [3]  # 2.5 s left: 3
    clock.now += 2.5
    assert refusals(limits, "k", 1) == [None]


def test_buckets_are_per_key_and_per_client_address_when_anonymous():
    clock = Clock()
    limits = Limits(rate=1, burst=2, clock=clock)
    assert refusals(limits, "a", 3) == [None, None, 1]
    assert refusals(limits, "b", 3) == [None, None, 1]  # b is not a
    assert refusals(limits, None, 3, "10.0.0.1") == [None, None, 1]
    assert refusals(limits, None, 3, "10.0.0.2") == [None, None, 1]
    assert refusals(limits, None, 1, "a") == [None]  # an address is never a key name
    assert limits.refused[("rate", "a", "")] == 1 and limits.refused[("rate", "anonymous", "")] == 2


def test_bucket_table_stays_bounded():
    clock = Clock()
    limits = Limits(rate=1, burst=3, clock=clock, max_buckets=100)
    for i in range(1000):
        limits.check_rate(None, f"10.0.{i // 256}.{i % 256}")
        assert len(limits._buckets) <= 100
    clock.now += 10  # all refilled: dropping them loses nothing
    limits.check_rate(None, "192.168.0.1")
    assert len(limits._buckets) <= 100


def test_rate_off_admits_everything():
    limits = Limits()
    assert refusals(limits, "a", 1000) == [None] * 1000


def test_parse_rate():
    assert parse_rate(None) == (0, 0) and parse_rate("0") == (0, 0)
    assert parse_rate("50") == (50.0, 50)
    assert parse_rate("50/s:100") == (50.0, 100)
    assert parse_rate("0.5") == (0.5, 1)
    for bad in ("fast", "-1", "10:0", "nan", "10:x"):
        with pytest.raises(InvalidInput):
            parse_rate(bad)


def test_concurrency_cap_from_the_config_or_the_server_default():
    limits = Limits(max_inflight=2)
    capped = ModelConfig.model_validate({"name": "m", "limits": {"max_inflight": 1}})
    default = ModelConfig(name="d")
    uncapped = ModelConfig.model_validate({"name": "u", "limits": {"max_inflight": 0}})
    assert limits.acquire("m", capped) is True
    with pytest.raises(RateLimited) as refused:
        limits.acquire("m", capped, "ci")
    assert refused.value.retry_after_s == 1 and limits.refused[("concurrency", "ci", "m")] == 1
    limits.release("m")
    assert limits.inflight["m"] == 0 and limits.acquire("m", capped)
    assert limits.acquire("d", default) and limits.acquire("d", default)
    with pytest.raises(RateLimited):
        limits.acquire("d", default)
    assert all(limits.acquire("u", uncapped) is False for _ in range(100))  # not counted: nothing to release
    assert "u" not in limits.inflight and limits.caps == {"m": 1, "d": 2}


def test_deadlines_cancel_at_their_time_and_leave_no_timer_when_idle():
    import asyncio

    async def main():
        limits = Limits(request_timeout_s=0.2, body_timeout_s=0.1)
        assert limits.tick_s == 0.05

        async def guarded(first: float, then: float | None, work: float) -> str:
            deadline = limits.deadline(first)
            try:
                await asyncio.sleep(0.01)
                deadline.move(then)
                await asyncio.sleep(work)
                return "done"
            except asyncio.CancelledError:
                if not deadline.expired:
                    raise
                deadline.uncancel()
                return "expired"
            finally:
                deadline.stop()

        t0 = asyncio.get_running_loop().time()
        results = await asyncio.gather(guarded(0.1, 0.2, 0.5), guarded(0.1, None, 0.3), guarded(0.1, 0.5, 0.1))
        took = asyncio.get_running_loop().time() - t0
        assert results == ["expired", "done", "done"] and took < 0.45
        other = asyncio.create_task(guarded(1.0, 1.0, 5.0))  # cancelled by someone else: not a deadline
        await asyncio.sleep(0.05)
        other.cancel()
        with pytest.raises(asyncio.CancelledError):
            await other
        assert not limits._deadlines
        await asyncio.sleep(0.1)
        assert limits._sweep_handle is None  # idle: no periodic wake-up

    asyncio.run(main())


def test_client_host():
    assert client_host("127.0.0.1:5000") == "127.0.0.1"
    assert client_host("ipv4:10.1.2.3:443") == "10.1.2.3"
    assert client_host("ipv6:[::1]:5000") == "::1"
    assert client_host("unix:/tmp/sock") == "unix:/tmp/sock"
    assert client_host(None) is None


# -- helpers for the servers -------------------------------------------------------------------------------


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def v2(x) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": list(map(float, x))}]}


def grpc_request(model: str, x) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(map(float, x))
    return request


def grpc_call(url: str, request, metadata=(), timeout: float | None = 30):
    """-> (status code, details, trailing metadata as a dict)."""
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=timeout)
            return grpc.StatusCode.OK, "", dict(call.trailing_metadata())
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- rate limits on a server with two API keys --------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits-keys")
    scale_model(root / "repo" / "mlp" / "1" / "model.onnx", 2.0)
    url = f"sqlite:///{root}/registry.db"
    keys = {}
    with KeyStore.open(url, client="test") as store:
        for name, role in (("alice", "reader"), ("bob", "reader"), ("admin", "admin")):
            keys[name], _ = store.create(name, role, None, created_by="test")
    srv = Server(root / "repo", "--auth", "keys", "--keys-db", url, "--rate-limit", "2:5", env=NO_LOG)
    client = httpx.Client(base_url=f"http://{srv.http_url}", timeout=30)
    yield SimpleNamespace(srv=srv, client=client, keys=keys)
    client.close()
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_rate_limit_per_key_burst_then_rate_with_retry_after(keyed):
    c, keys = keyed.client, keyed.keys
    statuses = [c.post("/v2/models/mlp/infer", json=v2([1, 2, 3, 4]), headers=bearer(keys["alice"])) for _ in range(6)]
    assert [r.status_code for r in statuses] == [200] * 5 + [429], [r.text for r in statuses]
    refused = statuses[-1]
    assert refused.headers["retry-after"] == "1" and "rate limit" in refused.json()["error"]
    # bob has a bucket of his own; a bad key is a 401, not a 429, and spends nobody's tokens
    assert [c.post("/v2/models/mlp/infer", json=v2([1, 2, 3, 4]), headers=bearer(keys["bob"])).status_code
            for _ in range(5)] == [200] * 5
    assert c.post("/v2/models/mlp/infer", json=v2([1, 2, 3, 4]), headers=bearer("nonsense")).status_code == 401
    # other routes are not rate limited: metadata, health
    assert c.get("/v2/models/mlp", headers=bearer(keys["alice"])).status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    time.sleep(1.05)  # two more tokens at 2/s
    after = [c.post("/v2/models/mlp/infer", json=v2([1, 2, 3, 4]), headers=bearer(keys["alice"])).status_code
             for _ in range(3)]
    assert after == [200, 200, 429]
    # TF Serving REST spends the same bucket
    time.sleep(0.55)
    assert c.post("/v1/models/mlp:predict", json={"instances": [[1, 2, 3, 4]]},
                  headers=bearer(keys["alice"])).status_code == 200
    r = c.post("/v1/models/mlp:predict", json={"instances": [[1, 2, 3, 4]]}, headers=bearer(keys["alice"]))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_rate_limit_over_grpc_is_resource_exhausted_with_retry_after(keyed):
    metadata = (("authorization", f"Bearer {keyed.keys['bob']}"),)
    codes = [grpc_call(keyed.srv.grpc_url, grpc_request("mlp", [1, 2, 3, 4]), metadata) for _ in range(6)]
    refused = [c for c in codes if c[0] != grpc.StatusCode.OK]
    assert refused, codes  # bob's bucket was spent over REST a moment ago; at most a few tokens are back
    code, details, trailing = refused[0]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details
    assert trailing["retry-after"] == "1" and trailing.get("x-request-id")


def test_rate_limited_requests_are_counted_in_metrics(keyed):
    text = keyed.client.get("/metrics", headers=bearer(keyed.keys["admin"])).text
    assert metric(text, "modelserve_rate_limited_total", reason="rate", key="alice", model="") >= 2
    assert metric(text, "modelserve_rate_limited_total", reason="rate", key="bob", model="") >= 1
    assert metric(text, "modelserve_rate_limit_requests_per_second") == 2.0
    assert metric(text, "modelserve_rate_limit_burst") == 5.0


# -- concurrency caps and deadlines on a slow Python model -------------------------------------------------


SLOW = '''
import time

import numpy as np
from modelserve import PythonModel


class Slow(PythonModel):
    """Sleeps max(x) seconds; y = how many predict calls this instance has run (x < 0: fails)."""

    def setup(self, context):
        self.calls = 0

    def predict(self, batch):
        x = batch["x"]
        if x.min() < 0:
            raise ValueError("negative input")
        self.calls += 1
        time.sleep(float(x.max()))
        return {"y": np.full_like(x, self.calls)}
'''


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    repo = tmp_path_factory.mktemp("limits-slow")
    for name, cap, instances in (("slow", 2, 2), ("queued", None, 1)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(SLOW)
        (repo / name / "config.yaml").write_text(textwrap.dedent(f"""
            backend: python
            max_batch_size: 1
            instances: {instances}
            inputs: [{{name: x, datatype: FP32, dims: [4]}}]
            outputs: [{{name: y, datatype: FP32, dims: [4]}}]
        """) + (f"limits: {{max_inflight: {cap}}}\n" if cap else ""))
    srv = Server(repo, "--request-timeout-s", "1", "--body-timeout-s", "1", "--max-inflight-per-model", "8", env=NO_LOG)
    client = httpx.Client(base_url=f"http://{srv.http_url}", timeout=30)
    yield SimpleNamespace(srv=srv, client=client)
    client.close()
    srv.stop()
    unexpected = [line for line in srv.output if "Traceback" in line and "negative input" not in line]
    assert not unexpected, srv.log()


def inflight(client, model: str) -> float | None:
    return metric(client.get("/metrics").text, "modelserve_model_inflight", model=model)


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def test_concurrency_cap_refuses_past_it_and_gives_slots_back(slow):
    c, url = slow.client, slow.srv.http_url
    assert inflight(c, "slow") is None or inflight(c, "slow") == 0

    def post(x):
        with httpx.Client(base_url=f"http://{url}", timeout=30) as own:
            return own.post("/v2/models/slow/infer", json=v2(x))

    held = [in_background(post, [0.8, 0, 0, 0]) for _ in range(2)]
    wait_for(lambda: inflight(c, "slow") == 2, what="two requests holding slow's slots")
    t0 = time.monotonic()
    refused = c.post("/v2/models/slow/infer", json=v2([0, 0, 0, 0]))
    assert refused.status_code == 429 and time.monotonic() - t0 < 0.5
    assert refused.headers["retry-after"] == "1" and "concurrent" in refused.json()["error"]
    assert refused.headers["x-request-id"]
    code, details, trailing = grpc_call(slow.srv.grpc_url, grpc_request("slow", [0, 0, 0, 0]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailing["retry-after"] == "1", details
    r = c.post("/v1/models/slow:predict", json={"instances": [[0, 0, 0, 0]]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert c.post("/v2/models/queued/infer", json=v2([0, 0, 0, 0])).status_code == 200  # other models unaffected
    for thread, out in held:
        thread.join(10)
        assert out[0].status_code == 200, out[0].text
    assert inflight(c, "slow") == 0
    assert c.post("/v2/models/slow/infer", json=v2([0, 0, 0, 0])).status_code == 200
    text = c.get("/metrics").text
    assert metric(text, "modelserve_model_inflight_limit", model="slow") == 2
    assert metric(text, "modelserve_model_inflight_limit", model="queued") == 8  # the server's default
    assert metric(text, "modelserve_rate_limited_total", reason="concurrency", key="anonymous", model="slow") >= 3


def test_rest_request_timeout_is_504_and_the_server_stays_healthy(slow):
    c = slow.client
    t0 = time.monotonic()
    r = c.post("/v2/models/slow/infer", json=v2([2.0, 0, 0, 0]))
    took = time.monotonic() - t0
    assert r.status_code == 504 and "timeout" in r.json()["error"], r.text
    assert 0.9 < took < 1.8
    assert c.post("/v1/models/slow:predict", json={"instances": [[2.0, 0, 0, 0]]}).status_code == 504
    assert c.get("/v2/health/ready").status_code == 200
    wait_for(lambda: c.post("/v2/models/slow/infer", json=v2([0, 0, 0, 0])).status_code == 200, what="a fast answer")
    assert inflight(c, "slow") == 0


def test_a_request_that_times_out_in_the_queue_is_never_run(slow):
    c, url = slow.client, slow.srv.http_url
    wait_for(lambda: c.post("/v2/models/queued/infer", json=v2([0, 0, 0, 0])).status_code == 200, what="queued idle")
    before = c.post("/v2/models/queued/infer", json=v2([0, 0, 0, 0])).json()["outputs"][0]["data"][0]

    def post(x):
        with httpx.Client(base_url=f"http://{url}", timeout=30) as own:
            return own.post("/v2/models/queued/infer", json=v2(x))

    first = in_background(post, [1.5, 0, 0, 0])  # runs 1.5 s, answered 504 at 1 s
    time.sleep(0.2)
    second = post([0, 0, 0, 0])  # waits behind it in the queue; its deadline passes there
    assert second.status_code == 504
    first[0].join(10)
    assert first[1][0].status_code == 504
    time.sleep(0.5)  # the first one's sleep is over
    after = c.post("/v2/models/queued/infer", json=v2([0, 0, 0, 0])).json()["outputs"][0]["data"][0]
    assert after == before + 2  # the first one and this one: the cancelled one was dropped, not run


def test_grpc_deadlines(slow):
    url = slow.srv.grpc_url
    t0 = time.monotonic()
    code, _, _ = grpc_call(url, grpc_request("queued", [2.0, 0, 0, 0]), timeout=0.4)  # the client's deadline
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 1.0
    time.sleep(1.8)
    code, details, _ = grpc_call(url, grpc_request("queued", [2.0, 0, 0, 0]), timeout=None)  # the server's 1 s
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in details, details
    time.sleep(1.2)
    assert grpc_call(url, grpc_request("queued", [0, 0, 0, 0]))[0] == grpc.StatusCode.OK


def raw_http(port: int, head: bytes, body_parts: list[bytes], pause: float) -> tuple[int, float]:
    """Send ``head``, then each body part ``pause`` seconds apart; -> (status, seconds to the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(head)
        answer = b""
        sock.settimeout(pause)
        for part in body_parts:
            try:
                answer += sock.recv(65536)
                break  # answered before the body was done
            except TimeoutError:
                pass
            try:
                sock.sendall(part)
            except OSError:
                break
        sock.settimeout(10)
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return int(answer.split()[1]), time.monotonic() - t0


@pytest.mark.parametrize("path", ["/v2/models/slow/infer", "/v1/models/slow:predict"])
def test_a_slow_body_gets_408(slow, path):
    body = (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}'
            if path.startswith("/v2") else b'{"instances": [[0, 0, 0, 0]]}')
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    parts = [body[i:i + 4] for i in range(0, len(body), 4)]  # 4 bytes every 0.3 s: several seconds in all
    status, took = raw_http(slow.srv.http_port, head, parts, 0.3)
    assert status == 408 and 0.9 < took < 2.5
    assert inflight(slow.client, "slow") == 0


def test_the_inflight_gauge_returns_to_zero_after_errors_and_cancelled_clients(slow):
    c, url = slow.client, slow.srv.http_url
    assert c.post("/v2/models/slow/infer", json=v2([-1, 0, 0, 0])).status_code == 500  # the model fails
    assert c.post("/v2/models/slow/infer", json={"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                                            "data": [0, 0, 0]}]}).status_code == 400
    assert c.post("/v2/models/slow/infer", content=b"{not json").status_code == 400
    with httpx.Client(base_url=f"http://{url}", timeout=0.2) as impatient:  # gives up while the model sleeps
        for _ in range(2):
            with pytest.raises(httpx.TimeoutException):
                impatient.post("/v2/models/slow/infer", json=v2([0.6, 0, 0, 0]))
    for _ in range(2):  # gRPC clients that give up
        assert grpc_call(slow.srv.grpc_url, grpc_request("slow", [0.6, 0, 0, 0]), timeout=0.1)[0] in (
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    wait_for(lambda: inflight(c, "slow") == 0, what="slow's slots given back")
    assert [c.post("/v2/models/slow/infer", json=v2([0, 0, 0, 0])).status_code for _ in range(3)] == [200] * 3


def test_a_bad_rate_limit_is_refused_at_start(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "modelserve", "serve", "--model-repository", str(tmp_path),
                           "--rate-limit", "fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "rate-limit" in done.stderr
