"""Authentication and access control on the running server (issue 7, parts 1-3 and 5): real
``modelserve serve`` processes on loopback, keys made with ``KeyStore`` in a temporary SQLite registry
(revoked with the real CLI), JWTs signed here with PyJWT, certificates made here with ``cryptography``.

The matrix, on V2 REST (infer, metadata), TF Serving REST (/v1), the repository API, feedback, /metrics,
the registry's alias API and gRPC (infer, metadata, load): no key, a bad key, an expired key, a revoked
key, the wrong role, the wrong model (an existing one and a missing one: the same 403), the right one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import jwt as pyjwt
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, scale_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from modelserve.security import KeyStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HS_SECRET = "a-test-secret-of-more-than-32-bytes-0123456789"
X = [1.0, 2.0, 3.0, 4.0]
NO_LOG = {"MODELSERVE_PAYLOAD_LOG": "false"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def v2(x=X) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]}


def token(role="reader", models=("mlp",), exp_s=300, secret=HS_SECRET, **extra) -> str:
    claims = {"sub": "jwt-user", "role": role, "exp": int(time.time()) + exp_s, **extra}
    if models is not None:
        claims["models"] = list(models)
    return pyjwt.encode(claims, secret, algorithm="HS256")


# -- the main server: a folder repository in explicit mode, API keys and JWTs -----------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    repo = root / "repo"
    scale_model(repo / "mlp" / "1" / "model.onnx", 2.0)
    scale_model(repo / "other" / "1" / "model.onnx", 3.0)
    url = f"sqlite:///{root}/registry.db"
    keys = {}
    with KeyStore.open(url, client="test") as store:
        for name, role, models in (("reader", "reader", "mlp"), ("operator", "operator", None),
                                   ("admin", "admin", None), ("revokeme", "reader", None)):
            keys[name], _ = store.create(name, role, models, created_by="test")
        keys["expired"], _ = store.create("expired", "reader", None, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1),
                                          created_by="test")
    expires = time.monotonic() + 1.2
    secret_file = root / "jwt.secret"
    secret_file.write_text(HS_SECRET + "\n")
    srv = Server(repo, "--model-control-mode", "explicit", "--load-model", "mlp", "--load-model", "other",
                 "--auth", "keys+jwt", "--keys-db", url, "--jwt-secret-file", str(secret_file), env=NO_LOG)
    client = httpx.Client(base_url=f"http://{srv.http_url}", timeout=30)
    yield SimpleNamespace(srv=srv, client=client, keys=keys, url=url, root=root, expires=expires)
    client.close()
    srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log
    for secret in keys.values():  # no key ever reaches the log
        assert secret not in log and secret[12:] not in log
    assert HS_SECRET not in log


def test_ready_line_names_the_authentication(world):
    line = next(line for line in world.srv.output if line.startswith("modelserve ready"))
    assert line.rstrip().endswith("auth=keys+jwt") and "tls=" not in line


def test_health_stays_open(world):
    c = world.client
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    with grpc.insecure_channel(world.srv.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpcclient.InferenceServerClient(world.srv.grpc_url) as g:
        assert g.is_server_live() and g.is_server_ready()


def test_rest_without_or_with_a_bad_key_is_401(world):
    c, keys = world.client, world.keys
    well_formed_unknown = "ms_zzzzzzzz_" + "A" * 43
    wrong_secret = keys["admin"][:-4] + ("AAAA" if not keys["admin"].endswith("AAAA") else "BBBB")
    for headers in ({}, bearer("nonsense"), bearer(well_formed_unknown), bearer(wrong_secret),
                    {"Authorization": f"Basic {keys['admin']}"}, bearer(token(secret="x" * 40))):
        for method, path, body in (("POST", "/v2/models/mlp/infer", v2()), ("GET", "/v2/models/mlp", None),
                                   ("POST", "/v1/models/mlp:predict", {"instances": [X]}), ("GET", "/v2", None),
                                   ("POST", "/v2/repository/models/mlp/load", {}), ("GET", "/metrics", None),
                                   ("POST", "/v2/models/mlp/feedback", {"request_id": "r", "ground_truth": 1}),
                                   ("GET", "/v2/dashboard", None), ("POST", "/models/mlp/predict", None)):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "error" in r.json()
            for secret in world.keys.values():
                assert secret not in r.text


def test_expired_key_is_401(world):
    time.sleep(max(0.0, world.expires - time.monotonic()))
    r = world.client.post("/v2/models/mlp/infer", json=v2(), headers=bearer(world.keys["expired"]))
    assert r.status_code == 401 and "expired" in r.json()["error"], r.text
    r = world.client.post("/v2/models/mlp/infer", json=v2(), headers=bearer(token(exp_s=-120)))
    assert r.status_code == 401 and "expired" in r.json()["error"], r.text


def test_right_key_passes_and_listings_are_filtered(world):
    c, keys = world.client, world.keys
    reader = bearer(keys["reader"])
    r = c.post("/v2/models/mlp/infer", json=v2(), headers=reader)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0], r.text
    assert c.get("/v2/models/mlp", headers=reader).json()["name"] == "mlp"
    assert c.get("/v2/models/mlp/versions/1/config", headers=reader).status_code == 200
    assert c.get("/v2", headers=reader).json()["name"] == "modelserve"
    r = c.post("/v1/models/mlp:predict", json={"instances": [X]}, headers=reader)
    assert r.status_code == 200 and r.json()["predictions"] == [[2.0, 4.0, 6.0, 8.0]]
    assert c.get("/v1/models/mlp", headers=reader).status_code == 200
    # a key limited to mlp sees mlp only; an unscoped one sees both
    assert c.get("/v2/models", headers=reader).json()["models"] == ["mlp"]
    assert c.get("/v1/models", headers=reader).json()["models"] == ["mlp"]
    assert [m["name"] for m in c.post("/v2/repository/index", json={}, headers=reader).json()] == ["mlp"]
    assert [s["name"] for s in c.get("/v2/models/stats", headers=reader).json()["model_stats"]] == ["mlp"]
    assert c.get("/v2/models", headers=bearer(keys["operator"])).json()["models"] == ["mlp", "other"]
    # JWT (HS256) with the same scope
    jwt_reader = bearer(token())
    assert c.post("/v2/models/mlp/infer", json=v2(), headers=jwt_reader).status_code == 200
    assert c.post("/v2/models/other/infer", json=v2(), headers=jwt_reader).status_code == 403


def test_wrong_model_is_the_same_403_whether_it_exists_or_not(world):
    c, reader = world.client, bearer(world.keys["reader"])
    for method, path, body in (("POST", "/v2/models/{m}/infer", v2()), ("GET", "/v2/models/{m}", None),
                               ("GET", "/v2/models/{m}/versions/1/ready", None),
                               ("POST", "/v1/models/{m}:predict", {"instances": [X]}),
                               ("GET", "/v1/models/{m}/metadata", None), ("POST", "/models/{m}/predict", None)):
        existing = c.request(method, path.format(m="other"), json=body, headers=reader)
        missing = c.request(method, path.format(m="ghost"), json=body, headers=reader)
        assert existing.status_code == missing.status_code == 403, (path, existing.text, missing.text)
        assert existing.json()["error"].replace("other", "X") == missing.json()["error"].replace("ghost", "X")
    # an admin learns that ghost does not exist; the reader never does
    assert c.post("/v2/models/ghost/infer", json=v2(), headers=bearer(world.keys["admin"])).status_code == 404


def test_roles(world):
    c, keys = world.client, world.keys
    reader, operator, admin = (bearer(keys[k]) for k in ("reader", "operator", "admin"))
    # load/unload: operator and up
    assert c.post("/v2/repository/models/mlp/load", json={}, headers=reader).status_code == 403
    assert c.post("/v2/repository/models/mlp/unload", json={}, headers=reader).status_code == 403
    assert c.post("/v2/repository/models/other/unload", json={}, headers=operator).status_code == 200
    assert c.post("/v2/repository/models/other/load", json={}, headers=admin).status_code == 200
    # feedback: operator (the payload log is off here: past authorization, the server says so)
    fb = {"request_id": "r1", "ground_truth": 1}
    assert c.post("/v2/models/mlp/feedback", json=fb, headers=reader).status_code == 403
    assert c.post("/v2/models/mlp/feedback", json=fb, headers=operator).status_code == 503
    # payload-log reads: operator, and a view across every model needs an unscoped credential
    assert c.get("/v2/logs", headers=reader).status_code == 403
    assert c.get("/v2/logs?model=mlp", headers=operator).status_code == 503
    # /metrics: reader and up, but allowed every model (metric labels name them all)
    assert c.get("/metrics", headers=reader).status_code == 403
    r = c.get("/metrics", headers=operator)
    assert r.status_code == 200 and "modelserve" in r.text
    assert c.get("/v2/dashboard", headers=reader).status_code == 403
    assert c.get("/v2/dashboard", headers=admin).status_code == 200
    # the dashboard page itself is static and open; its data is not
    assert c.get("/dashboard").status_code == 200


def test_grpc_matrix(world):
    keys = world.keys

    def call(fn, key):
        try:
            fn({"authorization": f"Bearer {key}"} if key else None)
        except InferenceServerException as exc:
            return exc.status()
        return "OK"

    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([X], dtype=np.float32))
    with grpcclient.InferenceServerClient(world.srv.grpc_url) as g:
        def infer(model):
            return lambda h: g.infer(model, [x], headers=h)

        def metadata(model):
            return lambda h: g.get_model_metadata(model, headers=h)

        def load(model):
            return lambda h: g.load_model(model, headers=h)

        for fn in (infer("mlp"), metadata("mlp"), load("mlp")):
            assert call(fn, None) == "StatusCode.UNAUTHENTICATED"
            assert call(fn, "ms_zzzzzzzz_" + "A" * 43) == "StatusCode.UNAUTHENTICATED"
            assert call(fn, keys["expired"]) == "StatusCode.UNAUTHENTICATED"
        for model in ("other", "ghost"):
            assert call(infer(model), keys["reader"]) == "StatusCode.PERMISSION_DENIED"
            assert call(metadata(model), keys["reader"]) == "StatusCode.PERMISSION_DENIED"
        assert call(load("mlp"), keys["reader"]) == "StatusCode.PERMISSION_DENIED"
        assert call(infer("mlp"), keys["reader"]) == "OK"
        assert call(metadata("mlp"), keys["reader"]) == "OK"
        assert call(load("mlp"), keys["operator"]) == "OK"
        assert call(infer("mlp"), token()) == "OK"
        assert call(infer("other"), token()) == "StatusCode.PERMISSION_DENIED"
        assert call(infer("mlp"), token(exp_s=-120)) == "StatusCode.UNAUTHENTICATED"
        index = g.get_model_repository_index(headers={"authorization": f"Bearer {keys['reader']}"}, as_json=True)
        assert [m["name"] for m in index["models"]] == ["mlp"]
        # the same messages on a stream: each request checked against its model
        results = []
        g.start_stream(lambda result, error: results.append(error), headers={"authorization": f"Bearer {keys['reader']}"})
        g.async_stream_infer("mlp", [x])
        g.async_stream_infer("other", [x])
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        g.stop_stream()
        refused = []  # a stream without credentials is refused as a whole
        g.start_stream(lambda result, error: refused.append(error))
        try:
            g.async_stream_infer("mlp", [x])
        except InferenceServerException:  # the refusal can arrive before the first request is queued
            pass
        deadline = time.monotonic() + 10
        while not refused and time.monotonic() < deadline:
            time.sleep(0.02)
        g.stop_stream()
    assert refused and refused[0] is not None and "UNAUTHENTICATED" in str(refused[0].status()), refused
    assert len(results) == 2 and sum(e is None for e in results) == 1, results
    assert "permission denied: not allowed to access model 'other'" in str(next(e for e in results if e is not None))


def test_revoked_key_is_refused_within_seconds(world):
    c, key = world.client, world.keys["revokeme"]
    assert c.post("/v2/models/other/infer", json=v2(), headers=bearer(key)).status_code == 200
    done = subprocess.run([sys.executable, "-m", "modelserve", "keys", "revoke", "revokeme", "--registry", world.url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    revoked_at = time.monotonic()
    while True:
        r = c.post("/v2/models/other/infer", json=v2(), headers=bearer(key))
        if r.status_code == 401:
            break
        assert time.monotonic() - revoked_at < 3.5, "revocation took longer than ~3 s"
        time.sleep(0.1)
    assert "revoked" in r.json()["error"]
    with grpcclient.InferenceServerClient(world.srv.grpc_url) as g:
        with pytest.raises(InferenceServerException) as err:
            g.get_model_metadata("other", headers={"authorization": f"Bearer {key}"})
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"


def test_every_route_has_a_rule():
    """A route added without an entry in access.HTTP_RULES would fall back to admin-only: list them."""
    from unittest import mock

    from modelserve.server.access import DEFAULT_RULE, Access
    from modelserve.server.dataplane import Dataplane
    from modelserve.server.models import ModelManager
    from modelserve.server.rest import create_app

    app = create_app(Dataplane(ModelManager(Path("/nonexistent"), "none")), 1024, mock.MagicMock(), mock.MagicMock())
    access = Access(mock.MagicMock())
    missing, seen = [], 0
    for route in app.app.router.routes:
        for path, methods in _paths(route):
            seen += 1
            concrete = path.replace("{model}", "m").replace("{name}", "m").replace("{version}", "1") \
                .replace("{alias}", "a").replace("{repository}", "r").replace("{action}", "load").replace("{rest}", "m")
            for method in methods - {"HEAD"}:
                if access.rule_for(method, concrete)[0] is DEFAULT_RULE:
                    missing.append(f"{method} {path}")
    assert seen > 40, "the app's routes were not found: update _paths for this FastAPI"
    assert not missing, f"routes without an access rule (admin-only): {missing}"


def _paths(route, prefix=""):
    """(full path, methods) of a route, following FastAPI's included routers."""
    inner = getattr(route, "original_router", None)
    if inner is not None:
        context = getattr(route, "include_context", None)
        extra = getattr(context, "prefix", "") or ""
        for child in inner.routes:
            yield from _paths(child, prefix + extra)
        return
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if path is not None:
        yield prefix + path, set(getattr(route, "methods", None) or {"GET"})


