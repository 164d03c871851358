"""The identity layer (issue 7, parts 1-2): API keys, JWTs, roles and model scopes, the audit log, the CLI.

Not yet wired into the servers: everything here is driven at the ``Authenticator`` / ``authorize`` /
``KeyStore`` level, on SQLite and PostgreSQL. The keys used for JWTs are made here with ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import text, update
from typer.testing import CliRunner

from modelserve.cli import app
from modelserve.errors import Conflict, InvalidInput, PermissionDenied, Unauthenticated
from modelserve.registry.db import current_revision, head_revision, make_engine, migrate
from modelserve.security import (
    Action,
    Authenticator,
    JwtVerifier,
    KeyCache,
    KeyNotFound,
    KeyStore,
    Principal,
    Role,
    authorize,
    parse_expiry,
    parse_since,
)
from modelserve.security.principal import out_of_scope_message
from modelserve.security.schema import ApiKey

# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def store(db_url):
    with KeyStore.open(db_url, client="test") as s:
        yield s


@pytest.fixture
def sqlite_store(tmp_path):
    with KeyStore.open(f"sqlite:///{tmp_path}/registry.db", client="test") as s:
        yield s


def _pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


HS_SECRET = "s" * 16 + "0123456789abcdef0123"  # 36 bytes


def claims(**over) -> dict:
    now = int(time.time())
    base = {"sub": "alice", "role": "operator", "models": ["resnet*"], "iat": now, "exp": now + 300,
            "aud": "modelserve", "iss": "https://idp.example"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, sign=None) -> str:
    """A token made by hand (what an attacker would send); ``sign(bytes) -> bytes`` or no signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def refused(call, *fragments: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        call()
    message = info.value.message
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.http_status == 401 and info.value.grpc_code == "UNAUTHENTICATED"
    return message


# -- errors ------------------------------------------------------------------------------------------


def test_error_classes_map_to_401_and_403():
    assert (Unauthenticated.http_status, Unauthenticated.grpc_code) == (401, "UNAUTHENTICATED")
    assert Unauthenticated.headers == {"WWW-Authenticate": "Bearer"}
    assert (PermissionDenied.http_status, PermissionDenied.grpc_code) == (403, "PERMISSION_DENIED")


# -- key lifecycle, SQLite and PostgreSQL ------------------------------------------------------------


def test_key_lifecycle(store: KeyStore, db_url):
    assert current_revision(store.engine) == head_revision() == "0004"
    token0 = store.change_token()
    secret, info = store.create("ci", "reader", ["resnet*", "bert"], created_by="alice")
    assert secret.startswith(f"ms_{info.key_id}_") and len(secret) == 3 + 8 + 1 + 43
    assert (info.name, info.role, info.models, info.status, info.created_by) == \
        ("ci", "reader", ["resnet*", "bert"], "active", "alice")
    assert store.change_token() != token0
    assert "secret" not in info.model_dump() and "secret_hash" not in info.model_dump()

    cache = KeyCache(store)
    auth = Authenticator(cache)
    principal = auth.authenticate(f"Bearer {secret}")
    assert principal == Principal("ci", Role.READER, ("resnet*", "bert"), "key", info.key_id)
    assert store.verify(secret) == principal

    # names are unique among keys not revoked; bad input is refused before the database
    with pytest.raises(Conflict, match="exists"):
        store.create("ci", "admin", created_by="alice")
    with pytest.raises(InvalidInput, match="role"):
        store.create("other", "root", created_by="alice")
    with pytest.raises(InvalidInput, match="name"):
        store.create("has space", "reader")
    with pytest.raises(InvalidInput, match="past"):
        store.create("old", "reader", expires_at=datetime.now(UTC) - timedelta(seconds=1))

    admin_secret, admin = store.create("ops", Role.ADMIN, None, datetime.now(UTC) + timedelta(days=30), "alice")
    assert admin.models == ["*"] and admin.expires_at > datetime.now(UTC)
    assert [k.name for k in store.list()] == ["ci", "ops"]

    # revocation: the cache keeps serving its snapshot until refreshed (the server does that every ~2 s)
    revoked = store.revoke("ci", by="bob")
    assert (revoked.status, revoked.revoked_by) == ("revoked", "bob")
    assert auth.authenticate(f"Bearer {secret}").name == "ci"
    assert cache.refresh() is True
    assert cache.refresh() is False  # nothing changed since: no reload
    refused(lambda: auth.authenticate(f"Bearer {secret}"), "revoked", "'ci'")
    refused(lambda: store.verify(secret), "revoked")
    assert auth.authenticate(f"Bearer {admin_secret}").role is Role.ADMIN
    with pytest.raises(Conflict, match="already revoked"):
        store.revoke("ci", by="bob")
    with pytest.raises(KeyNotFound):
        store.revoke("nobody", by="bob")

    # the name is free again; revoking by id works
    secret2, again = store.create("ci", "operator", "a*, b", created_by="alice")
    assert again.key_id != info.key_id and again.models == ["a*", "b"]
    store.revoke(admin.key_id, by="bob")
    cache.refresh()
    refused(lambda: auth.authenticate(f"Bearer {admin_secret}"), "revoked")
    assert auth.authenticate(f"Bearer {secret2}").role is Role.OPERATOR
    assert {k.name: k.status for k in store.list(include_revoked=False)} == {"ci": "active"}

    # last use is written in batches by refresh(), not per request
    assert store.get("ci").last_used_at is None
    cache.flush_last_used()
    assert store.get("ci").last_used_at is not None

    # the audit log: who, when, what, in order; never a secret
    entries = store.audit()
    assert [(e.actor, e.action, e.target) for e in entries] == [
        ("alice", "key.create", "ci"), ("alice", "key.create", "ops"), ("bob", "key.revoke", "ci"),
        ("alice", "key.create", "ci"), ("bob", "key.revoke", "ops")]
    assert entries[0].detail == {"key_id": info.key_id, "role": "reader", "models": ["resnet*", "bert"],
                                 "expires_at": None}
    assert all(e.client == "test" for e in entries)
    assert [e.action for e in store.audit(actor="bob")] == ["key.revoke", "key.revoke"]
    assert len(store.audit(limit=2)) == 2 and store.audit(limit=2)[-1].target == "ops"
    assert store.audit(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert [e.target for e in store.audit(action="key.create")] == ["ci", "ops", "ci"]

    # expiry is checked against the clock at each request (here: the row is moved into the past)
    with store.sessions.begin() as session:
        session.execute(update(ApiKey).where(ApiKey.key_id == again.key_id)
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1), revision=ApiKey.revision + 1))
    assert store.get("ci").status == "expired"
    cache.refresh()
    refused(lambda: auth.authenticate(f"Bearer {secret2}"), "expired", "'ci'")


