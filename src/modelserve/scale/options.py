"""What ``modelserve deploy k8s`` renders from: the options (a pydantic model, checked before anything is
written) and the fixed facts about the server and the container the manifests rely on."""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- what the server answers on (tests/test_deploy_k8s.py checks these against the real app and CLI) --------
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
KSERVE_HTTP_PORT = 8080  # the port KServe (and Knative) route to in a custom predictor

# -- where the writable volumes go on a read-only root filesystem ----------------------------------------
TMP_DIR = "/tmp"
CACHE_DIR = "/var/cache/modelserve"
SPILL_DIR = "/var/lib/modelserve/spill"
TLS_DIR = "/etc/modelserve/tls"
JWT_DIR = "/etc/modelserve/jwt"
UID = 10001

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")


class K8sOptions(BaseModel):
    """What ``modelserve deploy k8s`` renders. Secrets are *names* of Kubernetes Secrets, never values."""

    model_config = ConfigDict(extra="forbid")

    name: str = "modelserve"
    namespace: str = "default"
    image: str
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    #: the registry alias every replica serves (``serve --registry … --alias``)
    alias: str = "production"
    #: Secret holding the registry database URL (``MODELSERVE_REGISTRY_URL``) under ``registry_secret_key``,
    #: and, optionally, the artifact store's fsspec options as JSON under ``storage_options_key``
    registry_secret: Optional[str] = None  # default: <name>-registry
    registry_secret_key: str = "url"
    storage_options_key: str = "storage-options"
    #: the artifact store (``MODELSERVE_REGISTRY_ARTIFACTS``), e.g. s3://bucket/models
    artifacts: str
    #: Secret whose keys become environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …) for S3;
    #: leave unset with workload identity (IRSA and the like: ``service_account_annotations``)
    s3_secret: Optional[str] = None
    service_account_annotations: dict[str, str] = {}
    #: payload log / feedback database: default the registry database; else a Secret with its URL
    monitor_db_secret: Optional[str] = None
    monitor_db_secret_key: str = "url"
    payload_log: bool = True
    #: who may call: keys (API keys in the registry database), jwt, keys+jwt; none adds --insecure
    auth: Literal["keys", "jwt", "keys+jwt", "none"] = "keys"
    #: JWT: Secret holding the HS256 secret (>= 32 bytes) under ``jwt_secret_key``, mounted as a file
    jwt_secret: Optional[str] = None
    jwt_secret_key: str = "secret"
    jwt_audience: Optional[str] = None
    jwt_issuer: Optional[str] = None
    #: with auth on, False (the default here) leaves GET /metrics open so Prometheus can scrape by annotation
    metrics_auth: bool = False
    #: a kubernetes.io/tls Secret (tls.crt, tls.key): HTTP, gRPC and metrics speak TLS
    tls_secret: Optional[str] = None
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=-1, le=65535)  # -1: no gRPC
    metrics_port: int = Field(9090, ge=1, le=65535)
    min_replicas: int = Field(2, ge=1)
    max_replicas: int = Field(4, ge=1)
    cpu: str = "1"
    cpu_limit: Optional[str] = None  # default: cpu
    memory: str = "2Gi"
    memory_limit: Optional[str] = None  # default: memory
    cache_size: str = "4Gi"  # emptyDir for fetched artifacts
    spill_size: str = "1Gi"  # emptyDir for the payload-log spill file
    tmp_size: str = "256Mi"
    hpa_cpu_percent: int = Field(70, ge=1, le=100)
    #: per-pod custom metric (served by the Prometheus adapter) and its target; target None: CPU only
    hpa_metric: Literal["modelserve_inflight_requests", "modelserve_queue_depth"] = "modelserve_inflight_requests"
    hpa_target_per_pod: Optional[float] = Field(8, gt=0)
    adapter_namespace: str = "monitoring"
    pdb_min_available: Union[int, str] = 1
    max_inflight_per_model: int = Field(0, ge=0)
    request_timeout_s: float = Field(60.0, ge=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    rate_limit: Optional[str] = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    kserve: bool = False

    @field_validator("name", "namespace", "adapter_namespace")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 52:
            raise ValueError(f"{v!r}: lower-case letters, digits and '-', starting with a letter, at most 52")
        return v

    @field_validator("registry_secret", "s3_secret", "monitor_db_secret", "jwt_secret", "tls_secret")
    @classmethod
    def _secret_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not _DNS_SUBDOMAIN.match(v) or len(v) > 253):
            raise ValueError(f"{v!r} is not a Kubernetes Secret name")
        return v

    @field_validator("cpu", "cpu_limit", "memory", "memory_limit", "cache_size", "spill_size", "tmp_size")
    @classmethod
    def _quantity(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _QUANTITY.match(v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 4Gi)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "K8sOptions":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas is below min_replicas")
        if "jwt" in self.auth and not self.jwt_secret:
            raise ValueError(f"auth {self.auth} needs jwt_secret (a Secret holding the HS256 secret)")
        if "jwt" not in self.auth and (self.jwt_secret or self.jwt_audience or self.jwt_issuer):
            raise ValueError(f"JWT options given with auth {self.auth}: use auth jwt or keys+jwt")
        if not self.kserve and isinstance(self.pdb_min_available, int) and self.pdb_min_available >= self.min_replicas:
            raise ValueError(f"pdb_min_available {self.pdb_min_available} with min_replicas {self.min_replicas} "
                             "would let no pod be evicted (node drains would hang): lower it or raise min_replicas")
        ports = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p > 0]
        if len(set(ports)) != len(ports):
            raise ValueError("the HTTP, gRPC and metrics ports must differ")
        return self

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def registry_secret_name(self) -> str:
        return self.registry_secret or f"{self.name}-registry"

    @property
    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "modelserve", "app.kubernetes.io/instance": self.name}

    @property
    def labels(self) -> dict[str, str]:
        return {**self.selector, "app.kubernetes.io/component": "server", "app.kubernetes.io/managed-by": "modelserve"}

    @property
    def scheme(self) -> str:
        return "HTTPS" if self.tls_secret else "HTTP"

    def ort_threads(self) -> int:
        """ONNX Runtime threads = the CPU limit (whole cores, at least 1): ORT would otherwise size its pool
        by the node's cores and fight the CFS quota."""
        q = self.cpu_limit or self.cpu
        cores = float(q[:-1]) / 1000 if q.endswith("m") else float(q)
        return max(1, math.floor(cores))


def required_secrets(o: K8sOptions) -> list[tuple[str, list[str], str]]:
    """(Secret name, keys, what it holds) for each Secret the manifests refer to: create these first."""
    out = [(o.registry_secret_name, [o.registry_secret_key, f"{o.storage_options_key} (optional)"],
            "registry database URL (postgresql+psycopg://…); fsspec storage options as JSON")]
    if o.s3_secret:
        out.append((o.s3_secret, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "…"], "S3 credentials as env vars"))
    if o.monitor_db_secret:
        out.append((o.monitor_db_secret, [o.monitor_db_secret_key], "payload log database URL"))
    if o.jwt_secret:
        out.append((o.jwt_secret, [o.jwt_secret_key], "HS256 JWT secret (>= 32 bytes)"))
    if o.tls_secret:
        out.append((o.tls_secret, ["tls.crt", "tls.key"], "kubernetes.io/tls certificate and key"))
    return out
