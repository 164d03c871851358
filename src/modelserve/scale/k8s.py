"""Kubernetes manifests for a registry-backed modelserve deployment (``modelserve deploy k8s --out DIR``).

Every replica runs ``modelserve serve --registry … --alias …``: it serves what the alias names and follows
its moves. The replicas share the registry database (PostgreSQL), the artifact store (S3) and the payload
log database (by default the registry's); each keeps its own batch queues, artifact cache and metrics.

Rendered, one resource a file, in a fixed order (``kubectl apply -k DIR`` or ``kubectl apply -f DIR``):

- ``configmap.yaml``: the non-secret settings, as the ``MODELSERVE_*`` variables the server reads;
- ``serviceaccount.yaml``: no API token mounted (the server never talks to the Kubernetes API);
- ``deployment.yaml``: probes on the V2 health routes, non-root, read-only root filesystem (emptyDirs
  for /tmp, the artifact cache and the payload-log spill file), Secret *references* only;
- ``service.yaml`` (HTTP, gRPC, metrics), ``hpa.yaml`` (CPU and a per-pod custom metric),
  ``pdb.yaml``; ``kustomization.yaml`` lists them;
- ``prometheus-adapter/rules.yaml``: the adapter rule that turns ``modelserve_inflight_requests`` (or
  ``modelserve_queue_depth``) into the per-pod metric the HPA reads: an example to merge into the
  adapter's configuration, in a folder of its own so that ``kubectl apply -f DIR`` leaves it alone.

With ``kserve=True`` a KServe ``InferenceService`` (modelserve as a custom predictor on port 8080, V2
protocol) replaces the Deployment, Service, HPA and PDB: KServe owns those then.

No Secret is rendered and no secret value passes through here: the Secrets are named, and created by
whoever holds the values (``required_secrets`` says which keys each needs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import yaml

from modelserve.scale.options import (  # noqa: F401 - re-exported: the constants are part of the interface
    CACHE_DIR, JWT_DIR, KSERVE_HTTP_PORT, LIVE_PATH, METRICS_PATH, READY_PATH, SPILL_DIR, TLS_DIR, TMP_DIR, UID,
    K8sOptions, required_secrets,
)


# -- the container --------------------------------------------------------------------------------------

def serve_args(o: K8sOptions, *, http_port: int, grpc_port: int, metrics_port: Optional[int]) -> list[str]:
    """``modelserve serve …`` as the container runs it. ``$(VAR)`` is expanded by the kubelet from the
    container's environment (a secretKeyRef), so the manifest holds a reference, never the URL."""
    args = ["serve", "--host", "0.0.0.0", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    args += ["--registry", "$(MODELSERVE_REGISTRY_URL)", "--alias", o.alias,
            "--registry-cache", CACHE_DIR, "--monitor-spill", f"{SPILL_DIR}/spill.jsonl"]
    if o.monitor_db_secret:
        args += ["--monitor-db", "$(MODELSERVE_MONITOR_DB)"]
    args += ["--auth", o.auth]
    if o.auth == "none":
        args.append("--insecure")  # listening on the pod IP with no authentication: the caller's choice
    elif not o.metrics_auth:
        args.append("--no-metrics-auth")
    if o.jwt_secret:
        args += ["--jwt-secret-file", f"{JWT_DIR}/{o.jwt_secret_key}"]
        for flag, value in (("--jwt-audience", o.jwt_audience), ("--jwt-issuer", o.jwt_issuer)):
            if value:
                args += [flag, value]
    if o.tls_secret:
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    args += ["--log-level", o.log_level]
    return args


def settings_data(o: K8sOptions) -> dict[str, str]:
    """The ConfigMap: settings the server reads from ``MODELSERVE_*`` variables (no secrets among them)."""
    data = {
        "MODELSERVE_REGISTRY_ARTIFACTS": o.artifacts,
        "MODELSERVE_ORT_THREADS": str(o.ort_threads()),
        "MODELSERVE_PAYLOAD_LOG": "true" if o.payload_log else "false",
        "MODELSERVE_MAX_INFLIGHT_PER_MODEL": str(o.max_inflight_per_model),
        "MODELSERVE_REQUEST_TIMEOUT_S": str(o.request_timeout_s),
        "MODELSERVE_DRAIN_TIMEOUT_S": str(o.drain_timeout_s),
    }
    if o.rate_limit:
        data["MODELSERVE_RATE_LIMIT"] = o.rate_limit
    return data


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _probe(path: str, port, scheme: str, period: int, failures: int, timeout: int = 2) -> dict:
    return {"httpGet": {"path": path, "port": port, "scheme": scheme},
            "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}


def _container(o: K8sOptions, *, name: str, ports: list[dict], args: list[str], probe_port) -> dict:
    env = [_secret_env("MODELSERVE_REGISTRY_URL", o.registry_secret_name, o.registry_secret_key),
           _secret_env("MODELSERVE_REGISTRY_STORAGE_OPTIONS", o.registry_secret_name, o.storage_options_key, True)]
    # the pod's name as the ``replica`` label of its metrics
    env.append({"name": "MODELSERVE_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    if o.monitor_db_secret:
        env.append(_secret_env("MODELSERVE_MONITOR_DB", o.monitor_db_secret, o.monitor_db_secret_key))
    env_from = [{"configMapRef": {"name": f"{o.name}-settings"}}]
    if o.s3_secret:
        env_from.append({"secretRef": {"name": o.s3_secret}})
    mounts = [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "artifact-cache", "mountPath": CACHE_DIR},
              {"name": "spill", "mountPath": SPILL_DIR}]
    if o.tls_secret:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if o.jwt_secret:
        mounts.append({"name": "jwt", "mountPath": JWT_DIR, "readOnly": True})
    limits = {"cpu": o.cpu_limit or o.cpu, "memory": o.memory_limit or o.memory}
    return {
        "name": name,
        "image": o.image,
        "imagePullPolicy": o.image_pull_policy,
        "command": ["modelserve"],
        "args": args,
        "ports": ports,
        "env": env,
        "envFrom": env_from,
        "resources": {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": limits},
        # live answers as soon as the HTTP port is bound; ready only once the alias's models are loaded
        "startupProbe": _probe(LIVE_PATH, probe_port, o.scheme, 5, 60),
        "livenessProbe": _probe(LIVE_PATH, probe_port, o.scheme, 10, 3, 5),
        "readinessProbe": _probe(READY_PATH, probe_port, o.scheme, 5, 2),
        # give the endpoints controller time to take the pod out before SIGTERM starts the drain
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": mounts,
    }


def _pod_spec(o: K8sOptions, container: dict) -> dict:
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": o.tmp_size}},
               {"name": "artifact-cache", "emptyDir": {"sizeLimit": o.cache_size}},
               {"name": "spill", "emptyDir": {"sizeLimit": o.spill_size}}]
    if o.tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": o.tls_secret, "defaultMode": 0o440}})
    if o.jwt_secret:
        volumes.append({"name": "jwt", "secret": {"secretName": o.jwt_secret, "defaultMode": 0o440,
                                                  "items": [{"key": o.jwt_secret_key, "path": o.jwt_secret_key}]}})
    return {
        "serviceAccountName": o.name,
        "automountServiceAccountToken": False,
        # no <SERVICE>_PORT variables: a Service called modelserve-… would inject MODELSERVE_* names
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": int(o.drain_timeout_s) + 15,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }


# -- the resources --------------------------------------------------------------------------------------

def _meta(o: K8sOptions, name: str, **extra) -> dict:
    return {"name": name, "namespace": o.namespace, "labels": dict(o.labels), **extra}


def _configmap(o: K8sOptions) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(o, f"{o.name}-settings"),
            "data": settings_data(o)}


def _service_account(o: K8sOptions) -> dict:
    meta = _meta(o, o.name)
    if o.service_account_annotations:
        meta["annotations"] = dict(o.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False}


def _ports(o: K8sOptions) -> list[dict]:
    ports = [{"name": "http", "containerPort": o.http_port, "protocol": "TCP"}]
    if o.grpc_port > 0:
        ports.append({"name": "grpc", "containerPort": o.grpc_port, "protocol": "TCP"})
    ports.append({"name": "metrics", "containerPort": o.metrics_port, "protocol": "TCP"})
    return ports


def _deployment(o: K8sOptions, config_hash: str) -> dict:
    args = serve_args(o, http_port=o.http_port, grpc_port=o.grpc_port, metrics_port=o.metrics_port)
    container = _container(o, name="modelserve", ports=_ports(o), args=args, probe_port="http")
    pod = _pod_spec(o, container)
    pod["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                         "whenUnsatisfiable": "ScheduleAnyway",
                                         "labelSelector": {"matchLabels": dict(o.selector)}}]
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(o.metrics_port),
                   "prometheus.io/path": METRICS_PATH, "prometheus.io/scheme": o.scheme.lower(),
                   "modelserve.dev/config-hash": config_hash}  # a changed ConfigMap rolls the pods
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(o, o.name),
        # no spec.replicas: the HPA owns the count (an apply would otherwise reset it)
        "spec": {
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": dict(o.selector)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": dict(o.labels), "annotations": annotations}, "spec": pod},
        },
    }


