"""Server settings: one pydantic model, filled from CLI flags, ``MODELSERVE_*`` variables or defaults."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


DEFAULT_MONITOR_DIR = Path("modelserve-monitor")
DEFAULT_MONITOR_DB = f"sqlite:///{DEFAULT_MONITOR_DIR}/monitor.db"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_", extra="forbid")

    model_repository: Path = Path("models")
    host: str = "127.0.0.1"
    #: 0 picks a free port; the chosen one is printed
    http_port: int = 8000
    #: 0 picks a free port, -1 turns gRPC off
    grpc_port: int = 8001
    #: a port of its own for ``GET /metrics`` (it is on the HTTP port either way): 0 picks a free one, -1 = none
    metrics_port: int = -1
    model_control_mode: Literal["none", "explicit", "poll"] = "none"
    #: models loaded at start in explicit mode
    load_models: list[str] = []
    poll_interval_s: float = 2.0
    #: largest request body accepted, after decompression (HTTP and gRPC)
    max_request_bytes: int = 256 * 1024 * 1024
    #: ONNX Runtime intra-op threads for models whose config does not say (0 = ORT's default)
    ort_threads: int = 0
    #: how long SIGTERM waits for in-flight requests before closing
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    #: GIL switch interval: inference threads wait up to this long to hand results back to a busy loop
    switch_interval_s: float = 0.0005
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    #: registry database URL: serve what ``alias`` points at instead of scanning ``model_repository``
    registry: str | None = None
    alias: str = "production"
    #: seconds between checks of the registry for alias moves
    registry_poll_s: float = 2.0
    #: artifact store URL; default: ``RegistrySettings`` (``MODELSERVE_REGISTRY_ARTIFACTS`` or beside the SQLite file)
    registry_artifacts: str | None = None
    #: where fetched artifacts are kept (<cache>/<model>/<version>/<file>); default: one folder per registry
    #: under ``$XDG_CACHE_HOME/modelserve`` (``~/.cache/modelserve``)
    registry_cache: Path | None = None
    #: the payload log (every request and response, to a database) on or off for every model
    payload_log: bool = True
    #: payload log / feedback database URL; default: the registry's with ``registry``, else ``DEFAULT_MONITOR_DB``
    monitor_db: str | None = None
    #: where log records wait while that database is down or slow (JSON lines, replayed when it is back)
    monitor_spill: Path = DEFAULT_MONITOR_DIR / "spill.jsonl"
    #: how many feedback rows per model version the quality metrics look back over
    quality_window: int = 1000
    #: payload-log records waiting for the writer process at most (in the ring, not yet stored): past them new
    #: records are dropped and counted rather than the writer falling further behind
    monitor_max_buffer: int = 200_000
    #: the payload log's shared-memory ring (MiB): a bound on the bytes waiting too; only the pages a backlog
    #: needs are touched (the ring starts over at its beginning whenever the writer has caught up)
    monitor_buffer_mb: int = 256
    #: this process's name among several serving the same models: a ``replica`` label on every metric series
    #: (Ray Serve replicas set their replica id, Kubernetes pods their pod name); None: no such label
    replica: str | None = None

    # -- security (no secret is ever a setting: secrets stay in files, settings name the files) --
    #: who may call: none, keys (API keys in ``keys_db``), jwt (bearer JWTs), keys+jwt (either)
    auth: Literal["none", "keys", "jwt", "keys+jwt"] = "none"
    #: database holding the API keys (``modelserve keys create``); default: ``registry``, else the
    #: registry settings' URL (``MODELSERVE_REGISTRY_URL``, else the embedded SQLite registry)
    keys_db: str | None = None
    #: seconds between reloads of changed keys (and a changed JWKS file): a revocation takes effect within it
    auth_refresh_s: float = 2.0
    #: JWT: exactly one key source: a file holding the HS256 secret (>= 32 bytes), a PEM public key
    #: (RS256 / ES256), or a JWKS file (re-read when it changes)
    jwt_secret_file: Path | None = None
    jwt_public_key: Path | None = None
    jwt_jwks: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    #: claim holding the role (a dotted path into objects, e.g. realm_access.roles), and the model globs
    jwt_role_claim: str = "role"
    jwt_models_claim: str = "models"
    #: ``GET /metrics`` (and the metrics port) needs a credential allowed every model when auth is on
    metrics_auth: bool = True
    #: listen beyond loopback without authentication (refused otherwise)
    insecure: bool = False
    #: TLS for HTTP and gRPC: certificate chain and private key (PEM files)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: mutual TLS: clients must present a certificate signed by this CA (PEM)
    tls_client_ca: Path | None = None

    # -- limits (server/limits.py) --
    #: per caller (key name; client address with auth off): "RATE[:BURST]" inference requests a second; None: off
    rate_limit: str | None = None
    #: requests a model answers at once, for models whose config has no ``limits.max_inflight`` (0: no cap)
    max_inflight_per_model: int = 0
    #: seconds from the end of the request body to the answer before 504 (0: none); gRPC: or the client's deadline
    request_timeout_s: float = 60.0
    #: seconds a client may take to send the request body before 408 (0: none)
    body_timeout_s: float = 30.0

    def __repr_args__(self):  # URLs may carry a database password: never in a log line
        for name, value in super().__repr_args__():
            if name in ("registry", "monitor_db", "keys_db", "registry_artifacts") and isinstance(value, str):
                from modelserve.registry.db import safe_url

                value = safe_url(value)
            yield name, value

    def keys_url(self) -> str:
        return self.keys_db or self.registry or RegistrySettings().url

    def monitor_url(self) -> str:
        if self.monitor_db:
            return self.monitor_db
        return self.registry_settings().url if self.registry else DEFAULT_MONITOR_DB

    def registry_settings(self) -> RegistrySettings:
        """The registry to follow: ``registry`` and ``registry_artifacts`` over ``MODELSERVE_REGISTRY_*``."""
        given = {"url": self.registry, "artifacts": self.registry_artifacts}
        return RegistrySettings(**{k: v for k, v in given.items() if v})

    def cache_dir(self) -> Path:
        if self.registry_cache:
            return self.registry_cache
        rs = self.registry_settings()
        key = hashlib.sha256(f"{rs.url}\n{rs.artifacts_url()}".encode()).hexdigest()[:16]
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelserve" / f"registry-{key}"


DEFAULT_REGISTRY_DIR = Path("modelserve-registry")


class RegistrySettings(BaseSettings):
    """Where the registry lives: ``MODELSERVE_REGISTRY_URL``, ``MODELSERVE_REGISTRY_ARTIFACTS``, …

    Embedded by default (a SQLite file and an artifact folder under ``./modelserve-registry``);
    production by URL: ``postgresql+psycopg://user@host/db`` and ``s3://bucket/prefix``.
    """

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_REGISTRY_", extra="forbid")

    url: str = f"sqlite:///{DEFAULT_REGISTRY_DIR}/registry.db"
    #: artifact store URL; default: ``artifacts`` beside the SQLite file, else ./modelserve-registry/artifacts
    artifacts: str = ""
    #: fsspec options for the store (JSON in the environment), e.g. {"client_kwargs": {"endpoint_url": …}}
    storage_options: dict = {}
    #: who the history names for changes made from this process (default user@host)
    actor: str = ""

    def artifacts_url(self) -> str:
        if self.artifacts:
            return self.artifacts
        if self.url.startswith("sqlite:///") and not self.url.endswith(":memory:"):
            return str(Path(self.url.removeprefix("sqlite:///")).parent / "artifacts")
        return str(DEFAULT_REGISTRY_DIR / "artifacts")