def test_secret_is_stored_only_as_its_hash(store: KeyStore, db_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sql_log = logging.getLogger("sqlalchemy.engine")
    level = sql_log.level
    sql_log.setLevel(logging.INFO)  # every statement and its parameters
    try:
        secret, info = store.create("probe", "admin", ["*"], created_by="alice")
        cache = KeyCache(store)
        Authenticator(cache).authenticate(f"Bearer {secret}")
        cache.flush_last_used()
        store.revoke("probe", by="alice")
    finally:
        sql_log.setLevel(level)
    random_part = secret[12:]  # the 43 random characters
    assert "INSERT INTO api_keys" in caplog.text  # the statements were logged: the secret was not
    assert secret not in caplog.text and random_part not in caplog.text

    with store.engine.connect() as c:
        dump = repr([tuple(r) for t in ("api_keys", "audit_log") for r in c.execute(text(f"select * from {t}"))])
    assert random_part not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump  # the hash is what is kept
    if db_url.startswith("sqlite"):
        store.engine.dispose()
        files = list(Path(tmp_path).glob("registry.db*"))  # the database, its WAL and shared memory
        blob = b"".join(p.read_bytes() for p in files)
        assert info.key_id.encode() in blob
        assert random_part.encode() not in blob and secret.encode() not in blob


def test_schema_migrates_both_ways(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    try:
        migrate(engine)
        assert current_revision(engine) == "0004"
        from alembic import command

        from modelserve.registry.db import _alembic_config

        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "0003")
        with engine.connect() as c:
            tables = {r[0] for r in c.execute(text("select name from sqlite_master where type='table'"))}
        assert "api_keys" not in tables and "audit_log" not in tables and "payload_log" in tables
        migrate(engine)
        assert current_revision(engine) == "0004"
    finally:
        engine.dispose()


# -- authentication matrix ---------------------------------------------------------------------------


@pytest.fixture
def keyed(sqlite_store):
    """An Authenticator over API keys only, with one key of each role."""
    secrets_ = {role: sqlite_store.create(f"k-{role}", role, ["resnet*"], created_by="t")[0] for role in Role}
    return Authenticator(KeyCache(sqlite_store)), secrets_


def test_authentication_matrix_for_api_keys(keyed):
    auth, secrets_ = keyed
    good = secrets_[Role.READER]
    key_id = good.split("_")[1]
    wrong_secret = f"ms_{key_id}_{'A' * 43}"
    unknown_id = f"ms_zzzzzzzz_{good[12:]}"
    cases = {
        None: "missing credentials",
        "": "missing credentials",
        "   ": "missing credentials",
        "Bearer": "missing credentials",
        "Bearer   ": "missing credentials",
        f"Basic {base64.b64encode(b'user:pass').decode()}": "unsupported authorization scheme",
        f"Token {good}": "unsupported authorization scheme",
        "Bearer ms_": "malformed API key",
        f"Bearer {good[:-1]}": "malformed API key",
        f"Bearer {good}x": "malformed API key",
        f"Bearer {good.upper()}": "invalid API key",  # not ms_…, and no JWTs configured
        f"Bearer {wrong_secret}": "invalid API key",
        f"Bearer {unknown_id}": "invalid API key",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig": "invalid API key",  # a JWT where none is configured
    }
    for header, expected in cases.items():
        message = refused(lambda h=header: auth.authenticate(h), expected)
        assert good[12:] not in message and (header is None or header.strip() in ("", "Bearer") or
                                             header.split(" ", 1)[-1] not in message)
    # unknown id and wrong secret read alike: ids cannot be probed
    assert refused(lambda: auth.authenticate(f"Bearer {wrong_secret}")) == \
        refused(lambda: auth.authenticate(f"Bearer {unknown_id}"))
    for role, secret in secrets_.items():
        for header in (f"Bearer {secret}", f"bearer  {secret} ", f"BEARER {secret}"):
            p = auth.authenticate(header)
            assert (p.name, p.role, p.models, p.source) == (f"k-{role}", role, ("resnet*",), "key")
    # gRPC sends the same value in the "authorization" metadata key
    assert auth.authenticate_metadata([("x-request-id", "1"), ("authorization", f"Bearer {good}")]).role is Role.READER
    refused(lambda: auth.authenticate_metadata([("x-request-id", "1")]), "missing credentials")
    refused(lambda: auth.authenticate_metadata(None), "missing credentials")


def test_authentication_is_microseconds(keyed):
    auth, secrets_ = keyed
    header = f"Bearer {secrets_[Role.READER]}"
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        auth.authenticate(header)
    per_call = (time.perf_counter() - start) / n
    # about 2 µs on one core of the dev machine (regex, sha256, dict lookup, compare_digest); a loose bound
    # for a shared CI machine
    assert per_call < 200e-6, per_call


def test_refresher_makes_revocation_effective_within_seconds(sqlite_store, caplog):
    secret, _ = sqlite_store.create("short-lived", "reader", created_by="t")
    auth = Authenticator(KeyCache(sqlite_store))
    assert auth.authenticate(f"Bearer {secret}").name == "short-lived"
    refresher = auth.start_refresher(interval_s=0.05)
    try:
        sqlite_store.revoke("short-lived", by="t")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                auth.authenticate(f"Bearer {secret}")
            except Unauthenticated:
                break
            time.sleep(0.02)
        else:
            pytest.fail("revocation not effective within 2 s")
    finally:
        refresher.stop()

    # a database that cannot be read: logged once, the last snapshot keeps serving
    from sqlalchemy.exc import OperationalError

    keep, _ = sqlite_store.create("keep", "reader", created_by="t")
    auth.refresh()
    calls = []

    def broken():
        calls.append(1)
        raise OperationalError("select", {}, Exception("database is unreachable"))

    auth.key_cache.store.change_token = broken
    with caplog.at_level(logging.WARNING, logger="modelserve.security.keys"):
        refresher = auth.start_refresher(interval_s=0.02)
        try:
            while len(calls) < 4:
                time.sleep(0.02)
        finally:
            refresher.stop()
    assert auth.authenticate(f"Bearer {keep}").name == "keep"
    assert caplog.text.count("credential refresh failed") == 1 and "unreachable" in caplog.text


# -- JWT ---------------------------------------------------------------------------------------------


def _verifier(**kw) -> JwtVerifier:
    return JwtVerifier(audience="modelserve", issuer="https://idp.example", **kw)


def test_jwt_hs256_rs256_es256(rsa_key, ec_key):
    cases = [
        (_verifier(secret=HS_SECRET), HS_SECRET, "HS256"),
        (_verifier(public_key_pem=_pem(rsa_key.public_key())), rsa_key, "RS256"),
        (_verifier(public_key_pem=_pem(ec_key.public_key()).decode()), ec_key, "ES256"),
    ]
    for verifier, key, alg in cases:
        assert verifier.algorithms == [alg]
        assert HS_SECRET not in repr(verifier)
        auth = Authenticator(None, verifier)
        p = auth.authenticate(f"Bearer {pyjwt.encode(claims(), key, algorithm=alg)}")
        assert (p.name, p.role, p.models, p.source) == ("alice", Role.OPERATOR, ("resnet*",), "jwt")

        def check(token_claims, *fragments, **headers):
            token = pyjwt.encode(token_claims, key, algorithm=alg, headers=headers or None)
            message = refused(lambda: auth.authenticate(f"Bearer {token}"), *fragments)
            assert token not in message

        now = int(time.time())
        check(claims(exp=now - 120), "expired")  # past the 30 s leeway
        assert auth.authenticate(f"Bearer {pyjwt.encode(claims(exp=now - 10), key, algorithm=alg)}")  # within it
        check(claims(nbf=now + 600), "not yet valid")
        check(claims(aud="someone-else"), "audience")
        check(claims(aud=None), "'aud'")
        check(claims(iss="https://evil.example"), "issuer")
        check(claims(exp=None), "'exp'")
        check(claims(sub=None), "'sub'")
        check(claims(role=None), "no known role")
        check(claims(role="superuser"), "no known role")
        check(claims(models={"a": 1}), "model globs")
        refused(lambda: auth.authenticate("Bearer not.a.jwt"), "malformed token")
        # an API key is not looked for where only JWTs are configured
        refused(lambda: auth.authenticate(f"Bearer ms_abcdefgh_{'A' * 43}"), "not accepted")

    # a signature by another key of the same kind
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(lambda: cases[1][0].verify(pyjwt.encode(claims(), other, algorithm="RS256")), "signature")
    refused(lambda: cases[0][0].verify(pyjwt.encode(claims(), HS_SECRET[::-1], algorithm="HS256")), "signature")
    # an algorithm other than the key's pinned one, even a valid one for another verifier
    refused(lambda: cases[1][0].verify(pyjwt.encode(claims(), ec_key, algorithm="ES256")), "expected RS256")
    refused(lambda: cases[0][0].verify(pyjwt.encode(claims(), rsa_key, algorithm="RS256")), "expected HS256")
    refused(lambda: cases[1][0].verify(pyjwt.encode(claims(), rsa_key, algorithm="RS512")), "expected RS256")


def test_jwt_algorithm_confusion_and_none_are_refused(rsa_key, ec_key):
    for key in (rsa_key, ec_key):
        pem = _pem(key.public_key())
        verifier = _verifier(public_key_pem=pem)
        # the classic attack: HS256 MACed with the public key (which the attacker has) as the secret
        confused = forge({"alg": "HS256", "typ": "JWT"}, claims(role="admin"),
                         lambda m, pem=pem: hmac.new(pem, m, hashlib.sha256).digest())
        refused(lambda v=verifier, t=confused: v.verify(t), "algorithm not accepted")
        for none in ("none", "None", "NONE"):
            unsigned = forge({"alg": none, "typ": "JWT"}, claims(role="admin"))
            refused(lambda v=verifier, t=unsigned: v.verify(t), "algorithm not accepted")
    hs = _verifier(secret=HS_SECRET)
    refused(lambda: hs.verify(forge({"alg": "none"}, claims(role="admin"))), "algorithm not accepted")
    refused(lambda: hs.verify(forge({"typ": "JWT"}, claims(role="admin"))), "algorithm not accepted")  # no alg


def test_jwt_configuration_is_checked(rsa_key, ec_key, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        JwtVerifier()
    with pytest.raises(ValueError, match="exactly one"):
        JwtVerifier(secret=HS_SECRET, public_key_pem=_pem(rsa_key.public_key()))
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtVerifier(secret="short")
    with pytest.raises(ValueError, match="PEM"):  # a public key handed over as an HMAC secret
        JwtVerifier(secret=_pem(rsa_key.public_key()))
    private_pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    with pytest.raises(ValueError, match="private key"):
        JwtVerifier(public_key_pem=private_pem)
    with pytest.raises(ValueError, match="P-256"):
        JwtVerifier(public_key_pem=_pem(ec.generate_private_key(ec.SECP384R1()).public_key()))
    jwks = tmp_path / "oct.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": b64(b"x" * 32), "kid": "s"}]}))
    with pytest.raises(ValueError, match="only RSA and EC"):
        JwtVerifier(jwks_file=jwks)
    jwks.write_text("{not json")
    with pytest.raises(ValueError, match="JWKS file"):
        JwtVerifier(jwks_file=jwks)


