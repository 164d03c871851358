"""``modelserve deploy k8s`` and the Dockerfile, without a cluster or docker.

The rendered manifests validate against the Kubernetes schemas (kubernetes-validate, strict: no unknown
field), and what they say about the server is checked against the server itself: the probe and metrics
paths are routes of the real app, the container args parse with the real ``serve`` command, the ConfigMap
names only variables the server reads, and a real server started with the rendered args (and the
environment the kubelet would give it) answers the probes and the scrape on the ports the manifests name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from modelserve.cli import app
from modelserve.scale.k8s import K8sOptions, render, required_secrets, write
from modelserve.settings import RegistrySettings, ServerSettings

from conftest import scale_model
from services import free_port

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # the oldest we promise and the newest shipped
SERVE = get_command(app).commands["serve"]

DEFAULT = dict(image="registry.example.com/modelserve:0.1.0", artifacts="s3://models/registry")
FULL = dict(DEFAULT, name="resnet", namespace="vision", alias="staging", registry_secret="resnet-db",
            s3_secret="resnet-s3", monitor_db_secret="resnet-logs", auth="keys+jwt", jwt_secret="resnet-jwt",
            jwt_audience="modelserve", jwt_issuer="https://id.example.com", tls_secret="resnet-tls",
            min_replicas=3, max_replicas=12, cpu="2", cpu_limit="3500m", memory="4Gi", memory_limit="6Gi",
            hpa_metric="modelserve_queue_depth", hpa_target_per_pod=4, pdb_min_available="50%",
            max_inflight_per_model=64, rate_limit="100:200", service_account_annotations={
                "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/modelserve"})


def docs(options: dict) -> dict[str, dict]:
    return dict(render(K8sOptions(**options)))


def container(d: dict) -> dict:
    pod = d["deployment.yaml"]["spec"]["template"]["spec"] if "deployment.yaml" in d else \
        d["inferenceservice.yaml"]["spec"]["predictor"]
    (c,) = pod["containers"]
    return c


def parse_serve(args: list[str]) -> dict:
    """The container args through the real ``serve`` command's click parser (what the pod will run)."""
    assert args[0] == "serve"
    ctx = SERVE.make_context("serve", list(args[1:]))
    return ctx.params


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- schema validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [DEFAULT, FULL, dict(FULL, grpc_port=-1, hpa_target_per_pod=None, auth="none",
                                                         jwt_secret=None, jwt_audience=None, jwt_issuer=None)],
                         ids=["default", "full", "minimal"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(options, version):
    rendered = render(K8sOptions(**options))
    kinds = [doc["kind"] for _, doc in rendered]
    assert kinds[:6] == ["ConfigMap", "ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler",
                         "PodDisruptionBudget"]
    for rel, doc in rendered:
        if doc["kind"] == "Kustomization":  # kustomize's, not the API server's: it lists the others
            assert doc["resources"] == [r for r, d in rendered if d["kind"] != "Kustomization"
                                        and not r.startswith("prometheus-adapter/")]
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_written_files_are_the_rendered_documents_in_a_stable_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    paths = write(K8sOptions(**FULL), a)
    write(K8sOptions(**FULL), b)
    assert [p.relative_to(a).as_posix() for p in paths] == [rel for rel, _ in render(K8sOptions(**FULL))]
    for p in paths:
        text = p.read_text()
        assert text == (b / p.relative_to(a)).read_text()  # byte-identical on a second render
        (doc,) = list(yaml.safe_load_all(text))
        assert doc == dict(render(K8sOptions(**FULL)))[p.relative_to(a).as_posix()]


# -- the manifests against the real server ---------------------------------------------------------------

def _app_get_routes() -> set[str]:
    from modelserve.server.dataplane import Dataplane
    from modelserve.server.models import ModelManager
    from modelserve.server.rest import create_app

    manager = ModelManager(ROOT / "no-such-repository", "explicit")
    fastapi_app = create_app(Dataplane(manager), 1 << 20).app  # behind the bare ASGI infer route
    return {r.path for r in fastapi_app.routes if "GET" in getattr(r, "methods", ())}


@pytest.mark.parametrize("options", [DEFAULT, FULL], ids=["default", "full"])
def test_probes_and_scrape_path_are_routes_of_the_real_app(options):
    d = docs(options)
    c = container(d)
    routes = _app_get_routes()
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes
        assert get["port"] == "http"  # the HTTP port, by name
        assert get["scheme"] == ("HTTPS" if options.get("tls_secret") else "HTTP")
    assert "ready" in c["readinessProbe"]["httpGet"]["path"] and "live" in c["livenessProbe"]["httpGet"]["path"]
    annotations = d["deployment.yaml"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert annotations["prometheus.io/scheme"] == ("https" if options.get("tls_secret") else "http")


@pytest.mark.parametrize("options", [DEFAULT, FULL], ids=["default", "full"])
def test_args_parse_with_the_real_serve_command_and_match_the_ports(options):
    d = docs(options)
    c = container(d)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert c["command"] == ["modelserve"] and scripts["modelserve"] == "modelserve.cli:app"
    params = parse_serve(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert params["http_port"] == ports["http"] and params["grpc_port"] == ports["grpc"]
    assert params["metrics_port"] == ports["metrics"]
    assert params["host"] == "0.0.0.0"
    assert params["registry"] == "$(MODELSERVE_REGISTRY_URL)"  # expanded by the kubelet from a secretKeyRef
    assert params["alias"] == options.get("alias", "production")
    assert params["auth"] == options.get("auth", "keys") and params["metrics_auth"] is False
    env = {e["name"]: e for e in c["env"]}
    for ref in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):  # every $(VAR) is defined, from a Secret
        assert "secretKeyRef" in env[ref]["valueFrom"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(params["registry_cache"]) in mounts and str(params["monitor_spill"].parent) in mounts
    if options.get("tls_secret"):
        assert params["tls_cert"].parent == params["tls_key"].parent and str(params["tls_cert"].parent) in mounts
        assert str(params["jwt_secret_file"].parent) in mounts and params["monitor_db"] == "$(MODELSERVE_MONITOR_DB)"
        assert params["jwt_audience"] == "modelserve" and params["jwt_issuer"] == "https://id.example.com"
    else:
        assert params["tls_cert"] is None and params["jwt_secret_file"] is None and params["monitor_db"] is None


def test_configmap_names_only_variables_the_server_reads():
    known = {p.envvar for p in SERVE.params if isinstance(p.envvar, str)}
    known |= {f"MODELSERVE_{f.upper()}" for f in ServerSettings.model_fields}
    known |= {f"MODELSERVE_REGISTRY_{f.upper()}" for f in RegistrySettings.model_fields}
    for options in (DEFAULT, FULL):
        d = docs(options)
        data = d["configmap.yaml"]["data"]
        assert set(data) <= known, set(data) - known
        assert data["MODELSERVE_REGISTRY_ARTIFACTS"] == options["artifacts"]
        c = container(d)
        assert {e["name"] for e in c["env"]} <= known
        assert c["envFrom"][0]["configMapRef"]["name"] == d["configmap.yaml"]["metadata"]["name"]
    assert docs(FULL)["configmap.yaml"]["data"]["MODELSERVE_ORT_THREADS"] == "3"  # the 3500m limit, whole cores


@pytest.mark.parametrize("options", [DEFAULT, FULL], ids=["default", "full"])
def test_service_hpa_and_pdb_point_at_the_pods(options):
    d = docs(options)
    c, dep = container(d), d["deployment.yaml"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    svc = d["service.yaml"]["spec"]
    assert svc["selector"] == selector
    names = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["ports"]} == names == {"http", "grpc", "metrics"}
    hpa = d["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (options.get("min_replicas", 2), options.get("max_replicas", 4))
    (pods,) = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    metric = options.get("hpa_metric", "modelserve_inflight_requests")
    assert pods["metric"]["name"] == metric
    rules = yaml.safe_load(d["prometheus-adapter/rules.yaml"]["data"]["config.yaml"])["rules"]
    assert metric in [r["name"]["as"] for r in rules]  # the adapter serves what the HPA asks for
    assert all(r["seriesQuery"].startswith(r["name"]["as"]) for r in rules)
    metrics_doc = (ROOT / "docs" / "metrics.md").read_text()
    assert f"`{metric}`" in metrics_doc  # a metric the server really exports
    pdb = d["pdb.yaml"]["spec"]
    assert pdb["selector"]["matchLabels"] == selector
    assert pdb["minAvailable"] == options.get("pdb_min_available", 1)


@pytest.mark.parametrize("options", [DEFAULT, FULL, dict(DEFAULT, kserve=True, min_replicas=1)],
                         ids=["default", "full", "kserve"])
def test_pods_run_non_root_on_a_read_only_root_filesystem(options):
    d = docs(options)
    c = container(d)
    pod = d["deployment.yaml"]["spec"]["template"]["spec"] if "deployment.yaml" in d else \
        d["inferenceservice.yaml"]["spec"]["predictor"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    params = parse_serve(c["args"])
    assert {"/tmp", str(params["registry_cache"]), str(params["monitor_spill"].parent)} <= writable
    for m in c["volumeMounts"]:
        if "secret" in volumes[m["name"]]:
            assert m["readOnly"] is True


@pytest.mark.parametrize("options", [DEFAULT, FULL, dict(FULL, kserve=True)], ids=["default", "full", "kserve"])
def test_no_secret_values_only_references(options, tmp_path):
    paths = write(K8sOptions(**options), tmp_path)
    text = "".join(p.read_text() for p in paths)
    assert "kind: Secret" not in text
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text)  # no user:password@ in any URL
    for p in paths:
        for doc in yaml.safe_load_all(p.read_text()):
            if doc["kind"] in ("Deployment", "InferenceService"):
                for e in container({p.name: doc})["env"]:
                    assert "valueFrom" in e or e["name"] == "PROTOCOL", e
    named = {name for name, _, _ in required_secrets(K8sOptions(**options))}
    referenced = set(re.findall(r"(?:secretName|name): (\S+)", text)) & named
    assert referenced == named  # every Secret the command tells the user to create is used


def test_kserve_inference_service_structure():
    d = docs(dict(FULL, kserve=True))
    assert set(d) == {"configmap.yaml", "serviceaccount.yaml", "inferenceservice.yaml", "kustomization.yaml"}
    isvc = d["inferenceservice.yaml"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "resnet" and isvc["metadata"]["namespace"] == "vision"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 12)
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    assert {"name": "PROTOCOL", "value": "v2"} in c["env"]  # how a custom predictor declares the V2 protocol
    assert c["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    params = parse_serve(c["args"])
    assert params["http_port"] == 8080 and params["grpc_port"] == -1 and params["metrics_port"] == -1
    routes = _app_get_routes()
    assert c["readinessProbe"]["httpGet"]["path"] in routes and c["readinessProbe"]["httpGet"]["port"] == 8080
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/path"] in routes
    # the pod part is a Kubernetes PodSpec: validate it as one (the CRD itself has no schema here)
    pod_fields = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas", "scaleMetric",
                                                                   "scaleTarget", "timeout")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_fields}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_options_refuse_inconsistent_settings():
    with pytest.raises(ValueError, match="jwt_secret"):
        K8sOptions(**DEFAULT, auth="jwt")
    with pytest.raises(ValueError, match="evicted"):
        K8sOptions(**DEFAULT, min_replicas=1)
    with pytest.raises(ValueError, match="differ"):
        K8sOptions(**DEFAULT, metrics_port=8000)
    with pytest.raises(ValueError):
        K8sOptions(**DEFAULT, name="Not_A_Name")


def test_cli_renders_and_lists_the_secrets(tmp_path):
    out = tmp_path / "k8s"
    result = CliRunner().invoke(app, ["deploy", "k8s", "--out", str(out), "--name", "resnet", "--image", "img:1",
                                      "--artifacts", "s3://m/r", "--tls-secret", "resnet-tls", "--max-replicas", "6"])
    assert result.exit_code == 0, result.output
    assert "resnet-registry" in result.output and "resnet-tls" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.yaml")) == sorted(
        rel for rel, _ in render(K8sOptions(name="resnet", image="img:1", artifacts="s3://m/r",
                                            tls_secret="resnet-tls", max_replicas=6)))
    bad = CliRunner().invoke(app, ["deploy", "k8s", "--out", str(out), "--image", "i", "--artifacts", "s3://m",
                                   "--auth", "jwt"])
    assert bad.exit_code == 2 and "jwt_secret" in bad.output


def test_a_real_server_started_with_the_rendered_args_answers_the_probes_and_the_scrape(tmp_path):
    """The Deployment's container, run here as the kubelet would run it: its env (Secret values supplied
    locally), its ConfigMap as env, $(VAR) expanded; loopback and free ports instead of 0.0.0.0 and the
    fixed ones; local folders instead of the volumes."""
    from modelserve.registry import Registry
    from modelserve.security import KeyStore

    url = f"sqlite:///{tmp_path}/registry.db"
    registry = Registry(url, tmp_path / "artifacts", actor="test")
    registry.register(scale_model(tmp_path / "m.onnx", 2.0), "scaler")
    registry.set_alias("scaler", "production", 1)
    registry.close()
    with KeyStore.open(url, client="test") as store:
        store.create("reader", "reader", None, created_by="test")

    d = docs(dict(DEFAULT, artifacts=str(tmp_path / "artifacts")))
    c = container(d)
    secrets = {"MODELSERVE_REGISTRY_URL": url}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    env.update(d["configmap.yaml"]["data"])
    pod = {"metadata.name": "resnet-7d9f-abcde"}  # what the kubelet fills in from the downward API
    for e in c["env"]:
        if e["name"] in secrets:
            env[e["name"]] = secrets[e["name"]]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = pod[e["valueFrom"]["fieldRef"]["fieldPath"]]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    ports = {p["name"]: free_port() for p in c["ports"]}
    by_flag = {"--http-port": "http", "--grpc-port": "grpc", "--metrics-port": "metrics"}
    volumes = {m["mountPath"]: tmp_path / m["name"] for m in c["volumeMounts"]}
    for i, a in enumerate(args):
        if a in by_flag:
            args[i + 1] = str(ports[by_flag[a]])
        elif args[i - 1] == "--host":
            args[i] = "127.0.0.1"
        else:
            for mount, local in volumes.items():
                if a == mount or a.startswith(mount + "/"):
                    args[i] = str(local) + a[len(mount):]
    proc = subprocess.Popen([sys.executable, "-m", c["command"][0], *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=5) as client:
            def get(probe: str) -> httpx.Response:
                h = c[probe]["httpGet"]
                return client.get(f"{h['scheme'].lower()}://127.0.0.1:{ports[h['port']]}{h['path']}")

            while True:
                try:
                    if get("readinessProbe").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
            assert get("livenessProbe").status_code == 200 and get("startupProbe").status_code == 200
            ann = d["deployment.yaml"]["spec"]["template"]["metadata"]["annotations"]
            scrape = client.get(f"{ann['prometheus.io/scheme']}://127.0.0.1:{ports['metrics']}"
                                f"{ann['prometheus.io/path']}")  # no credentials, as a scrape by annotation
            assert scrape.status_code == 200 and 'model="scaler"' in scrape.text
            series = [line for line in scrape.text.splitlines() if line.startswith("modelserve_model_state{")]
            assert series and all('replica="resnet-7d9f-abcde"' in line for line in series)  # the pod's name
            assert client.get(f"http://127.0.0.1:{ports['http']}/v2/models/scaler").status_code == 401  # auth on
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 0, out  # SIGTERM: drained and exited cleanly
    assert "Traceback" not in out, out


# -- the Dockerfile -----------------------------------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_the_console_script_as_non_root_with_extras_by_build_arg():
    import json

    steps = _dockerfile()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2  # the wheel is built in a stage of its own
    assert all("-slim" in steps[i][1] for i in stages)
    final = steps[stages[-1]:]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (script,) = pyproject["scripts"]
    assert json.loads(dict(final)["ENTRYPOINT"]) == [script]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] == "10001"  # numeric: runAsNonRoot can check it
    extras_args = [arg for op, arg in final if op == "ARG" and arg.startswith("EXTRAS")]
    assert extras_args, "the runtime stage must declare ARG EXTRAS to use it"
    default = extras_args[0].split("=", 1)[1].split(",")
    assert set(default) <= set(pyproject["optional-dependencies"]) and {"postgres", "s3"} <= set(default)
    installs = [arg for op, arg in final if op == "RUN" and "pip install" in arg]
    assert any('"modelserve[${EXTRAS}]"' in arg and "--no-index" in arg for arg in installs)
    cmd = json.loads(dict(final)["CMD"])
    params = parse_serve(cmd)
    exposed = {int(p) for op, arg in final if op == "EXPOSE" for p in arg.split()}
    assert {params["http_port"], params["grpc_port"], params["metrics_port"]} == exposed
    assert params["host"] == "0.0.0.0" and params["auth"] != "none"  # reachable, and not open
    health = json.loads(dict(final)["HEALTHCHECK"].split("CMD", 1)[1])
    assert "/v2/health/live" in health[-1] and "/v2/health/live" in _app_get_routes()
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!src/"]  # what the build COPYs
    copied = " ".join(arg for op, arg in steps if op == "COPY")
    assert "pyproject.toml" in copied and "README.md" in copied and "src" in copied
