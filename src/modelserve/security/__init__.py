"""Identity and access: API keys and JWTs -> ``Principal``; roles and model scopes -> ``authorize``.

    from modelserve.security import Authenticator, KeyCache, KeyStore, Action, authorize
    store = KeyStore.open("sqlite:///modelserve-registry/registry.db")
    secret, info = store.create("ci", "reader", models=["resnet*"], created_by="alice")  # shown once
    auth = Authenticator(KeyCache(store))
    refresher = auth.start_refresher(2.0)          # revocations take effect within ~2 s
    principal = auth.authenticate(request.headers.get("authorization"))   # Unauthenticated -> 401
    authorize(principal, Action.INFER, model)      # PermissionDenied -> 403, before any model lookup

``JwtVerifier`` needs the ``auth`` extra (PyJWT) when constructed; API keys alone need nothing more.
"""

from modelserve.security.auth import Authenticator
from modelserve.security.jwt import JwtVerifier
from modelserve.security.keys import (
    AuditEntry,
    KeyCache,
    KeyInfo,
    KeyNotFound,
    KeyStore,
    Refresher,
    parse_expiry,
    parse_since,
)
from modelserve.security.principal import ALL_MODELS, Action, Principal, Role, authorize

__all__ = ["ALL_MODELS", "Action", "AuditEntry", "Authenticator", "JwtVerifier", "KeyCache", "KeyInfo",
           "KeyNotFound", "KeyStore", "Principal", "Refresher", "Role", "authorize", "parse_expiry",
           "parse_since"]