def _jwk(public_key, kid: str | None, **extra) -> dict:
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    algorithm = RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(public_key))
    if kid:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def test_jwt_jwks_selects_by_kid_and_reloads(rsa_key, ec_key, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(rsa_key.public_key(), "r1", use="sig"),
                                         _jwk(ec_key.public_key(), "e1", alg="ES256")]}))
    verifier = _verifier(jwks_file=path)
    assert verifier.algorithms == ["ES256", "RS256"]
    assert verifier.verify(pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})).name == "alice"
    es_token = pyjwt.encode(claims(sub="bob"), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert verifier.verify(es_token).name == "bob"
    refused(lambda: verifier.verify(pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r2"})),
            "unknown key id")
    refused(lambda: verifier.verify(pyjwt.encode(claims(), rsa_key, algorithm="RS256")), "no 'kid'")
    # the kid of the RSA key with an ES256 token: the key's algorithm wins
    refused(lambda: verifier.verify(pyjwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "r1"})),
            "expected RS256")
    forged = forge({"alg": "HS256", "kid": "r1"}, claims(role="admin"),
                   lambda m: hmac.new(_pem(rsa_key.public_key()), m, hashlib.sha256).digest())
    refused(lambda: verifier.verify(forged), "algorithm not accepted")

    # key rotation: the file changes, refresh() picks it up
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert verifier.refresh() is False
    path.write_text(json.dumps({"keys": [_jwk(rotated.public_key(), None)]}))
    import os

    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert verifier.refresh() is True
    # a set of one key also takes a token without kid
    assert verifier.verify(pyjwt.encode(claims(), rotated, algorithm="RS256")).name == "alice"
    refused(lambda: verifier.verify(pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})),
            "unknown key id")


