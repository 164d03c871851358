"""Bearer JWTs from an identity provider -> ``Principal`` (PyJWT; the ``auth`` extra).

One key source, and the algorithm is pinned by the key, never taken from the token:

- ``secret``: HS256 (at least 32 bytes, RFC 7518 §3.2);
- ``public_key_pem``: an RSA key -> RS256, an EC P-256 key -> ES256;
- ``jwks_file``: a JSON Web Key Set on disk (RSA and EC P-256 keys; symmetric ``oct`` keys are refused);
  the token's ``kid`` picks the key (a set of one key also takes a token without ``kid``).
  ``refresh()`` re-reads the file when it changed (the server's refresher calls it).

So ``alg: none`` is never accepted, and neither is the classic confusion attack (an HS256 token MACed
with the public key as the secret): the token's ``alg`` header must equal the key's pinned algorithm
before anything else is looked at.

Claims: ``sub`` is the principal's name; ``exp`` is required (a token without one would never lapse);
``aud`` / ``iss`` are checked when configured; ``leeway_s`` allows clock skew.
``role_claim`` (a dotted path is followed into objects, e.g. ``realm_access.roles``) holds a role name,
or a list of names of which the highest known one counts. A token without a known role is refused
(``Unauthenticated``), never let in with a guessed least privilege: a token that grants nothing is a
misconfiguration that should show, not a reader key nobody asked for. ``models_claim`` holds a list of
globs or one comma-separated string; when absent, ``default_models`` (every model, like a key created
without ``--models``): the role still bounds what the caller may do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelserve.errors import Unauthenticated
from modelserve.security.principal import ALL_MODELS, Principal, Role

MIN_HMAC_SECRET = 32


def _require_pyjwt():
    try:
        import jwt
    except ImportError as exc:  # pragma: no cover - the extra is in dev
        raise ImportError("JWT validation needs PyJWT: pip install 'modelserve[auth]'") from exc
    return jwt


@dataclass(frozen=True)
class _Key:
    key: Any
    algorithm: str


def _algorithm_for(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA key of {key.key_size} bits: at least 2048 are needed")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC key on {key.curve.name}: ES256 needs P-256 (secp256r1)")
        return "ES256"
    raise ValueError(f"unsupported public key type {type(key).__name__}: use an RSA or an EC P-256 key")


def _load_pem(pem: str | bytes) -> _Key:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY" in data:
        raise ValueError("public_key_pem holds a private key: give the public key only")
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"public_key_pem is not a PEM public key ({exc})") from None
    return _Key(key, _algorithm_for(key))


def _load_jwks(path: Path) -> dict[str | None, _Key]:
    jwt = _require_pyjwt()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"JWKS file {path}: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"JWKS file {path}: expected {{\"keys\": [...]}} with at least one key")
    keys: dict[str | None, _Key] = {}
    for i, jwk in enumerate(entries):
        if not isinstance(jwk, dict):
            raise ValueError(f"JWKS file {path}: key {i} is not an object")
        if jwk.get("kty") not in ("RSA", "EC"):
            raise ValueError(f"JWKS file {path}: key {i} has kty {jwk.get('kty')!r}; only RSA and EC public "
                             "keys are accepted")
        if "d" in jwk:
            raise ValueError(f"JWKS file {path}: key {i} is a private key; publish public keys only")
        if jwk.get("use") not in (None, "sig"):
            continue  # an encryption key: not ours to verify with
        try:
            key = jwt.PyJWK(jwk).key
        except jwt.PyJWTError as exc:
            raise ValueError(f"JWKS file {path}: key {i}: {exc}") from None
        algorithm = _algorithm_for(key)
        if jwk.get("alg") not in (None, algorithm):
            raise ValueError(f"JWKS file {path}: key {i} says alg {jwk.get('alg')!r} but is a {algorithm} key")
        kid = jwk.get("kid")
        if kid in keys:
            raise ValueError(f"JWKS file {path}: two keys with kid {kid!r}")
        keys[kid] = _Key(key, algorithm)
    if not keys:
        raise ValueError(f"JWKS file {path}: no signing keys")
    return keys


def _claim(claims: dict, path: str):
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class JwtVerifier:
    """Verify a bearer JWT and map its claims to a ``Principal`` (``source="jwt"``)."""

    def __init__(self, secret: str | bytes | None = None, public_key_pem: str | bytes | None = None,
                 jwks_file: str | os.PathLike | None = None, audience: str | Iterable[str] | None = None,
                 issuer: str | None = None, role_claim: str = "role", models_claim: str = "models",
                 leeway_s: float = 30, default_models: tuple[str, ...] = ALL_MODELS):
        self._jwt = _require_pyjwt()
        if sum(x is not None for x in (secret, public_key_pem, jwks_file)) != 1:
            raise ValueError("give exactly one of secret (HS256), public_key_pem (RS256/ES256) or jwks_file")
        self.audience = audience if audience is None or isinstance(audience, str) else list(audience)
        self.issuer = issuer
        self.role_claim = role_claim
        self.models_claim = models_claim
        self.leeway_s = leeway_s
        self.default_models = tuple(default_models)
        self.jwks_file = Path(jwks_file) if jwks_file is not None else None
        self._jwks_stamp: tuple | None = None
        self._keys: dict[str | None, _Key]
        if secret is not None:
            raw = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(raw) < MIN_HMAC_SECRET:
                raise ValueError(f"the HS256 secret must be at least {MIN_HMAC_SECRET} bytes")
            if b"-----BEGIN" in raw:
                raise ValueError("the HS256 secret looks like a PEM key: pass it as public_key_pem")
            self._keys = {None: _Key(raw, "HS256")}
        elif public_key_pem is not None:
            self._keys = {None: _load_pem(public_key_pem)}
        else:
            self._keys = _load_jwks(self.jwks_file)
            self._jwks_stamp = self._stamp()

    def __repr__(self) -> str:  # never the secret
        kinds = sorted({k.algorithm for k in self._keys.values()})
        return (f"JwtVerifier(algorithms={kinds}, keys={len(self._keys)}, audience={self.audience!r}, "
                f"issuer={self.issuer!r})")

    @property
    def algorithms(self) -> list[str]:
        return sorted({k.algorithm for k in self._keys.values()})

    def _stamp(self) -> tuple | None:
        try:
            st = self.jwks_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> bool:
        """Re-read the JWKS file when it changed (key rotation); True when the keys were replaced.
        A file that no longer parses raises ``ValueError`` and the old keys stay."""
        if self.jwks_file is None:
            return False
        stamp = self._stamp()
        if stamp is None or stamp == self._jwks_stamp:
            return False
        self._keys = _load_jwks(self.jwks_file)
        self._jwks_stamp = stamp
        return True

    def _select(self, header: dict) -> _Key:
        keys = self._keys
        if None in keys and len(keys) == 1 and self.jwks_file is None:
            return keys[None]
        kid = header.get("kid")
        if kid is None:
            if len(keys) == 1:
                return next(iter(keys.values()))
            raise Unauthenticated("token has no 'kid' header and the key set has several keys")
        if not isinstance(kid, str) or kid not in keys:
            raise Unauthenticated("token signed with an unknown key id")
        return keys[kid]

    def verify(self, token: str) -> Principal:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        key = self._select(header)
        if header.get("alg") != key.algorithm:
            raise Unauthenticated(f"token algorithm not accepted (expected {key.algorithm})")
        options = {"require": ["exp", "sub"] + (["aud"] if self.audience is not None else [])
                   + (["iss"] if self.issuer is not None else [])}
        try:
            claims = jwt.decode(token, key.key, algorithms=[key.algorithm], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway_s, options=options)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature invalid") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        return self.principal(claims)

    def principal(self, claims: dict) -> Principal:
        """Verified claims -> Principal (``Unauthenticated`` when they grant no known role)."""
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise Unauthenticated("token 'sub' claim must be a non-empty string")
        role = self._role(_claim(claims, self.role_claim))
        if role is None:
            raise Unauthenticated(f"token grants no known role (claim {self.role_claim!r}: reader, operator or admin)")
        models = _claim(claims, self.models_claim)
        if models is None:
            globs = self.default_models
        elif isinstance(models, str):
            globs = tuple(g.strip() for g in models.split(",") if g.strip())
        elif isinstance(models, list) and all(isinstance(g, str) for g in models):
            globs = tuple(g.strip() for g in models if g.strip())
        else:
            raise Unauthenticated(f"token claim {self.models_claim!r} must be a list of model globs")
        return Principal(sub[:200], role, globs, "jwt")

    @staticmethod
    def _role(value) -> Role | None:
        names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        known = [Role[n.strip().upper()] for n in names
                 if isinstance(n, str) and n.strip().upper() in Role.__members__]
        return max(known) if known else None
