"""The audit log of management actions (issue 7, item 7): real ``modelserve serve`` processes, keys made with
``KeyStore``, the log read back with the real ``modelserve audit --json`` CLI.

- explicit model control, ``--auth keys``: an operator loads and unloads over REST and gRPC -> ``model.load`` /
  ``model.unload`` rows naming the key, the model and the client address; a failed load is recorded with
  ``ok: false``; a reader's refused load (403) is not recorded at all;
- a registry-following server, ``--auth keys``: an alias moved through the API -> an ``alias.set`` row, and the
  registry history names the key, not the server's user;
- authentication off: the actor is ``anonymous`` (and the registry history keeps the registry's own actor);
- the database down: the action still succeeds, the row is written once the database is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, scale_model
from tritonclient.utils import InferenceServerException

from modelserve.security import KeyStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NO_LOG = {"MODELSERVE_PAYLOAD_LOG": "false"}


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def audit_cli(url: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "modelserve", "audit", "--json", "--registry", url, *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_load_and_unload_over_rest_and_grpc_are_audited(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo / "mlp" / "1" / "model.onnx", 2.0)
    url = f"sqlite:///{tmp_path}/registry.db"
    with KeyStore.open(url, client="test") as store:
        ops, _ = store.create("ops-bot", "operator", None, created_by="test")
        reader, _ = store.create("reader", "reader", None, created_by="test")
        ops_id = store.get("ops-bot").key_id
    with Server(repo, "--model-control-mode", "explicit", "--auth", "keys", "--keys-db", url, env=NO_LOG) as srv, \
            httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
        assert c.post("/v2/repository/models/mlp/load", headers=bearer(reader)).status_code == 403
        r = c.post("/v2/repository/models/mlp/load", headers=bearer(ops))
        assert r.status_code == 200, r.text
        assert c.post("/v2/repository/models/mlp/unload", headers=bearer(ops)).status_code == 200
        assert c.post("/v2/repository/models/ghost/load", headers=bearer(ops)).status_code == 404
        with grpcclient.InferenceServerClient(srv.grpc_url) as g:
            headers = {"authorization": f"Bearer {ops}"}
            g.load_model("mlp", headers=headers)
            assert g.is_model_ready("mlp", headers=headers)
            g.unload_model("mlp", headers=headers)
            with pytest.raises(InferenceServerException):
                g.load_model("mlp", headers={"authorization": f"Bearer {reader}"})
    assert "Traceback" not in srv.log(), srv.log()

    rows = [e for e in audit_cli(url) if e["action"].startswith("model.")]
    assert [(e["action"], e["target"], e["detail"]["ok"]) for e in rows] == [
        ("model.load", "mlp", True), ("model.unload", "mlp", True), ("model.load", "ghost", False),
        ("model.load", "mlp", True), ("model.unload", "mlp", True)]
    for e in rows:
        assert e["actor"] == "ops-bot"
        assert e["client"].startswith("127.0.0.1:"), e
        assert e["detail"]["role"] == "operator" and e["detail"]["key_id"] == ops_id
        for secret in (ops, reader):
            assert secret not in json.dumps(e) and secret[12:] not in json.dumps(e)
    assert "ghost" in rows[2]["detail"]["error"]
    # the CLI's filters work on these rows too
    assert len(audit_cli(url, "--actor", "ops-bot", "--action", "model.unload")) == 2
    # the keys' own rows are still there, first
    assert [e["action"] for e in audit_cli(url)][:2] == ["key.create", "key.create"]


def _registry(tmp_path: Path) -> str:
    from modelserve.registry import Registry

    url = f"sqlite:///{tmp_path}/registry.db"
    registry = Registry(url, tmp_path / "artifacts", actor="setup")
    for factor in (1.0, 2.0):
        registry.register(scale_model(tmp_path / f"s{factor}.onnx", factor), "alpha")
    registry.set_alias("alpha", "production", 1)
    registry.close()
    return url


def _history(url: str, tmp_path: Path) -> list:
    from modelserve.registry import Registry

    registry = Registry(url, tmp_path / "artifacts", upgrade=False)
    try:
        return registry.history("alpha")
    finally:
        registry.close()


def test_alias_moves_name_the_key_in_the_audit_log_and_the_registry_history(tmp_path):
    url = _registry(tmp_path)
    with KeyStore.open(url) as store:
        ops, _ = store.create("release-bot", "operator", "alpha", created_by="t")
        reader, _ = store.create("viewer", "reader", None, created_by="t")
    with Server(tmp_path / "none", "--registry", url, "--registry-cache", str(tmp_path / "cache"),
                "--auth", "keys", env=NO_LOG) as srv, httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
        move = "/v2/registry/models/alpha/aliases/production"
        assert c.put(move, json={"version": 2}, headers=bearer(reader)).status_code == 403  # not recorded
        r = c.put(move, json={"version": 2, "reason": "better"}, headers=bearer(ops))
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        r = c.post("/v2/registry/models/alpha/rollback", json={"reason": "oops"}, headers=bearer(ops))
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert "Traceback" not in srv.log(), srv.log()

    rows = [e for e in audit_cli(url) if e["action"].startswith("alias.")]
    assert [(e["action"], e["actor"], e["target"], e["detail"]["alias"], e["detail"]["from"], e["detail"]["to"],
             e["detail"]["ok"], e["detail"]["reason"]) for e in rows] == [
        ("alias.set", "release-bot", "alpha", "production", 1, 2, True, "better"),
        ("alias.rollback", "release-bot", "alpha", "production", 2, 1, True, "oops")]
    assert all(e["client"].startswith("127.0.0.1:") for e in rows)
    history = _history(url, tmp_path)  # newest first
    assert [(h.action, h.actor) for h in history[:2]] == [("rollback", "release-bot"), ("alias_set", "release-bot")]
    assert {h.actor for h in history[2:]} == {"setup"}  # the earlier changes keep their own actor


def test_with_authentication_off_the_actor_is_anonymous(tmp_path):
    url = _registry(tmp_path)
    env = {**NO_LOG, "MODELSERVE_REGISTRY_ACTOR": "the-server"}
    with Server(tmp_path / "none", "--registry", url, "--registry-cache", str(tmp_path / "cache"),
                env=env) as srv, httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
        r = c.put("/v2/registry/models/alpha/aliases/staging", json={"version": 2})
        assert r.status_code == 200, r.text
        assert c.put("/v2/registry/models/alpha/aliases/staging", json={"version": 9}).status_code == 404
    rows = [e for e in audit_cli(url) if e["action"].startswith("alias.")]
    assert [(e["action"], e["actor"], e["detail"]["ok"], e["detail"]["source"]) for e in rows] == [
        ("alias.set", "anonymous", True, "anonymous"), ("alias.set", "anonymous", False, "anonymous")]
    assert rows[0]["detail"]["from"] is None and rows[0]["detail"]["to"] == 2
    assert "key_id" not in rows[0]["detail"]
    # no caller to name: the history keeps the registry's own actor
    assert _history(url, tmp_path)[0].actor == "the-server"


def test_the_action_goes_on_while_the_database_is_down(tmp_path, caplog):
    from modelserve.security.audit import AuditLog
    from modelserve.security.principal import Principal

    blocker = tmp_path / "db"
    blocker.write_text("a file where the database's folder should be")
    url = f"sqlite:///{blocker}/registry.db"
    audit = AuditLog(url)
    ops = Principal("ops", "operator", ("*",), "key", "abcd1234")

    async def act(target: str) -> None:
        async with audit.action(ops, "model.load", target, client="127.0.0.1:1") as detail:
            detail["extra"] = 1

    with caplog.at_level(logging.WARNING, logger="modelserve.security.audit"):
        asyncio.run(act("first"))
        asyncio.run(act("second"))
    assert audit.failing and len(audit._pending) == 2
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1  # once per outage
    blocker.unlink()
    asyncio.run(act("third"))
    assert not audit.failing and audit.written == 3
    audit.close()
    with KeyStore.open(url) as store:
        rows = store.audit()
    assert [(e.actor, e.target, e.detail["ok"], e.detail["extra"]) for e in rows] == [
        ("ops", "first", True, 1), ("ops", "second", True, 1), ("ops", "third", True, 1)]
    assert rows[0].at < rows[2].at  # each row keeps the time of its action
    assert os.path.exists(f"{tmp_path}/db/registry.db")