def test_jwt_claims_to_principal():
    v = JwtVerifier(secret=HS_SECRET, role_claim="realm_access.roles", models_claim="scope_models")

    def principal(**c):
        now = int(time.time())
        return v.verify(pyjwt.encode({"sub": "svc", "exp": now + 60, **c}, HS_SECRET, algorithm="HS256"))

    # a list of roles (an IdP's groups): the highest known one counts, unknown ones are ignored
    p = principal(realm_access={"roles": ["offline_access", "reader", "operator"]})
    assert (p.role, p.models) == (Role.OPERATOR, ("*",))  # no models claim: every model (like a key)
    assert principal(realm_access={"roles": "ADMIN"}, scope_models="a*, b").models == ("a*", "b")
    assert principal(realm_access={"roles": ["reader"]}, scope_models=[]).models == ()
    refused(lambda: principal(realm_access={"roles": ["offline_access"]}), "no known role")
    refused(lambda: principal(role="admin"), "no known role")  # the configured path is the one read


# -- Authenticator routing ---------------------------------------------------------------------------


def test_authenticator_routes_keys_and_jwts(sqlite_store, rsa_key):
    secret, _ = sqlite_store.create("svc", "reader", created_by="t")
    auth = Authenticator(KeyCache(sqlite_store), _verifier(public_key_pem=_pem(rsa_key.public_key())))
    assert auth.authenticate(f"Bearer {secret}").source == "key"
    assert auth.authenticate(f"Bearer {pyjwt.encode(claims(), rsa_key, algorithm='RS256')}").source == "jwt"
    refused(lambda: auth.authenticate("Bearer ms_broken"), "malformed API key")
    refused(lambda: auth.authenticate("Bearer something-else"), "malformed token")
    with pytest.raises(ValueError):
        Authenticator(None, None)


