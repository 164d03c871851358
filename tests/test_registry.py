"""The registry's Python API on a real SQLite file and a real PostgreSQL server; artifacts on a local
folder and on an S3-compatible server (moto); Alembic migrations; concurrent writers in two processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import scale_model
from modelserve.errors import Conflict, InvalidInput, ModelNotFound
from modelserve.registry import DigestMismatch, ProtectedAlias, Registry
from modelserve.registry.db import current_revision, head_revision, make_engine, migrate


@pytest.fixture
def registry(db_url, tmp_path):
    reg = Registry(db_url, tmp_path / "artifacts", actor="tester")
    yield reg
    reg.close()


@pytest.fixture
def models(tmp_path) -> dict[int, Path]:
    """Three ONNX files that answer differently (x*1, x*2, x*3)."""
    return {k: scale_model(tmp_path / f"m{k}.onnx", float(k)) for k in (1, 2, 3)}


def stored_files(root: Path) -> list[Path]:
    return [p for p in (root / "sha256").rglob("*") if p.is_file()]


def test_register_records_digest_signature_and_dedupes(registry, models, tmp_path):
    v1 = registry.register(models[1], "scaler", description="first", tags={"team": "vision"})
    again = registry.register(models[1], "scaler")
    assert (v1.version, again.version) == (1, 2)
    assert v1.digest == hashlib.sha256(models[1].read_bytes()).hexdigest() == again.digest
    assert v1.size == models[1].stat().st_size
    assert v1.format == "onnx" and v1.tags == {"team": "vision"} and v1.created_by == "tester"
    assert v1.signature["inputs"][0]["datatype"] == "FP32" and v1.signature["inputs"][0]["shape"] == [-1, 4]
    assert len(stored_files(tmp_path / "artifacts")) == 1  # same bytes stored once
    registry.register(models[2], "scaler")
    assert len(stored_files(tmp_path / "artifacts")) == 2
    [summary] = registry.list_models()
    assert (summary.name, summary.versions, summary.latest_version) == ("scaler", 3, 3)


def test_lineage_and_optimize_report_metrics(registry, models):
    registry.register(models[1], "net")
    report = models[2].with_name(models[2].stem + ".report.json")
    report.write_text(json.dumps({"result": {"size_bytes": 123, "top1": 0.97, "latency_ms": {"1": {"p50": 0.2}}},
                                  "summary": {"size_ratio": 3.9}, "steps": [{"step": "quantize", "mode": "int8"}]}))
    v2 = registry.register(models[2], "net", from_version=1, step="quantize")
    v3 = registry.register(models[3], "net", from_version="2", step="prune", step_params={"amount": 0.5})
    assert (v2.parent, v2.step, v3.parent, v3.step_params) == ("1", "quantize", "2", {"amount": 0.5})
    assert v2.metrics == {"size_bytes": 123, "top1": 0.97, "p50_ms_b1": 0.2, "size_ratio": 3.9}
    assert v2.step_params == {"steps": [{"step": "quantize", "mode": "int8"}]}
    assert [v.version for v in registry.lineage("net", 3)] == [3, 2, 1]
    assert registry.children("net") == {1: ["net:2"], 2: ["net:3"], 3: []}
    other = registry.register(models[1], "net-small", from_version="net:3", step="distill")
    assert other.parent == "net:3"
    with pytest.raises(InvalidInput, match="needs the version it started from"):
        registry.register(models[1], "net", step="quantize")
    with pytest.raises(InvalidInput, match="not one of"):
        registry.register(models[1], "net", from_version=1, step="magic")
    with pytest.raises(ModelNotFound, match="no version 9"):
        registry.register(models[1], "net", from_version=9, step="prune")


def test_alias_promote_rollback_and_history(registry, models):
    for k in (1, 2, 3):
        registry.register(models[k], "m")
    registry.set_alias("m", "production", 1)
    registry.set_alias("m", "staging", 2)
    assert registry.promote("m").version == 2
    registry.set_alias("m", "production", 3, reason="hotfix")
    assert registry.rollback("m", "production").version == 2  # one step back
    assert registry.rollback("m", "production").version == 1  # and another
    with pytest.raises(Conflict, match="no earlier version"):
        registry.rollback("m", "production")
    moves = [(h.action, h.from_version, h.to_version) for h in reversed(registry.history("m", alias="production"))]
    assert moves == [("alias_set", None, 1), ("promote", 1, 2), ("alias_set", 2, 3), ("rollback", 3, 2),
                     ("rollback", 2, 1)]
    assert [h.reason for h in registry.history("m", alias="production")][2] == "hotfix"
    assert registry.alias("m", "production").version == 1
    assert all(h.actor == "tester" for h in registry.history("m"))
    detail = registry.show("m")
    assert {a.alias: a.version for a in detail.aliases} == {"production": 1, "staging": 2}
    assert [v.aliases for v in detail.versions] == [["production"], ["staging"], []]
    assert registry.version("m", "staging").version == 2  # a version by alias


def test_delete_refused_while_aliased(registry, models, tmp_path):
    registry.register(models[1], "m")
    registry.register(models[2], "m")
    registry.set_alias("m", "production", 1, canary=2, weight=0.1)
    with pytest.raises(Conflict, match="version 1 of 'm' is in use by alias production"):
        registry.delete_version("m", 1)
    with pytest.raises(Conflict, match="in use by alias production"):  # the canary counts too
        registry.delete_version("m", 2)
    registry.set_alias("m", "production", 1)
    registry.delete_version("m", 2, reason="bad accuracy")
    assert [v.version for v in registry.show("m").versions] == [1]
    assert len(stored_files(tmp_path / "artifacts")) == 1  # its artifact went with it
    assert registry.history("m")[0].action == "delete_version"
    assert registry.register(models[3], "m").version == 3  # numbers are never reused
    with pytest.raises(ModelNotFound, match="has no version 2"):
        registry.version("m", 2)


def test_protected_alias_needs_force_and_reason(registry, models):
    registry.register(models[1], "m")
    registry.register(models[2], "m")
    registry.set_alias("m", "production", 1, protect=True)
    for kwargs in ({}, {"force": True}, {"reason": "why not"}):
        with pytest.raises(ProtectedAlias, match="protected"):
            registry.set_alias("m", "production", 2, **kwargs)
    with pytest.raises(ProtectedAlias):
        registry.delete_alias("m", "production")
    assert registry.alias("m", "production").version == 1
    moved = registry.set_alias("m", "production", 2, force=True, reason="incident 42")
    assert moved.version == 2 and moved.protected
    with pytest.raises(ProtectedAlias):
        registry.rollback("m", "production")
    assert registry.rollback("m", "production", force=True, reason="revert").version == 1


def test_canary_split_and_serving_targets(registry, models):
    registry.register(models[1], "m")
    registry.register(models[2], "m")
    registry.set_alias("m", "production", 1, canary=2, weight=0.1, sticky_header="X-User")
    [target] = registry.serving_targets("production").values()
    assert (target.primary.version, target.canary.version, target.canary_weight, target.sticky_header) == \
        (1, 2, 0.1, "x-user")
    assert registry.serving_targets("staging") == {}
    before = registry.last_change()
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        registry.set_alias("m", "production", 1, canary=2, weight=1.5)
    with pytest.raises(InvalidInput, match="is the alias's version"):
        registry.set_alias("m", "production", 1, canary=1, weight=0.5)
    assert registry.last_change() == before  # refused changes record nothing
    registry.set_alias("m", "production", 2)  # full promotion of the canary clears the split
    assert registry.alias("m", "production").canary_version is None
    assert registry.last_change() > before


def test_bad_inputs_get_clear_errors(registry, models, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(InvalidInput, match="corrupt.onnx is not a readable ONNX model"):
        registry.register(corrupt, "m")
    assert registry.list_models() == [] and not (tmp_path / "artifacts" / "sha256").exists()
    with pytest.raises(InvalidInput, match="is not a file"):
        registry.register(tmp_path / "missing.onnx", "m")
    with pytest.raises(InvalidInput, match="format"):
        registry.register(models[1].rename(tmp_path / "model.bin"), "m")
    with pytest.raises(InvalidInput, match="not allowed"):
        registry.register(models[2], "../evil")
    registry.register(models[2], "m")
    with pytest.raises(InvalidInput, match="is a number"):
        registry.set_alias("m", "7", 1)
    with pytest.raises(ModelNotFound, match="no registered model 'nope'"):
        registry.set_alias("nope", "production", 1)
    with pytest.raises(ModelNotFound, match="no alias 'staging'"):
        registry.promote("m")


def test_tampered_artifact_is_refused(registry, models, tmp_path):
    v = registry.register(models[1], "m")
    [stored] = stored_files(tmp_path / "artifacts")
    registry.fetch(v.artifact_uri, v.digest, tmp_path / "ok" / "model.onnx")
    stored.write_bytes(stored.read_bytes()[:-3] + b"xyz")
    with pytest.raises(DigestMismatch, match="refused"):
        registry.fetch(v.artifact_uri, v.digest, tmp_path / "bad" / "model.onnx")
    assert not any((tmp_path / "bad").iterdir())  # nothing half-written is left behind
    with pytest.raises(DigestMismatch):
        registry.export("m", tmp_path / "repo")


def test_export_writes_a_servable_repository(registry, models, tmp_path):
    registry.register(models[1], "m", config={"max_batch_size": 8})
    registry.register(models[2], "m")
    registry.set_alias("m", "production", 2)
    out = registry.export("m", tmp_path / "repo", "production")
    assert (out / "2" / "model.onnx").read_bytes() == models[2].read_bytes()
    assert not (out / "1").exists()
    out = registry.export("m", tmp_path / "all")
    assert sorted(p.name for p in out.iterdir()) == ["1", "2", "config.yaml"]


def test_postgres_and_s3_by_settings_alone(postgres_url, s3_bucket, models, tmp_path, monkeypatch):
    """Production storage is chosen by environment variables only."""
    import fsspec

    bucket, options = s3_bucket
    monkeypatch.setenv("MODELSERVE_REGISTRY_URL", postgres_url)
    monkeypatch.setenv("MODELSERVE_REGISTRY_ARTIFACTS", f"{bucket}/models")
    monkeypatch.setenv("MODELSERVE_REGISTRY_STORAGE_OPTIONS", json.dumps(options))
    reg = Registry.from_settings()
    try:
        v1 = reg.register(models[1], "m")
        reg.register(models[1], "m")
        v3 = reg.register(models[3], "m", from_version=1, step="quantize")
        assert v1.artifact_uri.startswith(f"{bucket}/models/sha256/")
        fs = fsspec.filesystem("s3", **options)
        assert len(fs.find(f"{bucket}/models")) == 2  # deduplicated in the bucket too
        reg.set_alias("m", "production", 3)
        out = reg.export("m", tmp_path / "repo", "production")
        assert (out / "3" / "model.onnx").read_bytes() == models[3].read_bytes()
        fs.pipe(v3.artifact_uri, b"tampered")
        with pytest.raises(DigestMismatch):
            reg.fetch(v3.artifact_uri, v3.digest, tmp_path / "x" / "model.onnx")
        with make_engine(postgres_url).connect() as c:  # it really is in PostgreSQL
            assert c.execute(text("select count(*) from model_versions")).scalar() == 3
    finally:
        reg.close()


def test_migrations_from_empty_and_from_first_revision(db_url):
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    migrate(engine, "0001")
    assert current_revision(engine) == "0001"
    now = "2026-01-01 00:00:00"
    with engine.begin() as c:  # data written by the first schema, before canaries existed
        c.execute(text("insert into registered_models (id, name, description, created_by, created_at) "
                       "values (1, 'old', '', 'x', :t)"), {"t": now})
        c.execute(text("insert into model_versions (id, model_id, number, format, artifact_uri, filename, digest, "
                       "size, signature, metrics, tags, description, created_by, created_at, step_params) values "
                       "(1, 1, 1, 'onnx', 'file:///a', 'model.onnx', :d, 10, '{}', '{}', '{}', '', 'x', :t, '{}')"),
                  {"d": "0" * 64, "t": now})
        c.execute(text("insert into aliases (model_id, name, version_id, protected, updated_at) "
                       "values (1, 'production', 1, false, :t)"), {"t": now})
    engine.dispose()
    reg = Registry(db_url, "unused-artifacts")  # opening upgrades to head
    try:
        assert current_revision(reg.engine) == head_revision() == "0004"
        alias = reg.alias("old", "production")
        assert (alias.version, alias.canary_version, alias.canary_weight) == (1, None, 0.0)
        migrate(reg.engine)  # idempotent
        assert current_revision(reg.engine) == "0004"
    finally:
        reg.close()


WRITER = textwrap.dedent("""
    import sys
    from modelserve.registry import Registry
    url, artifacts, model_file, who = sys.argv[1:5]
    reg = Registry(url, artifacts, actor=who)
    for i in range(15):
        reg.register(model_file, "shared")
        # a swings the alias between 2 and 1, b sends it to 3: in any interleaving each writer's
        # first call is a real move (a no-op move is not recorded, so targets must not coincide)
        reg.set_alias("m", "production", 3 if who == "b" else 2 - i % 2, reason=f"{who}{i}")
    reg.close()
""")


def test_concurrent_writers_in_two_processes_stay_consistent(registry, db_url, models, tmp_path):
    for k in (1, 2, 3):
        registry.register(models[k], "m")
    registry.set_alias("m", "production", 1)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(tmp_path / "artifacts"),
                               str(models[2]), who], stderr=subprocess.PIPE, text=True) for who in "ab"]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    # version numbers were handed out once each, without gaps
    assert [v.version for v in registry.show("shared").versions] == list(range(1, 31))
    # every recorded move starts where the previous one ended, and the last one is the alias now
    moves = list(reversed(registry.history("m", alias="production")))
    assert len(moves) >= 2
    for before, after in zip(moves, moves[1:]):
        assert after.from_version == before.to_version
    assert registry.alias("m", "production").version == moves[-1].to_version
    assert {m.actor for m in moves[1:]} == {"a", "b"}
