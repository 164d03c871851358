"""Serving from the registry: ``modelserve serve --registry URL --alias production`` in a real process.

The test process plays "another machine sharing the database": it registers versions and moves aliases
with the Python API while the server (and its clients, httpx and tritonclient) watch. Every model file is
``y = x * factor`` with a factor of its own, so each answer says which version really computed it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import Server, scale_model
from modelserve.registry import Registry

X = [1.0, 2.0, 3.0, 4.0]  # y[0] is the factor of the version that answered
LIMIT = 1 << 20  # --max-request-bytes of the shared server: small, to see uploads refused past it


def model_file(folder: Path, factor: float) -> Path:
    """A distinct file per factor (content-addressed store: equal bytes would share one artifact)."""
    return scale_model(folder / f"scale-{factor:g}.onnx", factor)


def serve(url: str, folder: Path, *args: str) -> Server:
    return Server(folder / "no-repository", "--registry", url, "--alias", "production", "--registry-poll", "0.3",
                  "--registry-cache", str(folder / "cache"), *args)


def infer(client: httpx.Client, model: str, headers: dict | None = None, version: int | None = None) -> tuple[int, float]:
    """(model_version, factor) of one V2 REST inference."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    r = client.post(path, json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]},
                    headers=headers)
    assert r.status_code == 200, r.text
    doc = r.json()
    return int(doc["model_version"]), doc["outputs"][0]["data"][0]


def infer_grpc(client: grpcclient.InferenceServerClient, model: str, headers: dict | None = None) -> tuple[int, float]:
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([X], dtype=np.float32))
    result = client.infer(model, [x], headers=headers)
    return int(result.get_response().model_version), float(result.as_numpy("y")[0, 0])