# -- authorization matrix ----------------------------------------------------------------------------

EXPECTED_MIN_ROLE = {
    Action.READ_METADATA: Role.READER, Action.INFER: Role.READER, Action.READ_METRICS: Role.READER,
    Action.FEEDBACK: Role.OPERATOR, Action.LOAD_UNLOAD: Role.OPERATOR, Action.MOVE_ALIAS: Role.OPERATOR,
    Action.REGISTER: Role.OPERATOR, Action.READ_LOGS: Role.OPERATOR,
    Action.MOVE_PROTECTED_ALIAS: Role.ADMIN, Action.DELETE: Role.ADMIN, Action.MANAGE_KEYS: Role.ADMIN,
    Action.READ_AUDIT: Role.ADMIN,
}


def allowed(principal, action, model=None) -> bool:
    try:
        authorize(principal, action, model)
    except PermissionDenied as exc:
        assert (exc.http_status, exc.grpc_code) == (403, "PERMISSION_DENIED")
        return False
    return True


def test_roles_are_ordered():
    assert Role.READER < Role.OPERATOR < Role.ADMIN
    assert Role.parse("Operator") is Role.OPERATOR and str(Role.ADMIN) == "admin"
    assert {a: a.min_role for a in Action} == EXPECTED_MIN_ROLE


