"""``Authorization`` header -> ``Principal``: the one entry point the protocol adapters call.

``Bearer ms_…`` goes to the API keys (``KeyCache``, in memory), any other bearer token to the JWT
verifier when one is configured. gRPC sends the same string in the ``authorization`` metadata key
(``authenticate_metadata``). Pure CPU: an API key costs one regex match, one SHA-256 and one dict
lookup (a few microseconds); a JWT one signature check (HS256 tens of microseconds, RS256/ES256
about a hundred).

Health endpoints do not call this; /metrics does when the server protects it.
"""

from __future__ import annotations

from collections.abc import Iterable

from modelserve.errors import Unauthenticated
from modelserve.security.jwt import JwtVerifier
from modelserve.security.keys import PREFIX, KeyCache, Refresher
from modelserve.security.principal import Principal


class Authenticator:
    def __init__(self, key_cache: KeyCache | None, jwt_verifier: JwtVerifier | None = None):
        if key_cache is None and jwt_verifier is None:
            raise ValueError("an Authenticator needs API keys, a JWT verifier or both")
        self.key_cache = key_cache
        self.jwt_verifier = jwt_verifier

    def authenticate(self, authorization: str | None) -> Principal:
        """The ``Authorization`` header's value (``None`` when absent) -> Principal, or ``Unauthenticated``."""
        if authorization is None or not authorization.strip():
            raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("unsupported authorization scheme: send 'Authorization: Bearer <token>'")
        token = token.strip()
        if not token:
            raise Unauthenticated("missing credentials: the bearer token is empty")
        if token.startswith(PREFIX):
            if self.key_cache is None:
                raise Unauthenticated("API keys are not accepted by this server")
            return self.key_cache.verify(token)
        if self.jwt_verifier is not None:
            return self.jwt_verifier.verify(token)
        raise Unauthenticated("invalid API key")

    def authenticate_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """gRPC invocation metadata -> Principal (the ``authorization`` key; keys are lower-case in gRPC)."""
        for key, value in metadata or ():
            if key.lower() == "authorization":
                return self.authenticate(value.decode("latin-1") if isinstance(value, bytes) else value)
        return self.authenticate(None)

    def refresh(self) -> None:
        """Reload changed keys and a changed JWKS file (``Refresher`` calls this every ~2 s). Both are
        tried; the first failure is raised after (the old keys stay in force)."""
        failure: Exception | None = None
        for source in (self.key_cache, self.jwt_verifier):
            if source is None:
                continue
            try:
                source.refresh()
            except Exception as exc:  # noqa: BLE001 - re-raised below
                failure = failure or exc
        if failure is not None:
            raise failure

    def start_refresher(self, interval_s: float = 2.0) -> Refresher:
        """A running daemon thread calling ``refresh``; ``.stop()`` it on shutdown."""
        return Refresher(self.refresh, interval_s).start()