# -- the registry's management API -----------------------------------------------------------------------


def test_registry_alias_moves_by_role(tmp_path):
    from modelserve.registry import Registry

    url = f"sqlite:///{tmp_path}/registry.db"
    registry = Registry(url, tmp_path / "artifacts", actor="test")
    for factor in (1.0, 2.0):
        registry.register(scale_model(tmp_path / f"s{factor}.onnx", factor), "alpha")
    registry.register(scale_model(tmp_path / "b.onnx", 5.0), "beta")
    registry.set_alias("alpha", "production", 1)
    registry.set_alias("alpha", "guarded", 1, protect=True)
    registry.close()
    with KeyStore.open(url) as store:
        keys = {n: store.create(n, r, m, created_by="t")[0]
                for n, r, m in (("r", "reader", None), ("o", "operator", "alpha"), ("a", "admin", None),
                                ("ob", "operator", "beta"))}
    with Server(tmp_path / "none", "--registry", url, "--registry-cache", str(tmp_path / "cache"),
                "--auth", "keys", env=NO_LOG) as srv, httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
        move = "/v2/registry/models/alpha/aliases/staging"
        assert c.put(move, json={"version": 2}).status_code == 401
        assert c.put(move, json={"version": 2}, headers=bearer(keys["r"])).status_code == 403
        assert c.put(move, json={"version": 2}, headers=bearer(keys["ob"])).status_code == 403  # another model
        assert c.put("/v2/registry/models/nope/aliases/x", json={"version": 2},
                     headers=bearer(keys["ob"])).status_code == 403
        r = c.put(move, json={"version": 2}, headers=bearer(keys["o"]))
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        # a protected alias: moving it takes force, and force takes an admin
        guarded = "/v2/registry/models/alpha/aliases/guarded"
        assert c.put(guarded, json={"version": 2}, headers=bearer(keys["o"])).status_code == 409
        forced = {"version": 2, "force": True, "reason": "hotfix"}
        assert c.put(guarded, json=forced, headers=bearer(keys["o"])).status_code == 403
        assert c.put(guarded, json=forced, headers=bearer(keys["a"])).status_code == 200
        assert c.delete("/v2/registry/models/alpha/versions/2", headers=bearer(keys["o"])).status_code == 403
        # listings filtered to the key's models
        assert [m["name"] for m in c.get("/v2/registry/models", headers=bearer(keys["o"])).json()] == ["alpha"]
        assert [m["name"] for m in c.get("/v2/registry/models", headers=bearer(keys["r"])).json()] == ["alpha", "beta"]
        assert set(c.get("/v2/registry/serving", headers=bearer(keys["ob"])).json()["models"]) <= {"beta"}