def _service(o: K8sOptions) -> dict:
    ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
             for p in _ports(o)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(o, o.name),
            "spec": {"type": "ClusterIP", "selector": dict(o.selector), "ports": ports}}


def _hpa(o: K8sOptions) -> dict:
    metrics = [{"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": o.hpa_cpu_percent}}}]
    if o.hpa_target_per_pod is not None:
        target = o.hpa_target_per_pod
        metrics.append({"type": "Pods", "pods": {
            "metric": {"name": o.hpa_metric},  # served by the Prometheus adapter (prometheus-adapter/rules.yaml)
            "target": {"type": "AverageValue", "averageValue": str(int(target) if target == int(target) else target)}}})
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(o, o.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.name},
            "minReplicas": o.min_replicas, "maxReplicas": o.max_replicas, "metrics": metrics,
            "behavior": {  # up fast (load arrives in bursts), down slowly (a new pod pays model load + warm-up)
                "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
                    {"type": "Percent", "value": 100, "periodSeconds": 30},
                    {"type": "Pods", "value": 2, "periodSeconds": 30}]},
                "scaleDown": {"stabilizationWindowSeconds": 300, "policies": [
                    {"type": "Pods", "value": 1, "periodSeconds": 60}]},
            },
        },
    }


def _pdb(o: K8sOptions) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(o, o.name),
            "spec": {"minAvailable": o.pdb_min_available, "selector": {"matchLabels": dict(o.selector)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}  # a crash-looping pod never blocks a drain


def adapter_rules(o: K8sOptions) -> dict:
    """prometheus-adapter rules exposing each pod's sum of the gauge (over model, version, protocol) under its
    own name, as the ``pods`` custom metric the HPA asks for. The series need ``namespace`` and ``pod``
    labels: the usual pod scrape relabelling (or a PodMonitor) adds them."""
    rules = [{
        "seriesQuery": f'{metric}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{metric}$", "as": metric},
        "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
    } for metric in ("modelserve_inflight_requests", "modelserve_queue_depth")]
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{o.name}-prometheus-adapter-rules", "namespace": o.adapter_namespace,
                         "labels": dict(o.labels)},
            "data": {"config.yaml": yaml.safe_dump({"rules": rules}, sort_keys=False)}}


