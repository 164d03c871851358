"""Start-up side of security: refuse an open server beyond loopback, build the ``Access`` (API keys and/or
JWTs, with the refresher thread), and the TLS settings for uvicorn and grpc.

Every refusal prints ``error: …`` saying why and what to do, and exits 2 (``StartupRefused``); no secret
is ever printed (key files are named, never shown).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import sys
from pathlib import Path

from modelserve.settings import ServerSettings

log = logging.getLogger(__name__)


def refuse(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, ::, a name, an interface) is not."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_files(settings: ServerSettings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        refuse("TLS needs both --tls-cert and --tls-key")
    if settings.tls_client_ca and not settings.tls_cert:
        refuse("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", settings.tls_cert), ("--tls-key", settings.tls_key),
                       ("--tls-client-ca", settings.tls_client_ca), ("--jwt-secret-file", settings.jwt_secret_file),
                       ("--jwt-public-key", settings.jwt_public_key), ("--jwt-jwks", settings.jwt_jwks)):
        if path is not None and not Path(path).is_file():
            refuse(f"{flag} {path}: no such file")
    jwt_sources = [s for s in (settings.jwt_secret_file, settings.jwt_public_key, settings.jwt_jwks) if s]
    if "jwt" in settings.auth and len(jwt_sources) != 1:
        refuse(f"--auth {settings.auth} needs exactly one of --jwt-secret-file, --jwt-public-key, --jwt-jwks")
    if "jwt" not in settings.auth and jwt_sources:
        refuse(f"JWT options given with --auth {settings.auth}: use --auth jwt or --auth keys+jwt")


def check_exposure(settings: ServerSettings) -> None:
    """Refuse to listen beyond loopback with no way to tell callers apart, unless ``insecure``."""
    if settings.auth != "none" or settings.tls_client_ca or settings.insecure or is_loopback(settings.host):
        return
    refuse(f"refusing to listen on {settings.host} without authentication: anyone who can reach that address "
           "could run, load and unload models. Start with --auth keys (API keys: 'modelserve keys create'), "
           "--auth jwt (with --jwt-secret-file, --jwt-public-key or --jwt-jwks), or mutual TLS (--tls-client-ca); "
           "or, if the network is closed to others already, with --insecure.")


def build_access(settings: ServerSettings):
    """-> (``Access`` or None when authentication is off, the refresher thread or None)."""
    if settings.auth == "none":
        if settings.tls_client_ca:
            log.info("authentication: client certificates only (every client with a certificate from %s has "
                     "full access)", settings.tls_client_ca)
        elif not is_loopback(settings.host):
            log.warning("authentication is off on %s (--insecure): anyone who can reach it has full access",
                        settings.host)
        return None, None
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its info lines say nothing to an operator
    from modelserve.registry.db import safe_url
    from modelserve.security import Authenticator, JwtVerifier, KeyCache, KeyStore
    from modelserve.server.access import Access

    key_cache = verifier = None
    if "keys" in settings.auth:
        url = settings.keys_url()
        if url.startswith("sqlite:///") and not url.endswith(":memory:") \
                and not Path(url.removeprefix("sqlite:///")).is_file():
            refuse(f"--auth {settings.auth}: no API key database at {url} (create the first key with "
                   f"'modelserve keys create --registry {url} …', or point --keys-db at the database holding them)")
        try:
            store = KeyStore.open(url, client="server", upgrade=False)
            key_cache = KeyCache(store)
        except Exception as exc:  # noqa: BLE001 - say which database and why, exit 2
            first = str(getattr(exc, "orig", None) or exc).splitlines()[:1]
            refuse(f"cannot read API keys from {safe_url(url)}: {first[0][:300] if first else type(exc).__name__} "
                   "(create the first key with 'modelserve keys create --registry URL …', or point --keys-db "
                   "at the database holding them)")
        log.info("authentication: API keys from %s (%d keys)", safe_url(url), len(key_cache))
    if "jwt" in settings.auth:
        try:
            secret = None
            if settings.jwt_secret_file:
                secret = Path(settings.jwt_secret_file).read_bytes().strip()
            public = Path(settings.jwt_public_key).read_bytes() if settings.jwt_public_key else None
            verifier = JwtVerifier(secret=secret, public_key_pem=public, jwks_file=settings.jwt_jwks,
                                   audience=settings.jwt_audience, issuer=settings.jwt_issuer,
                                   role_claim=settings.jwt_role_claim, models_claim=settings.jwt_models_claim)
        except (ValueError, ImportError, OSError) as exc:
            refuse(f"JWT settings: {exc}")
        log.info("authentication: JWT %s", verifier)
    access = Access(Authenticator(key_cache, verifier), settings.metrics_auth)
    refresher = access.authenticator.start_refresher(settings.auth_refresh_s)
    return access, refresher


def stop_access(access, refresher) -> None:
    """On shutdown: stop the refresher, write the keys' last-used times, close the key database."""
    if refresher is not None:
        refresher.stop()
    cache = access.authenticator.key_cache if access is not None else None
    if cache is not None:
        try:
            cache.flush_last_used()
        except Exception as exc:  # noqa: BLE001 - shutting down: say so, go on
            log.warning("could not record the keys' last use: %s", type(exc).__name__)
        cache.store.close()


def uvicorn_tls(settings: ServerSettings) -> dict:
    """``uvicorn.Config`` keyword arguments for TLS (empty when off)."""
    if not settings.tls_cert:
        return {}
    kwargs = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca:
        kwargs.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def grpc_credentials(settings: ServerSettings):
    """``grpc.ssl_server_credentials`` for TLS (mutual with a client CA), or None when off."""
    if not settings.tls_cert:
        return None
    import grpc

    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def check_tls(settings: ServerSettings) -> None:
    """Load the certificate and key once at start, so a bad file is a clear error, not a dead listener."""
    if not settings.tls_cert:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except (ssl.SSLError, OSError) as exc:
        refuse(f"--tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: cannot load them ({exc})")
    if settings.tls_client_ca:
        try:
            context.load_verify_locations(str(settings.tls_client_ca))
        except (ssl.SSLError, OSError) as exc:
            refuse(f"--tls-client-ca {settings.tls_client_ca}: cannot load it ({exc})")


def ready_suffix(settings: ServerSettings) -> str:
    """What the ready line adds: `` tls=on`` / `` tls=mutual`` and `` auth=…`` when they are on."""
    part = ""
    if settings.tls_cert:
        part += " tls=mutual" if settings.tls_client_ca else " tls=on"
    if settings.auth != "none":
        part += f" auth={settings.auth}"
    return part
