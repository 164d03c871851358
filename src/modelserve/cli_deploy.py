"""``modelserve deploy``: render deployment artifacts (Kubernetes manifests) for a registry-backed server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

deploy_app = typer.Typer(help="Render deployment artifacts: Kubernetes manifests (no cluster needed).",
                         no_args_is_help=True)


@deploy_app.command("k8s")
def k8s(
    out: Path = typer.Option(..., help="Folder to write the manifests to (created if needed)"),
    name: str = typer.Option("modelserve", help="Name of every resource (and the app.kubernetes.io/instance label)"),
    image: str = typer.Option(..., help="Container image with modelserve installed (see the Dockerfile)"),
    artifacts: str = typer.Option(..., help="Artifact store URL the registry's versions live in, e.g. s3://bucket/models"),
    namespace: str = typer.Option("default", help="Namespace of the resources"),
    alias: str = typer.Option("production", help="Registry alias every replica serves"),
    registry_secret: Optional[str] = typer.Option(None, help="Secret with the registry database URL (key 'url') and "
                                                             "optional fsspec storage options as JSON (key "
                                                             "'storage-options') [default: NAME-registry]"),
    s3_secret: Optional[str] = typer.Option(None, help="Secret whose keys become environment variables for S3 "
                                                       "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …)"),
    monitor_db_secret: Optional[str] = typer.Option(None, help="Secret with the payload log database URL (key "
                                                               "'url') [default: the registry database]"),
    payload_log: bool = typer.Option(True, "--payload-log/--no-payload-log", help="Log requests to the database"),
    min_replicas: int = typer.Option(2, help="Fewest replicas (the HPA's minimum)"),
    max_replicas: int = typer.Option(4, help="Most replicas (the HPA's maximum)"),
    cpu: str = typer.Option("1", help="CPU request per pod (and limit unless --cpu-limit)"),
    cpu_limit: Optional[str] = typer.Option(None, help="CPU limit per pod [default: --cpu]"),
    memory: str = typer.Option("2Gi", help="Memory request and limit per pod"),
    cache_size: str = typer.Option("4Gi", help="Size of the artifact cache volume (emptyDir)"),
    auth: str = typer.Option("keys", help="keys (API keys from the registry database), jwt, keys+jwt, or none "
                                          "(adds --insecure)"),
    jwt_secret: Optional[str] = typer.Option(None, help="Secret with the HS256 JWT secret (key 'secret'), mounted"),
    jwt_audience: Optional[str] = typer.Option(None, help="JWT: required 'aud'"),
    jwt_issuer: Optional[str] = typer.Option(None, help="JWT: required 'iss'"),
    metrics_auth: bool = typer.Option(False, "--metrics-auth/--no-metrics-auth",
                                      help="With auth on: /metrics needs a key too (Prometheus must then send one; "
                                           "scrape annotations cannot)"),
    tls_secret: Optional[str] = typer.Option(None, help="kubernetes.io/tls Secret: serve HTTP, gRPC and metrics "
                                                        "over TLS"),
    http_port: int = typer.Option(8000, help="HTTP port"),
    grpc_port: int = typer.Option(8001, help="gRPC port (-1: none)"),
    metrics_port: int = typer.Option(9090, help="Metrics port (Prometheus scrapes it)"),
    hpa_cpu_percent: int = typer.Option(70, help="HPA target CPU utilization"),
    hpa_metric: str = typer.Option("modelserve_inflight_requests",
                                   help="Per-pod custom metric: modelserve_inflight_requests or modelserve_queue_depth"),
    hpa_target: float = typer.Option(8, help="HPA target of that metric per pod (0: scale on CPU only)"),
    pdb_min_available: str = typer.Option("1", help="PodDisruptionBudget minAvailable (a number or a percentage)"),
    max_inflight_per_model: int = typer.Option(0, help="Requests a model answers at once per pod, past it 429"),
    kserve: bool = typer.Option(False, "--kserve", help="A KServe InferenceService (custom predictor, port 8080, V2) "
                                                       "instead of the Deployment, Service, HPA and PDB"),
):
    """Render Kubernetes manifests for replicas that serve a registry alias.

    Example: modelserve deploy k8s --out k8s/ --name resnet --image registry.example.com/modelserve:0.1.0
    --artifacts s3://models/registry --alias production --min-replicas 2 --max-replicas 8 --tls-secret resnet-tls

    Secrets are referenced, never rendered: create them first (the command lists which).
    """
    from pydantic import ValidationError

    from modelserve.scale.k8s import K8sOptions, required_secrets, write

    try:
        options = K8sOptions(
            name=name, namespace=namespace, image=image, artifacts=artifacts, alias=alias,
            registry_secret=registry_secret, s3_secret=s3_secret, monitor_db_secret=monitor_db_secret,
            payload_log=payload_log, min_replicas=min_replicas, max_replicas=max_replicas, cpu=cpu,
            cpu_limit=cpu_limit, memory=memory, cache_size=cache_size, auth=auth, jwt_secret=jwt_secret,
            jwt_audience=jwt_audience, jwt_issuer=jwt_issuer, metrics_auth=metrics_auth, tls_secret=tls_secret,
            http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, hpa_cpu_percent=hpa_cpu_percent,
            hpa_metric=hpa_metric, hpa_target_per_pod=hpa_target or None,
            pdb_min_available=int(pdb_min_available) if pdb_min_available.isdigit() else pdb_min_available,
            max_inflight_per_model=max_inflight_per_model, kserve=kserve,
        )
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            typer.echo(f"error: {'--' + where.replace('_', '-') + ': ' if where else ''}{err['msg']}", err=True)
        raise typer.Exit(2) from None
    for path in write(options, out):
        typer.echo(f"wrote {path}")
    typer.echo("\nSecrets to create first (values never go through modelserve):")
    for secret, keys, what in required_secrets(options):
        typer.echo(f"  {secret}: {', '.join(keys)}  ({what})")
    typer.echo(f"\nthen: kubectl apply -k {out}")