@pytest.mark.parametrize("role", list(Role), ids=str)
def test_authorization_matrix(role):
    everywhere = Principal("all", role, ("*",))
    scoped = Principal("scoped", role, ("resnet*", "bert"))
    for action in Action:
        may = role >= action.min_role
        assert allowed(everywhere, action) == may, action
        assert allowed(everywhere, action, "anything") == may, action
        if action.global_scope:  # across every model: a scoped credential never may
            assert not allowed(scoped, action) and not allowed(scoped, action, "resnet50")
            continue
        for model, inside in (("resnet50", True), ("bert", True), ("bert-large", False), ("gpt", False),
                              ("RESNET50", False)):
            assert allowed(scoped, action, model) == (may and inside), (action, model)
        assert allowed(scoped, action) == may  # a listing: the caller filters it


def test_out_of_scope_does_not_reveal_existence():
    """authorize never looks a model up; its refusal reads the same for a model that exists and one
    that does not (only the name the caller sent differs)."""
    scoped = Principal("ci", Role.ADMIN, ("public-*",))
    existing, missing = "secret-model", "no-such-model"
    messages = []
    for model in (existing, missing):
        with pytest.raises(PermissionDenied) as info:
            authorize(scoped, Action.INFER, model)
        assert info.value.message == out_of_scope_message(model)
        messages.append(info.value.message.replace(model, "<model>"))
    assert messages[0] == messages[1]
    assert "exist" not in messages[0] and "not found" not in messages[0]
    assert scoped.filter_models(["public-a", existing, "public-b"]) == ["public-a", "public-b"]
    assert Principal("x", Role.READER, ("[ab]*",)).filter_models(["a1", "b2", "c3"]) == ["a1", "b2"]
    assert Principal("x", Role.READER, ()).filter_models(["a"]) == []
    assert Principal.anonymous().unrestricted and Principal.anonymous().role is Role.ADMIN


def test_role_refusal_names_what_is_needed():
    with pytest.raises(PermissionDenied, match="role reader may not load or unload models .needs operator."):
        authorize(Principal("r", Role.READER), Action.LOAD_UNLOAD, "m")
    with pytest.raises(PermissionDenied, match="limited to some models may not manage API keys"):
        authorize(Principal("a", Role.ADMIN, ("m*",)), Action.MANAGE_KEYS)