def _inference_service(o: K8sOptions) -> dict:
    """KServe custom predictor: one container named kserve-container on 8080 (Knative allows one port, so no
    gRPC or metrics port of its own; /metrics is on 8080); PROTOCOL=v2 tells KServe it speaks the V2 protocol."""
    args = serve_args(o, http_port=KSERVE_HTTP_PORT, grpc_port=-1, metrics_port=None)
    ports = [{"name": "http1", "containerPort": KSERVE_HTTP_PORT, "protocol": "TCP"}]
    container = _container(o, name="kserve-container", ports=ports, args=args, probe_port=KSERVE_HTTP_PORT)
    container["env"].insert(0, {"name": "PROTOCOL", "value": "v2"})
    predictor = {"minReplicas": o.min_replicas, "maxReplicas": o.max_replicas,
                 "scaleMetric": "cpu", "scaleTarget": o.hpa_cpu_percent,
                 "timeout": int(o.request_timeout_s) or None, **_pod_spec(o, container)}
    predictor = {k: v for k, v in predictor.items() if v is not None}
    annotations = {"serving.kserve.io/enable-prometheus-scraping": "true",
                   "prometheus.kserve.io/port": str(KSERVE_HTTP_PORT), "prometheus.kserve.io/path": METRICS_PATH}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": _meta(o, o.name, annotations=annotations), "spec": {"predictor": predictor}}


def render(o: K8sOptions) -> list[tuple[str, dict]]:
    """(relative file name, resource) in a fixed order; ``kustomization.yaml`` last."""
    cm = _configmap(o)
    config_hash = hashlib.sha256(json.dumps(cm["data"], sort_keys=True).encode()).hexdigest()[:16]
    files = [("configmap.yaml", cm), ("serviceaccount.yaml", _service_account(o))]
    if o.kserve:
        files.append(("inferenceservice.yaml", _inference_service(o)))
    else:
        files += [("deployment.yaml", _deployment(o, config_hash)), ("service.yaml", _service(o)),
                  ("hpa.yaml", _hpa(o)), ("pdb.yaml", _pdb(o))]
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [f for f, _ in files]}
    files.append(("kustomization.yaml", kustomization))
    if not o.kserve and o.hpa_target_per_pod is not None:
        files.append(("prometheus-adapter/rules.yaml", adapter_rules(o)))
    return files


_HEADER = "# Rendered by `modelserve deploy k8s`: change the options and render again rather than editing.\n"
_ADAPTER_HEADER = (
    "# Example, not applied with the rest: merge these rules into your prometheus-adapter configuration\n"
    "# (helm chart: values rules.custom; a plain install: its --config file). They expose each pod's\n"
    "# in-flight requests and queue depth (summed over models) as per-pod custom metrics for the HPA.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (an embedded config file) as literal blocks, readable in review."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def write(o: K8sOptions, out: Path) -> list[Path]:
    """Write the rendered files under ``out`` (created if needed); returns their paths in order."""
    paths = []
    for rel, doc in render(o):
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        header = _ADAPTER_HEADER if rel.startswith("prometheus-adapter/") else _HEADER
        path.write_text(header + to_yaml(doc))
        paths.append(path)
    return paths
