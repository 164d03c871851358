"""The payload log, feedback and quality, against a real server process and real databases.

Every request the clients send (REST and gRPC, from several threads, successes and failures) must
appear in the database exactly once, with its id, status, model, version and input values; the
database may stop or lock in the middle of the load without a request waiting on it or a row being
lost; feedback must give the metrics computed here by hand; the CLI must read the rows back.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import create_engine, text
from tritonclient.grpc import service_pb2, service_pb2_grpc
from typer.testing import CliRunner

from conftest import Server, identity_model, mlp_model, save_model

FEATURES = 16


def regression_model(path: Path) -> Path:
    """y = x · w (FP32 [b,16] -> [b,1]): one number per row, scored as regression."""
    w = numpy_helper.from_array(np.linspace(-1, 1, FEATURES, dtype=np.float32).reshape(FEATURES, 1), "w")
    return save_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], path, [w])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("monitor-repo")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    (repo / "mlp" / "config.yaml").write_text("max_batch_size: 16\nmonitoring: {max_values: 64}\n")
    regression_model(repo / "reg" / "1" / "model.onnx")
    for name, monitoring in (("quiet", "{payload_log: false}"), ("sampled", "{sample_rate: 0}"),
                             ("big", "{max_values: 2}")):
        identity_model(repo / name / "1" / "model.onnx", "FP32")
        (repo / name / "config.yaml").write_text(f"monitoring: {monitoring}\n")
    return repo


def serve(repo: Path, db: str, spill: Path, *args: str) -> Server:
    return Server(repo, "--monitor-db", db, "--monitor-spill", str(spill), *args)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'monitor.db'}"


def v2_body(x: np.ndarray, name: str = "x", request_id: str | None = None) -> dict:
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if request_id:
        body["id"] = request_id
    return body


def rest(client: httpx.Client, model: str, x: np.ndarray, request_id: str | None = None, name: str = "x",
         header_id: str | None = None):
    r = client.post(f"/v2/models/{model}/infer", json=v2_body(x, name, request_id),
                    headers={"x-request-id": header_id} if header_id else None)
    return r.status_code, r.headers["x-request-id"], r


def grpc_infer(stub, model: str, x: np.ndarray, request_id: str = "") -> tuple[int, str]:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    try:
        _, call = stub.ModelInfer.with_call(request, timeout=30)
        code, metadata = 200, call.trailing_metadata()
    except grpc.RpcError as exc:
        code = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404}.get(exc.code(), 500)
        metadata = exc.trailing_metadata()
    return code, dict(metadata)["x-request-id"]


def flush(client: httpx.Client, timeout_s: float = 30) -> dict:
    r = client.post(f"/v2/logs/flush?timeout_s={timeout_s}", timeout=timeout_s + 10)
    assert r.status_code == 200, r.text
    return r.json()


def stored(url: str) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            rows = c.execute(text("select request_id, model, version, protocol, status, error, inputs, prediction "
                                  "from payload_log order by id")).mappings().all()
    finally:
        engine.dispose()
    return [{**r, "inputs": json.loads(r["inputs"]) if isinstance(r["inputs"], str) else r["inputs"],
             "prediction": json.loads(r["prediction"]) if isinstance(r["prediction"], str) else r["prediction"]}
            for r in rows]


def load(server: Server, threads: int = 4, per_thread: int = 30) -> list[dict]:
    """REST and gRPC clients in parallel threads; every 7th request is malformed (400), every 11th goes to
    a model that does not exist (404); half the requests carry their own id (REST: in the x-request-id
    header or the body's ``id``, which a request refused before its body is read cannot give). Returns
    what each sent."""
    sent: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int, kind: str) -> None:
        rng = np.random.default_rng(t)
        mine = []
        with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client, \
                grpc.insecure_channel(server.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for i in range(per_thread):
                rows = 1 + i % 3
                x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
                model, expect = "mlp", 200
                if i % 7 == 3:
                    x, expect = x[:, :5], 400
                elif i % 11 == 5:
                    model, expect = "missing", 404
                given = f"{kind}-{t}-{i}" if i % 2 else None
                if kind == "rest" and i % 4 == 1:
                    status, rid, _ = rest(client, model, x, header_id=given)
                elif kind == "rest":
                    status, rid, _ = rest(client, model, x, given)
                    if expect == 404:
                        given = None
                else:
                    status, rid = grpc_infer(stub, model, x, given or "")
                assert status == expect, (kind, i, status)
                assert rid == given if given else len(rid) == 32, (kind, i, rid)
                mine.append({"request_id": rid, "model": model, "status": status, "x": x,
                             "protocol": "v2-rest" if kind == "rest" else "v2-grpc"})
        with lock:
            sent.extend(mine)

    def guarded(t: int, kind: str) -> None:
        try:
            worker(t, kind)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=guarded, args=(t, kind)) for t in range(threads) for kind in ("rest", "grpc")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sent


def check_rows_match(url: str, sent: list[dict]) -> None:
    rows = stored(url)
    assert len(rows) == len(sent)
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows)  # each request once
    assert set(by_id) == {s["request_id"] for s in sent}
    for s in sent:
        row = by_id[s["request_id"]]
        assert (row["model"], row["status"], row["protocol"]) == (s["model"], s["status"], s["protocol"])
        if s["model"] == "mlp":
            assert row["version"] == "1"
            assert np.array_equal(np.array(row["inputs"]["x"], dtype=np.float32), s["x"])
        if s["status"] == 200:
            assert row["error"] is None and len(row["prediction"]["values"]) == len(s["x"])
        else:
            assert row["error"]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_rows_match_requests_under_concurrent_load(repo, tmp_path, request, db):
    url = sqlite_url(tmp_path) if db == "sqlite" else request.getfixturevalue("postgres_url")
    with serve(repo, url, tmp_path / "spill.jsonl") as server:
        sent = load(server)
        with httpx.Client(base_url=f"http://{server.http_url}") as client:
            status = flush(client)
            assert status["written"] == len(sent) and status["dropped"] == 0
            logged = client.get("/v2/logs", params={"model": "mlp", "status": "4xx", "limit": 1000}).json()["rows"]
            assert len(logged) == sum(s["model"] == "mlp" and s["status"] == 400 for s in sent)
    check_rows_match(url, sent)
    counts = Counter(s["status"] for s in sent)
    assert counts[200] and counts[400] and counts[404]


def _restart(pg) -> None:
    """Start the private cluster ``services.start_postgres`` made, on its port and socket folder again."""
    from sqlalchemy.engine import make_url

    port = make_url(pg.server_url).port
    options = f"-p {port} -k {pg.data_dir.parent / 'sock'} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = pg.data_dir.parent / "postgres.log"  # the cluster's folder: its user may write there
    subprocess.run([*pg.pg_ctl, "-w", "-t", "60", "-D", str(pg.data_dir), "-o", options, "-l", str(log), "start"],
                   check=True, capture_output=True, cwd=pg.data_dir.parent)


def test_postgres_stopped_mid_load_loses_nothing(repo, tmp_path):
    from services import ServiceUnavailable, start_postgres

    try:
        pg = start_postgres(tmp_path / "pg")
    except ServiceUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    if not pg.pg_ctl:
        pytest.skip("an external PostgreSQL (MODELSERVE_TEST_POSTGRES_URL) cannot be stopped by the test")
    try:
        url = pg.create_database("monitor")
        spill = tmp_path / "spill.jsonl"
        with serve(repo, url, spill) as server:
            sent, latencies, stop = [], {"before": [], "down": [], "after": []}, threading.Event()
            phase = ["before"]

            def client_loop(seed: int) -> None:
                rng = np.random.default_rng(seed)
                with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
                    while not stop.is_set():
                        x = rng.standard_normal((1, FEATURES)).astype(np.float32)
                        started = time.perf_counter()
                        status, rid, _ = rest(client, "mlp", x)
                        latencies[phase[0]].append(time.perf_counter() - started)
                        sent.append({"request_id": rid, "model": "mlp", "status": status, "x": x,
                                     "protocol": "v2-rest"})
                        time.sleep(0.002)

            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            try:
                time.sleep(1.0)
                subprocess.run([*pg.pg_ctl, "-D", str(pg.data_dir), "-m", "fast", "-w", "stop"], check=True,
                               capture_output=True, cwd=pg.data_dir.parent)
                phase[0] = "down"
                with httpx.Client(base_url=f"http://{server.http_url}") as client:
                    deadline = time.monotonic() + 20
                    while not (spill.exists() and spill.stat().st_size > 0):
                        assert time.monotonic() < deadline, "the spill file was never written"
                        time.sleep(0.05)
                    time.sleep(1.0)
                    down = client.get("/v2/logs/status").json()
                    assert down["database_error"] and down["spilled"] > 0
                    _restart(pg)
                    phase[0] = "after"
                    time.sleep(1.5)
            finally:
                stop.set()
                for t in threads:
                    t.join()
            with httpx.Client(base_url=f"http://{server.http_url}") as client:
                status = flush(client, 60)
            assert status["database_error"] is None and status["dropped"] == 0
            assert status["replayed"] == status["spilled"] > 0
            assert spill.stat().st_size == 0  # replayed, then emptied
            assert all(s["status"] == 200 for s in sent)  # the requests never noticed
            assert len(latencies["down"]) > 20
            for name, values in latencies.items():
                print(f"{name}: {len(values)} requests, p50 {np.percentile(values, 50) * 1e3:.2f} ms, "
                      f"max {max(values) * 1e3:.2f} ms")
            # requests never wait on the database (its connect timeout is 5 s, the writer's 2 s): the outage
            # costs at most the spill file's append, in the writer thread
            p50 = {name: np.percentile(values, 50) for name, values in latencies.items()}
            assert p50["down"] < 3 * p50["before"] + 0.005, p50
            assert max(latencies["down"]) < 1.0
        check_rows_match(url, sent)
    finally:
        pg.stop()


def test_sqlite_locked_requests_never_wait_and_rows_are_not_doubled(repo, tmp_path):
    """A writer holding SQLite's lock stalls the server's INSERT (it waits up to 30 s): requests go on,
    the stalled batch goes to the spill file too, and when it commits late the replay skips it."""
    url, spill = sqlite_url(tmp_path), tmp_path / "spill.jsonl"
    with serve(repo, url, spill) as server, httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        rng = np.random.default_rng(1)
        sent = []

        def one() -> None:
            x = rng.standard_normal((1, FEATURES)).astype(np.float32)
            status, rid, _ = rest(client, "mlp", x)
            sent.append({"request_id": rid, "model": "mlp", "status": status, "x": x, "protocol": "v2-rest"})

        one()
        flush(client)
        blocker = sqlite3.connect(tmp_path / "monitor.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # 5 s of requests, all answered while the lock is held
                one()
                time.sleep(0.01)
            during = client.get("/v2/logs/status").json()
            assert during["spilled"] > 0 and spill.stat().st_size > 0
        finally:
            blocker.rollback()
            blocker.close()
        status = flush(client, 60)
        assert status["flushed"] and spill.stat().st_size == 0
    assert all(s["status"] == 200 for s in sent)
    check_rows_match(url, sent)


def test_spill_file_survives_kill_9(repo, tmp_path):
    """Records spilled while the database was locked are on disk: a server killed with SIGKILL loses
    none of them; the next one replays the file."""
    url, spill = sqlite_url(tmp_path), tmp_path / "spill.jsonl"
    server = serve(repo, url, spill)
    blocker = None
    try:
        with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
            flush(client)
            blocker = sqlite3.connect(tmp_path / "monitor.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            ids = [rest(client, "mlp", np.ones((1, FEATURES), np.float32))[1] for _ in range(20)]
            deadline = time.monotonic() + 20
            while client.get("/v2/logs/status").json()["spilled"] < len(ids):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        os.killpg(server.proc.pid, 9)
        server.proc.wait()
    finally:
        if blocker is not None:
            blocker.rollback()
            blocker.close()
        server.stop()
    assert spill.stat().st_size > 0
    with serve(repo, url, spill) as again, httpx.Client(base_url=f"http://{again.http_url}") as client:
        assert flush(client)["replayed"] >= len(ids)
    rows = stored(url)
    assert {r["request_id"] for r in rows} == set(ids) and len(rows) == len(ids)


def test_sampling_and_per_model_switches(repo, tmp_path):
    url = sqlite_url(tmp_path)
    x = np.ones((1, 4), np.float32)
    with serve(repo, url, tmp_path / "spill.jsonl") as server, \
            httpx.Client(base_url=f"http://{server.http_url}") as client:
        for _ in range(5):
            assert rest(client, "quiet", x, name="INPUT0")[0] == 200
            assert rest(client, "sampled", x, name="INPUT0")[0] == 200
        assert rest(client, "quiet", x[:, :2], name="INPUT0")[0] == 400  # logging off: not even failures
        failed = rest(client, "sampled", x[:, :2], name="INPUT0")[1]  # failures are not sampled away
        big = rest(client, "big", np.arange(4, dtype=np.float32).reshape(1, 4), name="INPUT0")[1]
        flush(client)
    rows = {r["request_id"]: r for r in stored(url)}
    assert set(rows) == {failed, big}
    summary = rows[big]["inputs"]["INPUT0"]
    assert summary["summary"] and summary["shape"] == [1, 4] and summary["mean"] == 1.5 and summary["max"] == 3.0
    assert len(summary["sha256"]) == 64

    off = tmp_path / "off"
    with serve(repo, sqlite_url(off), off / "spill.jsonl", "--no-payload-log") as server, \
            httpx.Client(base_url=f"http://{server.http_url}") as client:
        assert rest(client, "mlp", np.ones((1, FEATURES), np.float32))[0] == 200
        assert client.get("/v2/logs/status").status_code == 503
    assert not (off / "monitor.db").exists()


def by_hand(pairs: list[tuple[int, int]]) -> dict:
    classes = sorted({c for p in pairs for c in p})
    confusion = {t: {p: sum(1 for pp, tt in pairs if tt == t and pp == p) for p in classes} for t in classes}
    out = {"accuracy": sum(p == t for p, t in pairs) / len(pairs), "confusion": confusion, "per_class": {}}
    for c in classes:
        tp = confusion[c][c]
        predicted = sum(confusion[t][c] for t in classes)
        actual = sum(confusion[c].values())
        out["per_class"][c] = (tp / predicted if predicted else 0.0, tp / actual if actual else 0.0)
    return out


def test_feedback_gives_the_metrics_computed_by_hand(repo, tmp_path):
    url = sqlite_url(tmp_path)
    rng = np.random.default_rng(7)
    with serve(repo, url, tmp_path / "spill.jsonl") as server, \
            httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        pairs, feedback = [], []
        for i in range(40):
            rows = 2 if i % 10 == 0 else 1
            status, rid, r = rest(client, "mlp", rng.standard_normal((rows, FEATURES)).astype(np.float32))
            predicted = np.argmax(np.array(r.json()["outputs"][0]["data"]).reshape(rows, 4), axis=1).tolist()
            truth = [p if rng.random() < 0.6 else int(rng.integers(0, 4)) for p in predicted]
            pairs += list(zip(predicted, truth))
            feedback.append({"request_id": rid, "ground_truth": truth if rows > 1 else truth[0]})
        answers = [client.post("/v2/models/mlp/feedback", json=f) for f in feedback[:20]]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        batch = client.post("/v2/models/mlp/feedback", json={"items": feedback[20:]}).json()
        assert batch["accepted"] == 20
        again = client.post("/v2/models/mlp/feedback", json=feedback[0])
        assert again.status_code == 409
        assert client.post("/v2/models/mlp/feedback", json={"request_id": "nope", "ground_truth": 1}).status_code == 404
        assert client.post("/v2/models/reg/feedback", json=feedback[1]).status_code == 404  # another model's request

        reg_pairs = []
        for _ in range(10):
            status, rid, r = rest(client, "reg", rng.standard_normal((1, FEATURES)).astype(np.float32))
            value = r.json()["outputs"][0]["data"][0]
            truth = round(value + float(rng.normal()), 3)
            reg_pairs.append((value, truth))
            assert client.post("/v2/models/reg/feedback", json={"request_id": rid, "ground_truth": truth}).status_code == 200
        late = rest(client, "mlp", np.ones((1, FEATURES), np.float32))[2]
        late_id = late.headers["x-request-id"]

        def check(quality: dict) -> None:
            got, want = quality["versions"]["1"], by_hand(pairs)
            assert got["samples"] == len(pairs) == 44
            assert got["accuracy"] == pytest.approx(want["accuracy"])
            assert got["confusion"] == {str(t): {str(p): n for p, n in row.items()} for t, row in want["confusion"].items()}
            for c, (precision, recall) in want["per_class"].items():
                assert got["per_class"][str(c)]["precision"] == pytest.approx(precision)
                assert got["per_class"][str(c)]["recall"] == pytest.approx(recall)

        check(client.get("/v2/models/mlp/quality").json())
        reg = client.get("/v2/models/reg/quality").json()["versions"]["1"]
        errors = np.array([p - t for p, t in reg_pairs])
        assert reg["mae"] == pytest.approx(np.abs(errors).mean(), rel=1e-6)
        assert reg["rmse"] == pytest.approx(np.sqrt((errors ** 2).mean()), rel=1e-6)
        scraped = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")}
        assert scraped['modelserve_accuracy{model="mlp",version="1"}'] == pytest.approx(by_hand(pairs)["accuracy"])
        assert scraped['modelserve_feedback_samples{model="mlp",version="1"}'] == 44
        assert scraped['modelserve_mae{model="reg",version="1"}'] == pytest.approx(np.abs(errors).mean(), rel=1e-6)
        flush(client)

    result = CliRunner().invoke(_cli(), ["stats", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    mlp = next(r for r in json.loads(result.output) if r["model"] == "mlp" and r["version"] == "1")
    assert mlp["accuracy"] == pytest.approx(by_hand(pairs)["accuracy"]) and mlp["requests"] == 41

    # a new process: windows come back from the feedback table; old requests join through the database
    with serve(repo, url, tmp_path / "spill.jsonl") as server, \
            httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        deadline = time.monotonic() + 20
        while not client.get("/v2/models/mlp/quality").json()["versions"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        check(client.get("/v2/models/mlp/quality").json())
        assert client.post("/v2/models/mlp/feedback", json=feedback[3]).status_code == 409  # known from the database
        joined = client.post("/v2/models/mlp/feedback", json={"request_id": late_id, "ground_truth": 0})
        assert joined.status_code == 200, joined.text
        assert joined.json()["samples"] == 1


def _cli():
    from modelserve.cli import app

    return app


def test_cli_logs_export_and_stats(repo, tmp_path):
    url = sqlite_url(tmp_path)
    with serve(repo, url, tmp_path / "spill.jsonl") as server, \
            httpx.Client(base_url=f"http://{server.http_url}") as client:
        ok = [rest(client, "mlp", np.full((1, FEATURES), i, np.float32))[1] for i in range(5)]
        bad = rest(client, "mlp", np.ones((1, 3), np.float32))[1]
        flush(client)
        r = subprocess.run([sys.executable, "-m", "modelserve", "feedback", "mlp",
                            ok[0], "2", "--url", f"http://{server.http_url}"], capture_output=True, text=True)
        assert r.returncode == 0 and "mlp v1" in r.stdout, r.stderr
        flush(client)
    runner = CliRunner()
    result = runner.invoke(_cli(), ["logs", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["request_id"] for r in rows] == [bad, *reversed(ok)]  # newest first
    assert rows[-1]["inputs"]["x"] == [[0.0] * FEATURES]
    errors = json.loads(runner.invoke(_cli(), ["logs", "--db", url, "--status", "error", "--json"]).output)
    assert [r["request_id"] for r in errors] == [bad] and errors[0]["status"] == 400

    out = tmp_path / "rows.csv"
    result = runner.invoke(_cli(), ["logs", "--db", url, "--model", "mlp", "--export", str(out)])
    assert result.exit_code == 0, result.output
    import csv

    exported = list(csv.DictReader(out.open()))
    assert [r["request_id"] for r in exported] == [*ok, bad]  # oldest first
    assert json.loads(exported[1]["inputs"])["x"] == [[1.0] * FEATURES]

    parquet = runner.invoke(_cli(), ["logs", "--db", url, "--export", str(tmp_path / "rows.parquet")])
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert parquet.exit_code == 2 and "pyarrow" in parquet.output
    else:
        assert parquet.exit_code == 0 and pq.read_table(tmp_path / "rows.parquet").num_rows == 6

    table = runner.invoke(_cli(), ["stats", "--db", url])
    assert table.exit_code == 0 and "mlp" in table.output
    stats = json.loads(runner.invoke(_cli(), ["stats", "--db", url, "--json"]).output)
    mlp = next(r for r in stats if r["model"] == "mlp")
    assert (mlp["requests"], mlp["failures"], mlp["feedback"]) == (6, 1, 1)
    assert runner.invoke(_cli(), ["logs", "--db", f"sqlite:///{tmp_path / 'none.db'}"]).exit_code == 1


def test_json_log_lines_carry_the_request_id():
    from modelserve.logs import REQUEST_ID, JsonFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    token = REQUEST_ID.set("abc123")
    try:
        assert json.loads(JsonFormatter().format(record))["request_id"] == "abc123"
    finally:
        REQUEST_ID.reset(token)
    assert "request_id" not in json.loads(JsonFormatter().format(record))


def test_kill_9_under_load_loses_at_most_the_last_cycle(repo, tmp_path):
    """The guarantee for ``kill -9`` of the server process alone (the database up): every request
    answered more than one cycle (``interval_s`` + ``write_timeout_s`` = 2.25 s) before the kill is stored,
    by the writer process that outlives it or by the next server's replay, and none twice."""
    url, spill = sqlite_url(tmp_path), tmp_path / "spill.jsonl"
    server = serve(repo, url, spill)
    answered: dict[str, float] = {}
    stop = threading.Event()

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
            while not stop.is_set():
                try:
                    status, rid, _ = rest(client, "mlp", rng.standard_normal((1, FEATURES)).astype(np.float32))
                except httpx.HTTPError:
                    return  # the server is gone
                if status == 200:
                    answered[rid] = time.monotonic()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(3.0)
        killed_at = time.monotonic()
        os.kill(server.proc.pid, 9)  # the server only: its writer process sees the pipes close
        server.proc.wait()
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    must = {rid for rid, at in answered.items() if at < killed_at - 2.25}
    assert len(must) > 50
    deadline = time.monotonic() + 60  # the orphaned writer stores what it holds, then exits
    with serve(repo, url, spill) as again, httpx.Client(base_url=f"http://{again.http_url}") as client:
        while True:
            flush(client, 30)
            ids = [r["request_id"] for r in stored(url)]
            if must <= set(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert must <= set(ids), f"{len(must - set(ids))} of {len(must)} answered requests lost"
    assert len(ids) == len(set(ids))  # none stored twice


def _writer_pid(server: Server) -> int:
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"modelserve.monitor.writer" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no writer process")


def test_kill_9_of_the_writer_process_loses_nothing(repo, tmp_path):
    """The writer process killed under load: the server starts a new one, which reads the ring on from the
    last record the dead one stored; the rows equal the requests exactly (none lost, none twice)."""
    url = sqlite_url(tmp_path)
    with serve(repo, url, tmp_path / "spill.jsonl") as server:
        sent: list[str] = []
        stop = threading.Event()

        def client_loop(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
                while not stop.is_set():
                    status, rid, _ = rest(client, "mlp", rng.standard_normal((1 + seed, FEATURES)).astype(np.float32))
                    assert status == 200
                    sent.append(rid)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            first = _writer_pid(server)
            os.kill(first, 9)
            time.sleep(2.5)  # past the watchdog's restart back-off, still under load
        finally:
            stop.set()
            for t in threads:
                t.join()
        with httpx.Client(base_url=f"http://{server.http_url}") as client:
            status = flush(client)
        assert status["flushed"] and status["writer_restarts"] >= 1 and _writer_pid(server) != first
    ids = [r["request_id"] for r in stored(url)]
    assert len(sent) > 50 and len(ids) == len(set(ids)) and set(ids) == set(sent)


def _pack(tensors: list) -> tuple:
    """As the writer packs the records' tensors (records as the ring gives them)."""
    from modelserve.monitor.ring import _columns, pack_dicts

    records = [("p", 0.0, "r", "m", "1", "v2-rest", None, 200, None, 0, 1, t, None, place)
               for place, t in enumerate(tensors)]
    packed = _columns(records)[7]
    assert packed[0] == pack_dicts(tensors)[0]  # joined or not, as the dict-based packing decides
    return packed


def _same(a, b) -> bool:
    """Documents equal, numbers to float rounding (row statistics are summed in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and bool(np.isclose(a, b, rtol=1e-9, atol=1e-12))
    return a == b


@pytest.mark.parametrize("max_values", [0, 4, 64, 10_000])
def test_columnar_encoding_gives_the_documents_of_encode_all(max_values):
    """``encode_packed`` (the writer's column-at-once path) and ``predictions_packed`` give, record by
    record, what ``encode_all`` and ``prediction`` give for the record alone."""
    from modelserve.monitor.encode import encode_all, encode_packed, prediction, predictions_packed

    rng = np.random.default_rng(0)
    cases = [
        [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(50)],  # one row each
        [{"x": rng.standard_normal((3, 2, 4)), "m": rng.integers(0, 9, (3, 5)).astype(np.int64)} for _ in range(9)],
        [{"x": rng.standard_normal((1 + i % 3, 6)).astype(np.float32)} for i in range(12)],  # rows differ
        [{"x": np.array([[1.0, np.nan, np.inf, 2.0]], dtype=np.float32)}, {"x": np.ones((1, 4), np.float32)}],
        [{"b": rng.random((2, 3)) > 0.5} for _ in range(4)],
        [{"x": np.ones((1, 3), np.float32)}, None, {"y": np.ones((1, 3), np.float32)}],  # not joinable
        [{"s": np.array([b"ab", b"\xff"], dtype=object)} for _ in range(3)],
    ]
    for records in cases:
        texts = encode_packed(_pack(records), len(records), max_values)
        assert len(texts) == len(records)
        for record, doc in zip(records, texts):
            expected = encode_all(record, max_values)
            assert (doc is None) == (expected is None)
            if doc is not None:
                assert _same(json.loads(doc), json.loads(json.dumps(expected, default=str).replace("NaN", "null")
                                                          .replace("Infinity", "null"))), (record, doc)
    outputs = [
        [{"probs": rng.random((1, 10)).astype(np.float32)} for _ in range(40)],
        [{"probs": rng.random((1 + i % 2, 10)).astype(np.float32)} for i in range(7)],
        [{"y": rng.random((2, 1))} for _ in range(5)],
        [{"classes": rng.integers(0, 5, (1, 3)), "labels": np.array([["a", "b", "c"]], dtype=object)} for _ in range(4)],
    ]
    for records in outputs:
        texts = predictions_packed(_pack(records), len(records), True)
        assert texts is not None
        for record, doc in zip(records, texts):
            assert json.loads(doc) == json.loads(json.dumps(prediction(record, True)))
    assert predictions_packed(_pack(outputs[0]), 40, False) is None  # no batching: record by record


def test_spilled_rows_come_back_as_the_rows_stored():
    from modelserve.monitor.writer import _row_tuple, _spill_row

    row = ("uid1", "req-1", "mlp", "1", "v2-rest", 200, None, 1.5, None, 1764400000.25,
           '{"x":[[1.0,2.5]]}', '{"y":{"summary":true,"sha256":"ab"}}', '{"kind":"class","values":[3]}')
    line = orjson_dumps(_spill_row(row))
    assert json.loads(line)["inputs"] == {"x": [[1.0, 2.5]]}  # the spill file keeps JSON, as before
    assert _row_tuple(json.loads(line)) == row
    empty = (*row[:10], None, None, None)
    assert _row_tuple(json.loads(orjson_dumps(_spill_row(empty)))) == empty


def orjson_dumps(value) -> str:
    import orjson

    return orjson.dumps(value).decode()


def test_a_writer_far_behind_bounds_the_servers_memory_and_counts_what_it_drops(repo, tmp_path):
    """The writer process stopped (SIGSTOP: as starved of CPU as it gets) under load: requests keep being
    answered without waiting; the ring holds at most --monitor-max-buffer records and the server counts the
    rest as dropped; once the writer runs again, stored rows + dropped = requests, nothing stored twice."""
    import signal

    url = sqlite_url(tmp_path)
    limit = 300
    server = Server(repo, "--monitor-db", url, "--monitor-spill", str(tmp_path / "spill.jsonl"),
                    env={"MODELSERVE_MONITOR_MAX_BUFFER": str(limit)})
    with server:
        writer = _writer_pid(server)
        os.kill(writer, signal.SIGSTOP)
        sent: list[str] = []
        try:
            with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
                for i in range(1500):
                    status, rid, _ = rest(client, "mlp", np.full((1, FEATURES), i, np.float32))
                    assert status == 200
                    sent.append(rid)
                time.sleep(0.6)  # two watchdog cycles (a block of answered requests waits at most one)
        finally:
            os.kill(writer, signal.SIGCONT)
        with httpx.Client(base_url=f"http://{server.http_url}") as client:
            status = flush(client)
    assert status["flushed"] and status["writer_restarts"] == 0
    ids = [r["request_id"] for r in stored(url)]
    dropped = status["dropped"]
    assert len(ids) == len(set(ids)) and set(ids) <= set(sent)
    # what the writer stored before it stopped, plus up to `limit` waiting in the ring
    assert dropped > 0 and limit <= len(ids) and len(ids) + dropped == len(sent), (len(ids), dropped)
    assert "new records are dropped" in server.log()


def _ring_records(consumer) -> list[tuple]:
    """Everything the ring holds, marked stored, as (request id, {name: array} of inputs and outputs, status)
    per request and ("f", row) per feedback row: runs of answered requests taken apart row by row."""
    out = []
    while (taken := consumer.take(1000)) is not None:
        for item in taken[0]:
            if item[0] == "f":
                out.append(("f", item[1]))
            elif item[0] == "r":
                group = item[1]
                rids, statuses, p_in, p_out = group[5], group[8], group[11], group[12]
                assert p_in[0] == p_out[0] == "c"
                for j, rid in enumerate(rids):
                    tensors = {}
                    for packed in (p_in[1], p_out[1]):
                        for name, (joined, rows) in packed.items():
                            start = sum(rows[:j])
                            tensors[name] = joined[start:start + rows[j]]
                    out.append((rid, tensors, statuses[j]))
            else:
                tensors = {**(item[11] or {}), **(item[12] or {})}
                # views of the ring, valid until marked stored (the writer is done with them by then)
                out.append((item[2], {n: np.array(a, copy=True) for n, a in tensors.items()}, item[7]))
        consumer.mark_stored(*taken[2:])
    return out


def test_ring_gives_back_every_record_as_written_across_wraps():
    """The shared-memory ring between the request path and the writer process: records of every shape come
    back equal through many laps of a small ring (answered requests batched per layout, the rest one by one);
    a full ring refuses requests (the caller counts them dropped) but keeps room for feedback; space is
    reused only behind what the reader marked stored."""
    from modelserve.monitor.ring import CONFIG, FEEDBACK, RingConsumer, RingProducer

    rng = np.random.default_rng(1)
    producer = RingProducer(1 << 17, max_records=10_000)
    consumer = RingConsumer(producer.fd, producer.size)
    cases = [
        ({"x": rng.random((1, 300), dtype=np.float32)}, {"y": rng.random((1, 10))}),  # a layout: batched
        ({"x": rng.random((3, 5), dtype=np.float32)}, {"y": rng.integers(0, 9, (3, 2))}),  # batched, 3 rows
        ({"x": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]}, {"y": np.array(True)}),  # strided, 0-d
        ({"s": np.array([b"ab", b"\xff", "é"], dtype=object)}, {"n": np.zeros((0, 3), np.float16)}),
        ({"x": rng.random((2, 2)).astype(">f8")}, None),  # big-endian (pickled: the values kept); failed: no outputs
        (None, None),  # rejected before it had tensors
    ]
    expected: dict = {}
    got: list = []
    for i in range(600):
        inputs, outputs = cases[i % len(cases)]
        rid = f"r{i}-" + "é" * (i % 3)
        if outputs is not None:
            assert producer.answered(1000.0 + i, rid, None if i % 3 else "c:1", i, (i % 4) or None, "m",
                                     "1", "v2-rest", inputs, outputs) == 0
        else:
            assert producer.request(1000.0 + i, rid, "m", None, "v2-rest", None, 400, f"bad {i}", i, None,
                                    inputs, None) == 0
        expected[rid] = ({**(inputs or {}), **(outputs or {})}, 200 if outputs is not None else 400)
        if i % 50 == 0:
            assert producer.blob(FEEDBACK, {"request_id": rid, "i": i}) and producer.blob(CONFIG, (i, f"cfg{i}"))
            expected[("f", i)] = None
        if i % 7 == 0:  # the reader keeps up now and then
            got += _ring_records(consumer)
    producer.flush_pending()
    got += _ring_records(consumer)
    assert producer.written()[0] > 4 * producer.size  # many laps
    seen = set()
    for record in got:
        if record[0] == "f":
            key = ("f", record[1]["i"])
            assert key in expected and key not in seen
            seen.add(key)
            continue
        rid, tensors, status = record
        assert rid not in seen
        seen.add(rid)
        want, want_status = expected[rid]
        assert status == want_status and tensors.keys() == want.keys()
        for name, array in want.items():
            assert tensors[name].dtype == array.dtype.newbyteorder("=") and np.array_equal(tensors[name], array)
    assert seen == set(expected)
    # full: requests refused, feedback still taken (its reserve), nothing overwritten that was not stored
    big = {"x": np.ones((1, 2000), np.float32)}
    refused = sum(producer.request(0.0, "r", "m", "1", "p", None, 200, None, 0, None, big, None)
                  for _ in range(100))
    assert refused > 0 and producer.blob(FEEDBACK, {"request_id": "late", "i": -1})
    records = _ring_records(consumer)
    assert records[-1] == ("f", {"request_id": "late", "i": -1}) and len(records) == 100 - refused + 1


def test_a_request_over_the_rings_record_limit_is_logged_without_its_bytes(repo, tmp_path):
    """A record larger than an eighth of the ring (--monitor-buffer-mb 1: 128 KiB) is logged with its tensors
    as shape, dtype and size, not their bytes; the requests around it are logged whole."""
    url = sqlite_url(tmp_path)
    with serve(repo, url, tmp_path / "spill.jsonl", "--monitor-buffer-mb", "1") as server, \
            httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        status, big, _ = rest(client, "mlp", np.ones((1, 60_000), np.float32))  # 240 KB, and the wrong shape
        assert status == 400
        status, small, _ = rest(client, "mlp", np.full((1, FEATURES), 2, np.float32))
        assert status == 200
        assert flush(client)["dropped"] == 0
        rows = {r["request_id"]: r for r in client.get("/v2/logs", params={"limit": 10}).json()["rows"]}
    assert rows[big]["status"] == 400 and "shape" in rows[big]["error"]
    assert rows[big]["inputs"]["x"] == {"omitted": "over the payload log's per-record limit (an eighth of "
                                                   "--monitor-buffer-mb)", "shape": [1, 60_000], "dtype": "FP32",
                                        "bytes": 240_000}
    assert rows[small]["inputs"]["x"] == [[2.0] * FEATURES] and rows[small]["prediction"] is not None
