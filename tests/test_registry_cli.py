"""``modelserve models …`` driven as a user would: CliRunner in-process, and once as a real subprocess,
on a SQLite registry and an artifact folder in tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import mlp_model, scale_model
from modelserve.cli import app

runner = CliRunner()
ENV = {"COLUMNS": "200", "MODELSERVE_REGISTRY_ACTOR": "tester", "MODELSERVE_REGISTRY_URL": None,
       "MODELSERVE_REGISTRY_ARTIFACTS": None}


class Models:
    """Runs ``modelserve models ARGS --registry … --artifacts …`` and checks the exit code."""

    def __init__(self, root: Path):
        self.root = root
        self.url = f"sqlite:///{root}/registry.db"
        self.artifacts = root / "artifacts"

    def __call__(self, *args: str, code: int = 0):
        result = runner.invoke(app, ["models", *map(str, args), "--registry", self.url,
                                     "--artifacts", str(self.artifacts)], env=ENV)
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        assert "Traceback" not in result.output
        if code:
            assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)

    def stored(self) -> list[Path]:
        return sorted(p for p in (self.artifacts / "sha256").rglob("*") if p.is_file())


@pytest.fixture
def models(tmp_path) -> Models:
    return Models(tmp_path / "reg")


@pytest.fixture
def files(tmp_path) -> dict[int, Path]:
    """Three ONNX files that answer differently (y = x * k)."""
    return {k: scale_model(tmp_path / f"scale{k}.onnx", float(k)) for k in (1, 2, 3)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_same_file_twice_stores_it_once(models, files):
    first = models.json("register", files[1], "--name", "net", "--tag", "team=vision", "--tag", "data=v2",
                        "--description", "baseline")
    assert first["version"] == 1 and first["digest"] == sha256(files[1]) and first["format"] == "onnx"
    assert first["tags"] == {"team": "vision", "data": "v2"} and first["description"] == "baseline"
    assert first["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    out = models("register", files[1], "--name", "net").stdout
    assert re.search(rf"registered net version 2: onnx, \d+ B, sha256 {first['digest'][:12]}", out), out
    stored = models.stored()
    assert len(stored) == 1 and stored[0].name == first["digest"]
    models("register", files[2], "--name", "net")
    assert len(models.stored()) == 2

    listed = models.json("list")
    assert [(m["name"], m["versions"], m["latest_version"]) for m in listed] == [("net", 3, 3)]
    table = models("list").stdout
    assert re.search(r"│ net\s+│\s+3 │\s+3 │", table), table


def test_lineage_in_show_and_lineage(models, files, tmp_path):
    models("register", files[1], "--name", "net")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"top1": 0.91}))
    child = models.json("register", files[2], "--name", "net", "--from-version", "1", "--step", "quantize",
                        "--metrics", metrics)
    assert child["parent"] == "1" and child["step"] == "quantize" and child["metrics"] == {"top1": 0.91}
    models("register", files[3], "--name", "net", "--from-version", "2", "--step", "prune")
    models("register", files[1], "--name", "small", "--from-version", "net:3", "--step", "distill")

    out = models("show", "net").stdout
    tree = out[out.index("net: lineage"):]
    lines = tree.splitlines()
    root = next(i for i, line in enumerate(lines) if re.search(r"── 1 onnx", line))
    # version 2 nests under 1, version 3 under 2, and the other model's derived version under 3
    assert re.search(r"└── 2 quantize onnx", lines[root + 1]), tree
    assert re.search(r"└── 3 prune onnx", lines[root + 2]), tree
    assert "small:1 (another model)" in lines[root + 3], tree
    assert lines[root + 1].index("2 quantize") < lines[root + 2].index("3 prune")  # deeper indentation
    assert re.search(r"│\s+2 │ onnx .*quantize ← 1", out), out  # the versions table's "derived" column

    chain = models.json("lineage", "small", "1")
    assert [(v["model"], v["version"], v["step"]) for v in chain] == [
        ("small", 1, "distill"), ("net", 3, "prune"), ("net", 2, "quantize"), ("net", 1, None)]
    out = models("lineage", "net", "3").stdout
    assert re.search(r"net\s+│\s+2 │ quantize .*top1=0.91", out), out

    models("register", files[1], "--name", "net", "--from-version", "9", "--step", "quantize", code=1)
    models("register", files[1], "--name", "net", "--step", "quantize", code=2)  # a step needs its parent
    assert len(models.json("show", "net")["versions"]) == 3


def test_alias_set_promote_and_history_in_order(models, files):
    for k in (1, 2, 3):
        models("register", files[k], "--name", "net")
    assert models("alias", "set", "net", "production", "1").stdout.strip() == "net production → 1"
    models("alias", "set", "net", "staging", "3")
    out = models("promote", "net").stdout
    assert "net production → 3 (promoted from staging)" in out
    promoted = models.json("promote", "net", "--from", "staging", "--to", "canary-pool")
    assert promoted["alias"] == "canary-pool" and promoted["version"] == 3
    aliases = {a["alias"]: a["version"] for a in models.json("show", "net")["aliases"]}
    assert aliases == {"production": 3, "staging": 3, "canary-pool": 3}
    back = models.json("rollback", "net")
    assert (back["previous_version"], back["version"]) == (3, 1)
    models("delete", "net", "2", "--reason", "never used")

    history = models.json("history", "net")
    steps = [(h["action"], h["alias"], h["from_version"], h["to_version"]) for h in reversed(history)]
    assert steps == [
        ("register", None, None, 1), ("register", None, None, 2), ("register", None, None, 3),
        ("alias_set", "production", None, 1), ("alias_set", "staging", None, 3),
        ("promote", "production", 1, 3), ("promote", "canary-pool", None, 3),
        ("rollback", "production", 3, 1), ("delete_version", None, 2, None)]
    assert history[0]["reason"] == "never used" and history[0]["actor"] == "tester"
    assert [h["id"] for h in history] == sorted((h["id"] for h in history), reverse=True)
    only = models.json("history", "net", "--alias", "production", "--limit", "2")
    assert [(h["action"], h["to_version"]) for h in only] == [("rollback", 1), ("promote", 3)]
    table = models("history", "net").stdout
    assert re.search(r"promote\s+│ production\s+│ 1 → 3", table), table


def test_rollback_walks_back_one_step_at_a_time(models, files):
    for k in (1, 2, 3):
        models("register", files[k], "--name", "net")
        models("alias", "set", "net", "production", str(k))
    assert models("rollback", "net").stdout.strip() == "rolled back net production: 3 → 2"
    assert models("rollback", "net", "production").stdout.strip() == "rolled back net production: 2 → 1"
    result = models("rollback", "net", code=1)
    assert "no earlier version to roll back to" in result.stderr
    assert models.json("show", "net")["aliases"][0]["version"] == 1
    rollbacks = [(h["from_version"], h["to_version"]) for h in models.json("history", "net", "--alias", "production")
                 if h["action"] == "rollback"]
    assert rollbacks == [(2, 1), (3, 2)]
    models("rollback", "net", "staging", code=1)  # no such alias


def test_delete_refused_while_aliased(models, files):
    models("register", files[1], "--name", "net")
    models("register", files[2], "--name", "net")
    models("alias", "set", "net", "production", "1")
    models("alias", "set", "net", "staging", "2", "--canary", "1", "--weight", "0.2")
    result = models("delete", "net", "1", code=1)
    assert "error: version 1 of 'net' is in use by aliases production, staging: move or delete them first" \
        in result.stderr
    assert [v["version"] for v in models.json("show", "net")["versions"]] == [1, 2]
    assert len(models.stored()) == 2

    models("alias", "set", "net", "production", "2")
    models("alias", "set", "net", "staging", "2")  # drops the canary on 1
    assert models("delete", "net", "1").stdout.strip() == "deleted version 1 of net"
    assert [v["version"] for v in models.json("show", "net")["versions"]] == [2]
    assert [p.name for p in models.stored()] == [sha256(files[2])]  # the unshared file went with it
    models("delete", "net", "1", code=1)
    models("delete", "net", "one", code=2)  # not a number: a usage error

    models("alias", "delete", "net", "staging")
    assert [a["alias"] for a in models.json("show", "net")["aliases"]] == ["production"]


def test_protected_alias_needs_force_and_reason(models, files):
    for k in (1, 2):
        models("register", files[k], "--name", "net")
    out = models("alias", "set", "net", "production", "1", "--protect").stdout
    assert out.strip() == "net production → 1 [protected]"
    for extra in ([], ["--force"], ["--reason", "hotfix"]):
        result = models("alias", "set", "net", "production", "2", *extra, code=1)
        assert "alias 'production' of model 'net' is protected" in result.stderr
        assert "--force" in result.stderr and "--reason" in result.stderr
    models("rollback", "net", code=1)  # no earlier version, and protected besides
    models("alias", "delete", "net", "production", code=1)
    assert models.json("show", "net")["aliases"][0]["version"] == 1

    moved = models.json("alias", "set", "net", "production", "2", "--force", "--reason", "hotfix 42")
    assert moved["version"] == 2 and moved["protected"] is True
    models("rollback", "net", code=1)
    assert "1" in models("rollback", "net", "--force", "--reason", "bad hotfix").stdout
    reasons = [(h["action"], h["reason"]) for h in models.json("history", "net", "--alias", "production")]
    assert reasons[:2] == [("rollback", "bad hotfix"), ("alias_set", "hotfix 42")]
    models("alias", "set", "net", "production", "1", "--no-protect", "--force", "--reason", "open up")
    models("alias", "set", "net", "production", "2")  # unprotected now: moves freely
    assert models.json("show", "net")["aliases"][0] == {**models.json("show", "net")["aliases"][0],
                                                        "version": 2, "protected": False}


def test_canary_alias(models, files):
    for k in (1, 2, 3):
        models("register", files[k], "--name", "net")
    out = models("alias", "set", "net", "production", "2", "--canary", "3", "--weight", "0.1",
                 "--sticky-header", "X-User").stdout
    assert out.strip() == "net production → 2 (canary 3 gets 10% of requests, sticky by header x-user)"
    alias = models.json("show", "net")["aliases"][0]
    assert (alias["version"], alias["canary_version"], alias["canary_weight"], alias["sticky_header"]) == \
        (2, 3, 0.1, "x-user")
    table = models("show", "net").stdout
    assert re.search(r"│ production\s+│\s+2 │\s+3 │\s+10% │ x-user", table), table

    for weight in ("0", "1.5"):
        result = models("alias", "set", "net", "production", "2", "--canary", "1", "--weight", weight, code=2)
        assert "canary weight must be between 0 and 1" in result.stderr
    models("alias", "set", "net", "production", "2", "--canary", "9", "--weight", "0.5", code=1)
    assert models.json("show", "net")["aliases"][0]["canary_version"] == 3  # unchanged by the failures


def test_export_is_a_servable_model_repository(models, files, tmp_path):
    from modelserve.server.models import ModelManager

    config = tmp_path / "serving.yaml"
    config.write_text("max_batch_size: 8\ndynamic_batching: {max_queue_delay_microseconds: 500}\n")
    models("register", files[2], "--name", "scale", "--config", config)
    models("register", files[3], "--name", "scale", "--config", config)
    models("alias", "set", "scale", "production", "1")
    dest = tmp_path / "repo"
    out = models("export", "scale", dest, "--version", "production").stdout
    assert f"exported scale version 1 to {dest / 'scale' / '1' / 'model.onnx'}" in out
    exported = dest / "scale" / "1" / "model.onnx"
    assert sha256(exported) == sha256(files[2])
    assert not (dest / "scale" / "2").exists()
    assert yaml.safe_load((dest / "scale" / "config.yaml").read_text())["name"] == "scale"

    every = models.json("export", "scale", tmp_path / "all")
    assert [v["version"] for v in every["versions"]] == [1, 2]
    assert sha256(tmp_path / "all" / "scale" / "2" / "model.onnx") == sha256(files[3])

    async def serve(repository: Path) -> tuple[float, int]:
        manager = ModelManager(repository)
        await manager.start()
        try:
            version = manager.get("scale")
            out = await version.infer({"x": np.ones((1, 4), np.float32)}, None, 1)
            return float(out["y"][0, 0]), version.config.max_batch_size
        finally:
            await manager.close()

    assert asyncio.run(serve(dest)) == (2.0, 8)  # the registry's config reached the server
    assert asyncio.run(serve(tmp_path / "all")) == (3.0, 8)  # default policy: the latest version

    # a tampered artifact is refused, and nothing half-written is left behind
    stored = models.artifacts / "sha256" / sha256(files[3])[:2] / sha256(files[3])
    stored.write_bytes(stored.read_bytes() + b"x")
    result = models("export", "scale", tmp_path / "bad", "--version", "2", code=1)
    assert "refused (tampered or corrupt)" in result.stderr
    assert not list((tmp_path / "bad").rglob("*.onnx*"))


def test_unknown_model_and_bad_input(models, files, tmp_path):
    for args in (["show", "ghost"], ["history", "ghost"], ["lineage", "ghost", "1"], ["rollback", "ghost"],
                 ["alias", "set", "ghost", "production", "1"], ["delete", "ghost", "1"],
                 ["export", "ghost", str(tmp_path / "out")], ["promote", "ghost"]):
        result = models(*args, code=1)
        assert "no registered model 'ghost'" in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error: ")
    models("register", files[1], "--name", "net")
    assert "model 'net' has no version or alias 'beta'" in models("lineage", "net", "beta", code=1).stderr
    assert "model 'net' has no version 7" in models("alias", "set", "net", "production", "7", code=1).stderr
    assert "has no alias 'staging' to promote from" in models("promote", "net", code=1).stderr
    assert "--tag team: expected key=value" in models("register", files[1], "--name", "net", "--tag", "team",
                                                       code=2).stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- just\n- a list\n")
    assert "must hold a mapping" in models("register", files[1], "--name", "net", "--config", bad_yaml,
                                           code=2).stderr
    assert "is not a file" in models("register", tmp_path / "missing.onnx", "--name", "net", code=2).stderr
    assert "not allowed" in models("register", files[1], "--name", "a/b", code=2).stderr
    assert len(models.json("show", "net")["versions"]) == 1


def test_corrupt_onnx_stores_nothing(models, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07definitely not an onnx protobuf" * 10)
    result = models("register", bad, "--name", "net", code=2)
    assert "broken.onnx is not a readable ONNX model" in result.stderr
    assert models.stored() == []
    assert models.json("list") == []
    assert "no registered model 'net'" in models("show", "net", code=1).stderr


def test_every_command_has_help_with_an_example():
    commands = ["register", "list", "show", "alias set", "alias delete", "promote", "rollback", "delete",
                "history", "lineage", "export"]
    for command in commands:
        result = runner.invoke(app, ["models", *command.split(), "--help"], env=ENV)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "Example: modelserve models " + command.split()[0] in text, (command, text)
        assert "--registry" in text and "--json" in text


def test_environment_picks_the_registry(tmp_path, files):
    env = {**ENV, "MODELSERVE_REGISTRY_URL": f"sqlite:///{tmp_path}/env/registry.db"}
    result = runner.invoke(app, ["models", "register", str(files[1]), "--name", "net"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env" / "registry.db").is_file()
    assert len(list((tmp_path / "env" / "artifacts" / "sha256").rglob("*"))) == 2  # a folder and the file
    result = runner.invoke(app, ["models", "list", "--json"], env=env)
    assert [m["name"] for m in json.loads(result.stdout)] == ["net"]


def test_end_to_end_in_a_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("modelserve")
    model = mlp_model(tmp_path / "mlp.onnx")
    quantized = mlp_model(tmp_path / "mlp-int8.onnx", seed=1)
    flags = ["--registry", f"sqlite:///{tmp_path}/reg/registry.db", "--artifacts", str(tmp_path / "store")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_REGISTRY")}

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(exe), "models", *args, *flags], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc

    run("register", str(model), "--name", "mlp")
    run("register", str(quantized), "--name", "mlp", "--from-version", "1", "--step", "quantize")
    run("alias", "set", "mlp", "production", "1")
    run("alias", "set", "mlp", "production", "2")
    assert run("rollback", "mlp", "production").stdout.strip() == "rolled back mlp production: 2 → 1"
    detail = json.loads(run("show", "mlp", "--json").stdout)
    assert [(v["version"], v["parent"], v["step"]) for v in detail["versions"]] == [(1, None, None), (2, "1", "quantize")]
    assert detail["history"][0]["action"] == "rollback"
    proc = run("delete", "mlp", "1", code=1)
    assert proc.stderr.startswith("error: version 1 of 'mlp' is in use by alias production")
    run("export", "mlp", str(tmp_path / "repo"), "--version", "production")
    assert sha256(tmp_path / "repo" / "mlp" / "1" / "model.onnx") == sha256(model)
