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
