"""Server settings: one pydantic model, filled from CLI flags, ``MODELSERVE_*`` variables or defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_", extra="forbid")

    model_repository: Path = Path("models")
    host: str = "127.0.0.1"
    #: 0 picks a free port; the chosen one is printed
    http_port: int = 8000
    #: 0 picks a free port, -1 turns gRPC off
    grpc_port: int = 8001
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