def wait_for(check, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (AssertionError, httpx.HTTPError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def serving(client: httpx.Client, model: str) -> dict:
    return client.get("/v2/registry/serving").json()["models"].get(model) or {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One SQLite registry and one server following its 'production' alias, shared by this module's tests
    (each test uses models of its own). ``alpha`` is registered and aliased before the server starts."""
    root = tmp_path_factory.mktemp("registry-serving")
    url = f"sqlite:///{root}/registry.db"
    registry = Registry(url, root / "artifacts", actor="other-machine")
    for factor in (1.0, 2.0):
        registry.register(model_file(root, factor), "alpha")
    registry.set_alias("alpha", "production", 1)
    srv = serve(url, root, "--max-request-bytes", str(LIMIT))
    client = httpx.Client(base_url=f"http://{srv.http_url}", timeout=30)
    yield SimpleNamespace(registry=registry, srv=srv, client=client, root=root, url=url)
    client.close()
    srv.stop()
    registry.close()
    assert "Traceback" not in srv.log(), srv.log()


def test_serves_the_aliased_version_from_the_start(world):
    c = world.client
    assert infer(c, "alpha") == (1, 1.0)  # no waiting: the ready line comes after the first sync
    with grpcclient.InferenceServerClient(world.srv.grpc_url) as g:
        assert infer_grpc(g, "alpha") == (1, 1.0)
    index = c.post("/v2/repository/index", json={}).json()
    assert index == [{"name": "alpha", "version": "1", "state": "READY"}]
    assert c.get("/v2/models/alpha").json()["versions"] == ["1"]
    # the load/unload API belongs to folder repositories: here the alias decides
    r = c.post("/v2/repository/models/alpha/unload", json={})
    assert r.status_code == 501 and "alias" in r.json()["error"]


def test_alias_moves_swap_with_zero_failed_requests(world):
    reg, c = world.registry, world.client
    assert infer(c, "alpha")[0] == 1
    stop, errors = threading.Event(), []
    records: list[list[tuple[int, float]]] = [[] for _ in range(4)]

    def load(i: int) -> None:
        http = httpx.Client(base_url=f"http://{world.srv.http_url}", timeout=30) if i % 2 else None
        grpc = None if http else grpcclient.InferenceServerClient(world.srv.grpc_url)
        while not stop.is_set():
            try:
                records[i].append(infer(http, "alpha") if http else infer_grpc(grpc, "alpha"))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(repr(exc))
        (http or grpc).close()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(records), what="every client to get answers")
        started = time.monotonic()
        reg.set_alias("alpha", "production", 2, reason="new weights")
        wait_for(lambda: all(r[-1][0] == 2 for r in records), what="every client to get version 2")
        swap_s = time.monotonic() - started
        reg.rollback("alpha", "production", reason="back")
        wait_for(lambda: all(r[-1][0] == 1 for r in records), what="every client to get version 1 again")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert swap_s < 10, swap_s
    for answers in records:
        assert all(factor == version for version, factor in answers)  # model_version is who answered
        served = [v for k, (v, _) in enumerate(answers) if k == 0 or answers[k - 1][0] != v]
        assert served == [1, 2, 1], served  # each client saw the history's order, no flapping
    moves = [(h.action, h.from_version, h.to_version) for h in reg.history("alpha", "production", limit=2)]
    assert moves == [("rollback", 2, 1), ("alias_set", 1, 2)]


def test_tampered_artifact_is_refused_and_the_old_version_keeps_serving(world):
    reg, c = world.registry, world.client
    reg.register(model_file(world.root, 3.0), "gamma")
    v2 = reg.register(model_file(world.root, 4.0), "gamma")
    reg.set_alias("gamma", "production", 1)
    wait_for(lambda: infer(c, "gamma") == (1, 3.0), what="gamma v1")
    # someone replaces the stored bytes of v2 with another (valid!) model
    stored = Path(v2.artifact_uri.removeprefix("file://"))
    stored.write_bytes(model_file(world.root / "evil", 5.0).read_bytes())
    reg.set_alias("gamma", "production", 2)

    def refused_row():
        rows = c.post("/v2/repository/index", json={}).json()
        return next((r for r in rows if r["name"] == "gamma" and r.get("version") == "2"), None)

    row = wait_for(refused_row, what="v2 refused in the index")
    assert row["state"] == "UNAVAILABLE" and "sha256" in row["reason"] and "refused" in row["reason"]
    assert infer(c, "gamma") == (1, 3.0)
    assert c.get("/v2/models/gamma/ready").status_code == 200
    assert "2" in serving(c, "gamma")["refused"]
    with grpcclient.InferenceServerClient(world.srv.grpc_url) as g:
        grpc_rows = g.get_model_repository_index(as_json=True)["models"]
        assert any(r["name"] == "gamma" and r.get("version") == "2" and "sha256" in r.get("reason", "")
                   for r in grpc_rows)
    assert "version 2 refused" in world.srv.log()
    # moving the alias back clears the refusal; the files on disk never reached a runtime
    reg.set_alias("gamma", "production", 1)
    wait_for(lambda: refused_row() is None, what="the refusal to clear")
    assert infer(c, "gamma") == (1, 3.0)


def test_canary_split_by_weight_and_sticky_by_header(world):
    reg, c = world.registry, world.client
    reg.register(model_file(world.root, 6.0), "delta")
    reg.register(model_file(world.root, 7.0), "delta")
    reg.set_alias("delta", "production", 1, canary=2, weight=0.25)
    wait_for(lambda: serving(c, "delta").get("canary") == 2, what="the canary split")
    factors = {1: 6.0, 2: 7.0}
    answers = [infer(c, "delta") for _ in range(400)]
    assert all(factors[v] == f for v, f in answers)
    share = sum(v == 2 for v, _ in answers) / len(answers)
    assert 0.15 <= share <= 0.35, share  # 0.25 ± 4.6 standard deviations
    assert infer(c, "delta", version=2) == (2, 7.0)  # a named version bypasses the split

    # same versions, new split: applied without a reload
    reg.set_alias("delta", "production", 1, canary=2, weight=0.25, sticky_header="X-User")
    wait_for(lambda: serving(c, "delta").get("sticky_header") == "x-user", what="the sticky split")
    chosen = {}
    for user in (f"user-{i}" for i in range(40)):
        seen = {infer(c, "delta", headers={"X-User": user})[0] for _ in range(4)}
        assert len(seen) == 1, (user, seen)
        chosen[user] = seen.pop()
    assert set(chosen.values()) == {1, 2}
    with grpcclient.InferenceServerClient(world.srv.grpc_url) as g:  # gRPC metadata, the same hash
        for user in list(chosen)[:8]:
            assert infer_grpc(g, "delta", headers={"x-user": user})[0] == chosen[user]
    assert "loaded: v1 READY, v2 READY" in world.srv.log()


def test_management_api(world):
    c = world.client
    base = "/v2/registry/models/eps"
    first, second = model_file(world.root, 8.0).read_bytes(), model_file(world.root, 9.0).read_bytes()
    octet = {"Content-Type": "application/octet-stream"}

    r = c.post(f"{base}/versions", content=first, headers=octet, params={"filename": "model.onnx"})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["digest"] == hashlib.sha256(first).hexdigest()
    r = c.post(f"{base}/versions", content=second, headers=octet,
               params={"from_version": "1", "step": "quantize", "description": "smaller"})
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["parent"], r.json()["step"]) == (2, "1", "quantize")
    assert [v["version"] for v in c.get(f"{base}/versions/2/lineage").json()] == [2, 1]
    assert c.get(f"{base}/versions/2").json()["description"] == "smaller"
    assert "eps" in [m["name"] for m in c.get("/v2/registry/models").json()]

    assert c.put(f"{base}/aliases/staging", json={"version": 2}).status_code == 200
    r = c.put(f"{base}/aliases/production", json={"version": 1, "protect": True})
    assert r.status_code == 200 and r.json()["protected"] is True
    wait_for(lambda: infer(c, "eps") == (1, 8.0), timeout=5, what="eps v1 (the API pokes the follower)")
    assert c.get(f"{base}/versions/production").json()["version"] == 1

    assert c.post(f"{base}/promote", json={}).status_code == 409  # protected, no force
    r = c.post(f"{base}/promote", json={"force": True, "reason": "staging looked good"})
    assert r.status_code == 200 and r.json()["version"] == 2
    wait_for(lambda: infer(c, "eps") == (2, 9.0), timeout=5, what="eps v2")
    assert c.post(f"{base}/rollback").status_code == 409
    r = c.post(f"{base}/rollback", json={"force": True, "reason": "latency"})
    assert r.status_code == 200 and r.json()["version"] == 1
    wait_for(lambda: infer(c, "eps") == (1, 8.0), timeout=5, what="eps back on v1")

    history = c.get(f"{base}/history").json()
    assert [h["action"] for h in history] == ["rollback", "promote", "alias_set", "alias_set", "register", "register"]
    assert history[0]["reason"] == "latency"
    assert [h["action"] for h in c.get(f"{base}/history", params={"alias": "production"}).json()] == \
        ["rollback", "promote", "alias_set"]
    detail = c.get(base).json()
    assert {a["alias"]: a["version"] for a in detail["aliases"]} == {"production": 1, "staging": 2}

    r = c.delete(f"{base}/versions/1")
    assert r.status_code == 409 and "production" in r.json()["error"]
    assert c.delete(f"{base}/aliases/production").status_code == 409  # protected
    assert c.delete(f"{base}/aliases/staging").status_code == 204
    assert c.delete(f"{base}/versions/2", params={"reason": "unused"}).status_code == 204
    assert c.get(f"{base}/versions/2").status_code == 404

    assert c.get("/v2/registry/models/nope").status_code == 404
    assert c.get("/v2/registry/models/nope/history").status_code == 404
    assert c.put(f"{base}/aliases/staging", json={"version": 7}).status_code == 404
    assert c.put(f"{base}/aliases/staging", json={"version": 1, "weight": 0.5}).status_code == 400
    assert c.post(f"{base}/versions", content=b"not a model", headers=octet).status_code == 400
    assert c.post(f"{base}/versions", content=b"x" * (LIMIT + 1), headers=octet).status_code == 413
    assert c.post(f"{base}/versions", content=first, headers=octet,
                  params={"filename": "../model.onnx"}).status_code == 400

    schema = c.get("/openapi.json").json()
    for path in ("/v2/registry/models", "/v2/registry/models/{name}", "/v2/registry/models/{name}/versions",
                 "/v2/registry/models/{name}/versions/{version}", "/v2/registry/models/{name}/versions/{version}/lineage",
                 "/v2/registry/models/{name}/aliases/{alias}", "/v2/registry/models/{name}/promote",
                 "/v2/registry/models/{name}/rollback", "/v2/registry/models/{name}/history"):
        assert path in schema["paths"], path
    assert {"VersionInfo", "AliasInfo", "HistoryInfo", "ModelDetail", "ModelSummary", "AliasRequest"} <= \
        set(schema["components"]["schemas"])
    upload = schema["paths"]["/v2/registry/models/{name}/versions"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert set(schema["paths"]["/v2/registry/models/{name}/aliases/{alias}"]) == {"get", "put", "delete"}


def test_two_servers_follow_one_postgres_registry(postgres_url, tmp_path):
    registry = Registry(postgres_url, tmp_path / "artifacts", actor="other-machine")
    for factor in (10.0, 11.0):
        registry.register(model_file(tmp_path, factor), "pg")
    registry.set_alias("pg", "production", 1)
    artifacts = ("--artifacts", str(tmp_path / "artifacts"))
    with serve(postgres_url, tmp_path / "a", *artifacts) as a, serve(postgres_url, tmp_path / "b", *artifacts) as b:
        clients = [httpx.Client(base_url=f"http://{s.http_url}", timeout=30) for s in (a, b)]
        assert [infer(cl, "pg") for cl in clients] == [(1, 10.0), (1, 10.0)]
        stop, errors, seen = threading.Event(), [], set()

        def load() -> None:
            with httpx.Client(base_url=f"http://{a.http_url}", timeout=30) as http:
                while not stop.is_set():
                    try:
                        seen.add(infer(http, "pg"))
                    except Exception as exc:  # noqa: BLE001
                        errors.append(repr(exc))

        thread = threading.Thread(target=load)
        thread.start()
        try:
            wait_for(lambda: seen, what="the first answers under load")
            registry.set_alias("pg", "production", 2)
            for cl in clients:
                wait_for(lambda cl=cl: infer(cl, "pg") == (2, 11.0), what="both servers on v2")
        finally:
            stop.set()
            thread.join(30)
            for cl in clients:
                cl.close()
        assert not errors, errors[:5]
        assert seen == {(1, 10.0), (2, 11.0)}
    registry.close()
    assert "Traceback" not in a.log() + b.log()


class _Flaky:
    """A registry whose database can be switched off (the calls the follower makes fail like a dropped link)."""

    def __init__(self, registry: Registry):
        self.real, self.down = registry, False

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name in ("last_change", "serving_targets") and callable(attr):
            def guarded(*args, **kwargs):
                if self.down:
                    raise ConnectionError("connection refused")
                return attr(*args, **kwargs)
            return guarded
        return attr


def test_follower_rides_out_an_unreachable_database_and_refetches_a_bad_cache(tmp_path, caplog):
    from modelserve.server.models import ModelManager
    from modelserve.server.registry_follower import RegistryFollower

    registry = Registry(f"sqlite:///{tmp_path}/registry.db", tmp_path / "artifacts", actor="t")
    for factor in (12.0, 13.0):
        registry.register(model_file(tmp_path, factor), "m")
    registry.set_alias("m", "production", 1)
    cache = tmp_path / "cache"
    (cache / "m" / "1").mkdir(parents=True)
    (cache / "m" / "1" / "model.onnx").write_bytes(b"a stale or damaged copy")
    flaky = _Flaky(registry)

    async def scenario() -> None:
        manager = ModelManager(cache, "registry", warmup=True)
        await manager.start()
        follower = RegistryFollower(flaky, manager, "production", cache, poll_s=60)
        await follower.start()
        try:
            assert manager.get("m").version == 1  # the damaged cached copy was fetched again
            flaky.down = True
            registry.set_alias("m", "production", 2)  # made while this server cannot see the database
            for _ in range(3):
                await follower.sync()
            assert manager.get("m").version == 1 and follower.status()["registry_error"]
            flaky.down = False
            await follower.sync()
            assert manager.get("m").version == 2 and follower.status()["registry_error"] is None
        finally:
            await follower.close()
            await manager.close()

    with caplog.at_level(logging.INFO, logger="modelserve.server.registry_follower"):
        asyncio.run(scenario())
    registry.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("registry unreachable" in m for m in messages) == 1, messages  # logged once, not every poll
    assert any("reachable again" in m for m in messages)
    assert any("does not match its digest" in m for m in messages)
