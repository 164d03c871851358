"""Shared test helpers: models built with onnx.helper, and a real server process on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2_grpc

ONNX_TYPE = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING, "BF16": TensorProto.BFLOAT16,
}
ALL_DATATYPES = list(ONNX_TYPE)


def save_model(graph_nodes, inputs, outputs, path: Path, initializers=()) -> Path:
    graph = helper.make_graph(graph_nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path, datatype: str, dims=("batch", 4)) -> Path:
    """y = x for one datatype; a symbolic first dim makes the model batchable."""
    t = ONNX_TYPE[datatype]
    return save_model(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [helper.make_tensor_value_info("INPUT0", t, list(dims))],
        [helper.make_tensor_value_info("OUTPUT0", t, list(dims))],
        path,
    )


def mlp_model(path: Path, features: int = 16, hidden: int = 8, classes: int = 4, seed: int = 0) -> Path:
    """A small two-layer network with fixed random weights: probs = softmax(relu(x W1 + b1) W2 + b2)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((features, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    b2 = rng.standard_normal(classes).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return save_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        path, inits,
    )


def multi_io_model(path: Path) -> Path:
    """Inputs a (FP32 [b,3]), b (INT64 [b,2]); outputs sum (FP32 [b,3] = a + 1), prod (INT64 [b,2] = b * 2),
    cat (FP32 [b,5] = concat(a, float(b)))."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    two = helper.make_tensor("two", TensorProto.INT64, [1], [2])
    nodes = [
        helper.make_node("Add", ["a", "one"], ["sum"]),
        helper.make_node("Mul", ["b", "two"], ["prod"]),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["a", "bf"], ["cat"], axis=1),
    ]
    return save_model(
        nodes,
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("prod", TensorProto.INT64, ["batch", 2]),
         helper.make_tensor_value_info("cat", TensorProto.FLOAT, ["batch", 5])],
        path, [one, two],
    )


def scale_model(path: Path, factor: float, dims=("batch", 4)) -> Path:
    """y = x * factor (FP32): versions of one model that answer differently."""
    f = helper.make_tensor("f", TensorProto.FLOAT, [1], [factor])
    return save_model(
        [helper.make_node("Mul", ["x", "f"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
        path, [f],
    )


class Server:
    """``modelserve serve`` in a child process on 127.0.0.1 with free ports."""

    def __init__(self, repository: Path, *args: str, env: dict | None = None, start_timeout: float = 60):
        self.repository = repository
        cmd = [sys.executable, "-m", "modelserve", "serve", "--model-repository", str(repository),
               "--http-port", "0", "--grpc-port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, text=True, start_new_session=True)
        self.output: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + self.log())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            m = re.match(r"modelserve ready http=([\d.]+):(\d+) grpc=([\d.]+):(\d+)", line)
            if m:
                metrics = re.search(r" metrics=[\d.]+:(\d+)", line)
                self.metrics_port = int(metrics.group(1)) if metrics else None
                self.http_port, self.grpc_port = int(m.group(2)), int(m.group(4))
                self.http_url = f"127.0.0.1:{self.http_port}"
                self.grpc_url = f"127.0.0.1:{self.grpc_port}"
                self._ready.set()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.output)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope="session")
def datatype_repo(tmp_path_factory) -> Path:
    """One identity model per datatype (``identity_fp32``...), a multi-io model and an MLP."""
    repo = tmp_path_factory.mktemp("repo")
    for dt in ALL_DATATYPES:
        identity_model(repo / f"identity_{dt.lower()}" / "1" / "model.onnx", dt)
    multi_io_model(repo / "multi" / "1" / "model.onnx")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    (repo / "mlp" / "config.pbtxt").write_text(
        'name: "mlp"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 16\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "probs" data_type: TYPE_FP32 dims: [ 4 ] },'
        ' { name: "logits" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        "dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 2000 }\n"
        "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
    )
    return repo


@pytest.fixture(scope="session")
def server(datatype_repo) -> Server:
    with Server(datatype_repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw(server):
    """A plain HTTP client on the shared server, for what tritonclient would not send."""
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    """tritonclient's raw generated stub, for messages built by hand."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def sample(datatype: str, shape, rng=None) -> np.ndarray:
    """Random data of a V2 datatype, as the numpy array a client would send."""
    from modelserve.datatypes import NUMPY_OF

    rng = rng or np.random.default_rng(0)
    if datatype == "BYTES":
        words = np.array([f"w{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=object)
        return words.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    dtype = NUMPY_OF[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# --- framework models for the convert/optimize tests (examples/ holds the user-facing versions) -----------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def needs(*modules: str):
    """Skip (with the reason) when an optional framework extra is not installed; CI installs them all."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install 'modelserve[...]')")


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> dict:
    """The fixed digits split as .npz files the CLI reads (arrays x [N,1,8,8] float32 and labels)."""
    sys.path.insert(0, str(EXAMPLES))
    import digits_torch

    folder = tmp_path_factory.mktemp("digits")
    digits_torch.save_splits(str(folder / "digits"))
    return {"train": folder / "digits-train.npz", "test": folder / "digits-test.npz", "folder": folder}


@pytest.fixture(scope="session")
def digits_cnn(digits_data) -> dict:
    """The examples' PyTorch CNN trained on digits (seconds): its state dict, factory reference and test accuracy."""
    pytest.importorskip("torch", reason="needs torch (pip install 'modelserve[torch]')")
    import digits_torch
    import torch

    x_train, y_train, x_test, y_test = digits_torch.digits()
    torch.manual_seed(0)  # the initial weights too, so every run trains the same network
    model = digits_torch.train(digits_torch.cnn(), x_train, y_train)
    weights = digits_data["folder"] / "cnn.pt"
    torch.save(model.state_dict(), weights)
    return {"factory": "digits_torch:cnn", "weights": weights, "pythonpath": EXAMPLES, "module": model,
            "accuracy": digits_torch.accuracy(model, x_test, y_test)}


# --- real backing services for the registry: a private PostgreSQL cluster and moto's S3 server -----------------


def _unavailable(reason: str):
    """Skip a test whose service cannot start, except in CI (env CI set), which must run them all."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI requires this service: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL server for the session (services.PostgresServer): private cluster, or MODELSERVE_TEST_POSTGRES_URL."""
    from services import ServiceUnavailable, start_postgres

    try:
        server = start_postgres(tmp_path_factory.mktemp("postgres"))
    except ServiceUnavailable as e:
        _unavailable(f"PostgreSQL unavailable: {e}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """SQLAlchemy URL (postgresql+psycopg://...) of a fresh, empty database for this test; dropped afterwards."""
    import uuid

    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A database URL for each backend: a SQLite file, and the private PostgreSQL's fresh database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 in server mode on a free loopback port for the session (services.S3Server)."""
    from services import ServiceUnavailable, start_moto

    try:
        server = start_moto()
    except ServiceUnavailable as e:
        _unavailable(f"S3 server unavailable: {e}")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> tuple[str, dict]:
    """A fresh bucket for this test: ("s3://<bucket>", storage_options for fsspec/s3fs)."""
    import uuid

    bucket = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    return f"s3://{bucket}", s3_server.storage_options()


# --- Ray Serve (tests/test_ray*.py) --------------------------------------------------------------------------

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on 127.0.0.1 (4 logical CPUs), stopped after the module."""
    port = _free_port()
    # token authentication, as a local ray.init() turns on by itself (the driver sends ~/.ray/auth_token)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    started = subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                              "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)


def replica_processes(model: str) -> list[int]:
    """PIDs of the model's replicas (Ray titles an actor's process ``ray::ServeReplica:<app>:<deployment>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(f"ray::ServeReplica:{model}:{model}".encode()):
                pids.append(int(entry.name))
    return pids


def metric_replicas(srv: Server, model: str) -> set[str]:
    """The replicas of the model's application (label ``<model>/<id>``) whose metrics the driver's metrics
    port gathered with the model READY."""
    text = httpx.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).text
    pattern = re.compile(r'^modelserve_model_state\{(.*)\} 1\.0$', re.M)
    found = set()
    for labels in pattern.findall(text):
        parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if parts.get("model") == model and parts.get("state") == "READY" and \
                parts["replica"].startswith(f"{model}/"):
            found.add(parts["replica"])
    return found


def wait_for_value(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


