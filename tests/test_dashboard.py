"""The monitoring dashboard, end to end: a real server, an exact mix of requests and feedback, then

- ``GET /v2/dashboard`` checked number by number against the traffic (and against ``/metrics``);
- the page loaded in headless Chromium (Debian's ``chromium``; CI installs it, elsewhere the browser
  tests skip without it): the DOM shows the model, its state, the exact request count, latency, the
  accuracy computed here by hand and the drift alert; a second load while traffic flows shows a nonzero
  request rate and charts that grew during that one page load; a screenshot is saved as a test
  artifact (``test-artifacts/dashboard.png``);
- the Grafana dashboard (``deploy/grafana/modelserve.json``) is valid and every metric it queries exists
  in a real ``/metrics`` scrape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, _unavailable, mlp_model
from prometheus_client.parser import text_string_to_metric_families

from modelserve.server.dashboard import LATENCY_BOUNDS_S, quantile

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
GRAFANA = ROOT / "deploy" / "grafana" / "modelserve.json"

OK, BAD = 30, 3            # requests sent before the page is loaded: successes, and 400s (wrong shape)
FEEDBACK, WRONG = 20, 5    # feedback for the first 20 successes, 5 of them with a wrong class
SHIFT = 3.0                # inputs shifted this far from the reference: drift must alert


def chromium_binary() -> str:
    for name in (os.environ.get("MODELSERVE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    _unavailable("no chromium binary (apt-get install chromium; .ci/run installs it)")


def browse(url: str, tmp: Path, *args: str, budget_ms: int = 3000) -> str:
    """Run headless Chromium on ``url`` for ``budget_ms`` of virtual time (timers run, fetches are real)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars", "--disable-extensions",
           f"--user-data-dir={tmp}", f"--virtual-time-budget={budget_ms}", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class Dom(HTMLParser):
    """Every element's attributes and text, enough to read ``data-*`` attributes and cell texts."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "path", "line", "text"}

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, **attrs) -> list[dict]:
        return [e for e in self.elements if all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def one(self, **attrs) -> dict:
        found = self.find(**attrs)
        assert len(found) == 1, (attrs, found)
        return found[0]


def v2_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dashboard-repo")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    np.save(repo / "mlp" / "reference.npy", np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32))
    (repo / "mlp" / "config.yaml").write_text(
        "max_batch_size: 16\n"
        "monitoring: {drift: {reference: reference.npy, window: 20, min_samples: 20}}\n")
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard-server")
    with Server(repo, "--monitor-db", f"sqlite:///{tmp / 'monitor.db'}", "--monitor-spill", str(tmp / "spill")) as srv:
        srv.url = f"http://{srv.http_url}"
        yield srv


@pytest.fixture(scope="module")
def traffic(server) -> dict:
    """The exact mix, sent once: OK successes, BAD failures, FEEDBACK feedback rows; what was expected."""
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = []
        for i in range(OK):
            r = client.post("/v2/models/mlp/infer", json=v2_body(rng.standard_normal((1, 16)) + SHIFT))
            assert r.status_code == 200, r.text
            probs = next(o for o in r.json()["outputs"] if o["name"] == "probs")["data"]
            answers.append((r.headers["x-request-id"], int(np.argmax(probs))))
            if i % 10 == 0:
                assert client.post("/v2/models/mlp/infer", json=v2_body(np.zeros((1, 3)))).status_code == 400
        correct = 0
        for i, (rid, predicted) in enumerate(answers[:FEEDBACK]):
            truth = (predicted + 1) % 4 if i < WRONG else predicted
            correct += truth == predicted
            r = client.post("/v2/models/mlp/feedback", json={"request_id": rid, "ground_truth": truth})
            assert r.status_code == 200, r.text
        assert client.post("/v2/logs/flush").status_code == 200
    return {"accuracy": correct / FEEDBACK}


def dashboard(server) -> dict:
    r = httpx.get(server.url + "/v2/dashboard", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    return r.json()


def mlp(doc: dict) -> dict:
    [version] = [v for v in doc["versions"] if v["model"] == "mlp"]
    return version


def test_document_counts_exactly(server, traffic):
    doc = dashboard(server)
    assert doc["server"]["name"] == "modelserve" and doc["server"]["ready"] is True
    assert doc["server"]["payload_log"] is True and doc["server"]["notes"] == []
    assert doc["models"] == ["mlp"]
    v = mlp(doc)
    assert (v["version"], v["state"]) == ("1", "READY")
    assert v["requests"]["total"] == OK + BAD
    assert (v["requests"]["success"], v["requests"]["failure"]) == (OK, BAD)
    assert v["requests"]["by_status"] == {"200": OK, "400": BAD}
    assert v["requests"]["by_class"] == {"2xx": OK, "4xx": BAD, "5xx": 0, "other": 0}
    assert v["requests"]["by_protocol"] == {"v2-rest": OK + BAD}
    assert v["inflight"] == 0 and v["queue_depth"] == 0
    total = v["latency"]["total"]
    assert total["count"] == OK == sum(total["counts"])
    assert len(total["counts"]) == len(doc["buckets"]["latency_s"]) + 1
    for q in ("p50", "p90", "p99"):  # histogram_quantile over the buckets
        assert total[f"{q}_s"] == quantile(LATENCY_BOUNDS_S, total["counts"], int(q[1:]) / 100)
    assert 0 < total["p50_s"] <= total["p90_s"] <= total["p99_s"]
    assert total["mean_s"] == pytest.approx(total["sum_s"] / OK)
    assert v["latency"]["queue"]["count"] == OK and v["latency"]["inference"]["count"] == OK
    assert v["batch"]["rows"] == OK and v["batch"]["executions"] == sum(v["batch"]["counts"]) > 0
    assert v["quality"]["kind"] == "classification"
    assert v["quality"]["accuracy"] == traffic["accuracy"] == (FEEDBACK - WRONG) / FEEDBACK
    assert (v["quality"]["samples"], v["quality"]["feedback"]) == (FEEDBACK, FEEDBACK)
    drift = wait_for_drift(server)
    assert drift["alert"] is True and drift["score"] > drift["threshold"] == 0.2
    assert drift["window"] == 20 and drift["reference"]["complete"] is True
    assert len(drift["top_features"]) == 5
    psis = [f["psi"] for f in drift["top_features"]]
    assert psis == sorted(psis, reverse=True) and psis[0] == drift["score"]
    res = doc["resources"]
    assert res["memory_rss_bytes"] > 10_000_000 and res["cpu_seconds"] > 0 and res["threads"] >= 2
    assert res["http_connections"] >= 1 and all("utilization" in g for g in res["gpus"])

    # the same numbers /metrics gives
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    buckets = [s for s in families["modelserve_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["stage"] == "total"]
    assert [int(s.value) for s in buckets] == np.cumsum(total["counts"]).tolist()
    accuracy = next(s for s in families["modelserve_accuracy"].samples if s.labels["model"] == "mlp")
    assert accuracy.value == traffic["accuracy"]


def wait_for_drift(server) -> dict:
    """Drift is observed in the payload log's writer thread: give it a moment after the flush."""
    deadline = time.monotonic() + 15
    while True:
        drift = mlp(dashboard(server)).get("drift")
        if drift and drift["score"] is not None or time.monotonic() > deadline:
            assert drift and drift["score"] is not None, drift
            return drift
        time.sleep(0.2)