# -- secure by default -----------------------------------------------------------------------------------


def test_refuses_to_listen_beyond_loopback_without_authentication(tmp_path):
    done = subprocess.run([sys.executable, "-m", "modelserve", "serve", "--model-repository", str(tmp_path),
                           "--host", "0.0.0.0", "--http-port", "0", "--grpc-port", "0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **NO_LOG})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stderr and "--insecure" in done.stderr
    assert "Traceback" not in done.stderr


# -- TLS and mutual TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost / 127.0.0.1, and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)

    def leaf(stem, cn, usage, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))

    leaf("server", "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf("client", "test client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return folder


def _tls_repo(root: Path) -> Path:
    scale_model(root / "repo" / "mlp" / "1" / "model.onnx", 2.0)
    return root / "repo"


def _grpc_infer(url, **ssl_files):
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([X], dtype=np.float32))
    with grpcclient.InferenceServerClient(url, ssl=True, **{k: str(v) for k, v in ssl_files.items()}) as g:
        return g.infer("mlp", [x], client_timeout=10).as_numpy("y")[0].tolist()


def test_tls_with_insecure_on_every_interface(tmp_path, pki):
    """--insecure lets an unauthenticated server listen on 0.0.0.0; TLS on HTTP and gRPC, checked against the CA."""
    with Server(_tls_repo(tmp_path), "--host", "0.0.0.0", "--insecure", "--tls-cert", str(pki / "server.pem"),
                "--tls-key", str(pki / "server.key"), env=NO_LOG) as srv:
        line = next(line for line in srv.output if line.startswith("modelserve ready"))
        assert "http=0.0.0.0:" in line and line.rstrip().endswith("tls=on")
        with httpx.Client(base_url=f"https://{srv.http_url}", verify=ssl.create_default_context(
                cafile=str(pki / "ca.pem")), timeout=30) as c:
            r = c.post("/v2/models/mlp/infer", json=v2())
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
        with pytest.raises(httpx.HTTPError):  # plain HTTP to a TLS port
            httpx.get(f"http://{srv.http_url}/v2/health/live", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"https://{srv.http_url}/v2/health/live", timeout=5)
        assert _grpc_infer(srv.grpc_url, root_certificates=pki / "ca.pem") == [2.0, 4.0, 6.0, 8.0]


def test_mutual_tls(tmp_path, pki):
    """A client CA: the handshake needs a client certificate it signed (and counts as authentication, so
    0.0.0.0 is allowed without --insecure)."""
    with Server(_tls_repo(tmp_path), "--host", "0.0.0.0", "--tls-cert", str(pki / "server.pem"),
                "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"), env=NO_LOG) as srv:
        line = next(line for line in srv.output if line.startswith("modelserve ready"))
        assert line.rstrip().endswith("tls=mutual")
        ca_only = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with httpx.Client(base_url=f"https://{srv.http_url}", verify=with_cert, timeout=30) as c:
            assert c.post("/v2/models/mlp/infer", json=v2()).status_code == 200
        with pytest.raises(httpx.HTTPError):  # no client certificate: the server ends the handshake
            with httpx.Client(base_url=f"https://{srv.http_url}", verify=ca_only, timeout=5) as c:
                c.get("/v2/health/live")
        assert _grpc_infer(srv.grpc_url, root_certificates=pki / "ca.pem", private_key=pki / "client.key",
                           certificate_chain=pki / "client.pem") == [2.0, 4.0, 6.0, 8.0]
        with pytest.raises(InferenceServerException) as err:
            _grpc_infer(srv.grpc_url, root_certificates=pki / "ca.pem")
        assert err.value.status() == "StatusCode.UNAVAILABLE"


def test_dashboard_page_asks_for_a_key(world, tmp_path):
    """The page is open, its data is not: without a key the page shows the key form and says why."""
    from test_dashboard import Dom, browse

    assert world.client.get("/dashboard").status_code == 200
    assert world.client.get("/v2/dashboard").status_code == 401
    dom = Dom(browse(f"http://{world.srv.http_url}/dashboard", tmp_path / "chrome", "--dump-dom"))
    form = dom.one(id="auth")
    assert "hidden" not in form, form  # shown after the 401
    assert "a key is needed" in dom.one(id="conn-text")["text"]
    admin = world.client.get("/v2/dashboard", headers=bearer(world.keys["admin"]))
    assert admin.status_code == 200 and admin.json()["models"]