def test_expiry_and_since_parsing():
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_expiry("30d", now) == now + timedelta(days=30)
    assert parse_expiry("12h", now) == now + timedelta(hours=12)
    assert parse_expiry("2w", now) == now + timedelta(weeks=2)
    assert parse_expiry("2031-02-03", now) == datetime(2031, 2, 3, tzinfo=UTC)
    assert parse_expiry("2031-02-03T04:05:06+02:00", now) == datetime(2031, 2, 3, 2, 5, 6, tzinfo=UTC)
    assert parse_expiry(None) is None and parse_expiry("never") is None
    assert parse_since("7d", now) == now - timedelta(days=7)
    for bad in ("0d", "tomorrow", "30x"):
        with pytest.raises(InvalidInput):
            parse_expiry(bad, now)


# -- CLI ---------------------------------------------------------------------------------------------

runner = CliRunner()
ENV = {"COLUMNS": "200", "MODELSERVE_REGISTRY_ACTOR": "tester", "MODELSERVE_REGISTRY_URL": None}


def cli(url: str, *args: str, code: int = 0):
    result = runner.invoke(app, [*args, "--registry", url], env=ENV)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if code:
        assert isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_keys_and_audit(tmp_path):
    url = f"sqlite:///{tmp_path}/reg/registry.db"
    r = cli(url, "keys", "create", "--name", "ci", "--role", "reader", "--models", "resnet*,bert", "--expires", "30d")
    secret = r.stdout.strip()
    assert secret.startswith("ms_") and "\n" not in secret  # alone on stdout: KEY=$(modelserve keys create …)
    assert "cannot be shown again" in r.stderr and secret not in r.stderr

    created = json.loads(cli(url, "keys", "create", "--name", "deploy", "--role", "operator", "--json").stdout)
    assert created["secret"].startswith(f"ms_{created['key']['key_id']}_")
    assert created["key"]["models"] == ["*"] and created["key"]["created_by"] == "tester"

    with KeyStore.open(url) as store:  # the secrets printed are the ones that work
        cache = KeyCache(store)
        assert cache.verify(secret).models == ("resnet*", "bert")
        assert cache.verify(created["secret"]).role is Role.OPERATOR

    listed = json.loads(cli(url, "keys", "list", "--json").stdout)
    assert [(k["name"], k["role"], k["status"]) for k in listed] == [("ci", "reader", "active"),
                                                                     ("deploy", "operator", "active")]
    assert listed[0]["expires_at"] and all("secret" not in json.dumps(k) for k in listed)
    table = cli(url, "keys", "list").stdout
    assert "ci" in table and "resnet*, bert" in table and secret[12:] not in table

    cli(url, "keys", "create", "--name", "ci", "--role", "reader", code=1)  # the name is taken
    cli(url, "keys", "create", "--name", "x", "--role", "root", code=2)
    cli(url, "keys", "create", "--name", "x", "--role", "reader", "--expires", "soon", code=2)
    revoked = json.loads(cli(url, "keys", "revoke", "ci", "--json").stdout)
    assert (revoked["status"], revoked["revoked_by"]) == ("revoked", "tester")
    assert "revoked API key deploy" in cli(url, "keys", "revoke", created["key"]["key_id"]).stdout
    assert "already revoked" in cli(url, "keys", "revoke", "ci", code=1).output
    assert "no API key" in cli(url, "keys", "revoke", "ghost", code=1).output
    assert json.loads(cli(url, "keys", "list", "--active", "--json").stdout) == []

    audit = json.loads(cli(url, "audit", "--json").stdout)
    assert [(e["actor"], e["action"], e["target"], e["client"]) for e in audit] == [
        ("tester", "key.create", "ci", "cli"), ("tester", "key.create", "deploy", "cli"),
        ("tester", "key.revoke", "ci", "cli"), ("tester", "key.revoke", "deploy", "cli")]
    assert len(json.loads(cli(url, "audit", "--since", "1h", "--actor", "tester", "--json").stdout)) == 4
    assert json.loads(cli(url, "audit", "--actor", "someone", "--json").stdout) == []
    assert len(json.loads(cli(url, "audit", "--action", "key.revoke", "--json").stdout)) == 2
    text_out = cli(url, "audit", "--limit", "2").stdout
    assert "key.revoke" in text_out and "key.create" not in text_out
    cli(url, "audit", "--since", "yesterday", code=2)
    everything = "".join(cli(url, *a).output for a in (("audit",), ("keys", "list"), ("audit", "--json")))
    assert secret[12:] not in everything and created["secret"][12:] not in everything

    cli("postgresql+psycopg://nobody@127.0.0.1:1/none", "keys", "list", code=1)