def test_assets_served_from_the_package(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for path, kind in (("/dashboard/app.js", "text/javascript"), ("/dashboard/style.css", "text/css")):
            r = client.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-content-type-options"] == "nosniff"
            again = client.get(path, headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
            assert client.head(path).status_code == 200
        # nothing from elsewhere: no CDN, no external font (the SVG namespace is a name, not a fetch)
        for path in ("/dashboard", "/dashboard/app.js", "/dashboard/style.css"):
            text = client.get(path).text.replace("http://www.w3.org/2000/svg", "")
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", text), path
        assert client.get("/dashboard/nope.js").status_code == 404


def test_page_shows_live_numbers(server, traffic, tmp_path):
    wait_for_drift(server)
    url = server.url + "/dashboard?interval=250"

    # 1. after the traffic: the exact counts, latency, accuracy and the drift alert
    doc = dashboard(server)
    dom = Dom(browse(url, tmp_path / "chrome1", "--dump-dom"))
    assert int(dom.one(id="updated")["data-polls"]) >= 3
    assert dom.one(id="conn")["data-state"] == "ok"
    row = dom.one(tag="tr", data_model="mlp", data_version="1")
    cell = {e["data-metric"]: e for e in row_cells(dom, row) if "data-metric" in e}
    assert cell["state"]["text"] == "READY"
    assert int(cell["requests"]["data-value"]) == OK + BAD and cell["requests"]["text"] == str(OK + BAD)
    assert int(dom.one(id="total-requests")["data-value"]) == OK + BAD
    for name in ("p50", "p99"):  # no request since the page opened: the numbers since start
        assert float(cell[name]["data-value"]) == pytest.approx(mlp(doc)["latency"]["total"][f"{name}_s"])
        assert re.fullmatch(r"[\d.]+ ms", cell[name]["text"]), cell[name]["text"]
    assert re.fullmatch(r"[\d.]+ ms", dom.one(id="total-p99")["text"])
    assert float(cell["accuracy"]["data-value"]) == traffic["accuracy"] and cell["accuracy"]["text"] == "75.0 %"
    card = dom.one(tag="article", data_model="mlp", data_version="1")
    card_acc = [e for e in dom.find(data_metric="accuracy") if e is not cell["accuracy"]]
    assert card and len(card_acc) == 1 and card_acc[0]["text"] == "75.0 %"
    drift = mlp(doc)["drift"]
    assert "bad" in cell["drift"]["class"].split()
    assert float(cell["drift"]["data-value"]) == pytest.approx(drift["score"])
    assert cell["drift"]["text"] == f"{drift['score']:.3f}"
    assert dom.find(data_metric="drift", data_alert="true")
    assert dom.one(data_metric="batch-sizes")["data-value"] == ",".join(map(str, mlp(doc)["batch"]["counts"]))
    assert re.search(r"Memory \(RSS\)[\d.]+ MiBof [\d.]+ [GT]iB", dom.one(data_metric="memory")["text"])

    # 2. while traffic flows: a nonzero rate, and charts that grew during this one page load
    stop = threading.Event()
    sent = [0]

    def load():
        rng = np.random.default_rng(2)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                r = client.post("/v2/models/mlp/infer", json=v2_body(rng.standard_normal((1, 16))))
                assert r.status_code == 200, r.text
                sent[0] += 1
                stop.wait(0.005)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while sent[0] < 20:  # the load is flowing before the page opens
            assert worker.is_alive() and time.monotonic() < deadline, f"the load stopped after {sent[0]} requests"
            stop.wait(0.05)
        live = Dom(browse(url, tmp_path / "chrome2", "--dump-dom", budget_ms=4000))
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        browse(url, tmp_path / "chrome3", f"--screenshot={shot}", "--window-size=1400,1000", budget_ms=4000)
    finally:
        stop.set()
        worker.join(30)
    row = live.one(tag="tr", data_model="mlp", data_version="1")
    cells = {e["data-metric"]: e for e in row_cells(live, row) if "data-metric" in e}
    assert float(cells["rps"]["data-value"]) > 0 and float(live.one(id="total-rps")["data-value"]) > 0
    assert int(cells["requests"]["data-value"]) > OK + BAD
    series = live.one(tag="path", data_series="mlp:1")["data-points"].split(",")
    assert len(series) >= 3 and sum(float(p) > 0 for p in series) >= 2, series
    assert int(live.one(tag="svg", data_chart="latency")["data-points"]) >= 2
    assert cells["error-rate"]["text"] == "0.0 %"  # the live traffic is all successes
    # after the traffic: the document counts every request exactly
    assert mlp(dashboard(server))["requests"]["total"] == OK + BAD + sent[0]

    check_png(shot)


def row_cells(dom: Dom, row: dict) -> list[dict]:
    index = dom.elements.index(row)
    cells = []
    for element in dom.elements[index + 1:]:
        if element["tag"] == "tr":
            break
        cells.append(element)
    return cells


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 1000)
    assert len(data) > 30_000, f"{len(data)} bytes: an empty page?"
    from PIL import Image

    with Image.open(path) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50, "a near-blank screenshot"


def test_dashboard_without_payload_log(repo):
    with Server(repo, env={"MODELSERVE_PAYLOAD_LOG": "false"}) as srv:
        srv.url = f"http://{srv.http_url}"
        doc = dashboard(srv)
    assert doc["server"]["payload_log"] is False and doc["server"]["drift"] is False
    assert "payload log off" in doc["server"]["notes"][0]
    v = mlp(doc)
    assert v["state"] == "READY" and v["requests"]["total"] == 0 and "quality" not in v and "drift" not in v
    assert v["latency"]["total"]["p50_s"] is None


# -- the Grafana dashboard --------------------------------------------------------------------------------------

def grafana_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_grafana_dashboard_matches_real_metrics(server, traffic):
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"] == "modelserve"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"].startswith("label_values(modelserve_requests_total")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24

    scrape = httpx.get(server.url + "/metrics").text
    samples: dict[str, set] = {}  # metric name -> its labels, from the samples
    declared = set()  # families the scrape declares (# TYPE), some without a sample yet (MAE with no regression model)
    for family in text_string_to_metric_families(scrape):
        declared.add(family.name)
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    # the GPU's metrics appear only on a GPU server: those names are checked against the source
    gpu_only = {"modelserve_" + name for name in
                re.findall(r'PREFIX \+ "(gpu_\w+)"', (ROOT / "src/modelserve/monitor/metrics.py").read_text())}
    assert {"modelserve_gpu_utilization_ratio", "modelserve_gpu_memory_used_bytes"} <= gpu_only
    exprs = grafana_exprs(dashboard)
    assert any("histogram_quantile" in e and "modelserve_request_duration_seconds_bucket" in e for e in exprs)
    used = set()
    for expr in exprs:
        for name, matchers in re.findall(r"\b((?:modelserve|process)_\w+)(?:\{([^}]*)\})?", expr):
            used.add(name)
            if name in gpu_only and name not in samples:
                continue
            if name not in samples and name in declared:
                continue
            assert name in samples, f"{name} (in {expr}) is not in a real /metrics scrape"
            for label in re.findall(r"(\w+)\s*[=!]~?", matchers or ""):
                assert label == "instance" or label in samples[name], f"{name} has no label {label}: {expr}"
    for wanted in ("modelserve_requests_total", "modelserve_request_duration_seconds_bucket",
                   "modelserve_batch_size_bucket",
                   "modelserve_queue_depth", "modelserve_accuracy", "modelserve_drift_score",
                   "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert wanted in used, wanted
