"""Input drift per model version: PSI and KS by hand on numpy data, then a real server process.

The server serves three models whose ``monitoring.drift`` differ: ``tab`` (16 tabular features, a
reference .npy of evaluation inputs in the model folder), ``first`` (4 features, the first logged
rows are the reference) and ``img`` (a vision model: PNG images in, ``preprocess`` resizes them).
Requests from the reference's distribution must score under the threshold, with alert 0 on
``/metrics``; shifted inputs (+2 sigma on some columns, brightened images) must push exactly the
shifted features' PSI over it and set the alert.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import Server, identity_model, mlp_model, save_model
from onnx import TensorProto, helper
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from modelserve.monitor.drift import DriftTracker, Reference, features, ks_statistic, psi, tensor_features
from modelserve.server.config import DriftConfig, ModelConfig

FEATURES = 16
SHIFTED = [0, 3, 7]  # the tab columns moved by +2 sigma
MU = np.linspace(-3, 3, FEATURES).astype(np.float32)
SIGMA = np.linspace(0.5, 2.0, FEATURES).astype(np.float32)


# -- the scores, by hand ----------------------------------------------------------------------

def psi_by_hand(ref: np.ndarray, cur: np.ndarray, bins: int = 10) -> float:
    edges = np.quantile(ref, np.linspace(0, 1, bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.histogram(ref, edges)[0] / len(ref)
    q = np.histogram(cur, edges)[0] / len(cur)
    p, q = np.maximum(p, 1e-4), np.maximum(q, 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def test_psi_matches_quantile_bins_by_hand_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    ref, same = rng.standard_normal(5000), rng.standard_normal(2000)
    assert psi(ref, same) == pytest.approx(psi_by_hand(ref, same), rel=1e-9)
    assert psi(ref, same) < 0.02
    scores = [psi(ref, same + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert scores == sorted(scores)
    assert 0.05 < scores[2] < 0.4 and scores[-1] > 2.5  # +0.5 sigma: moderate; +2 sigma: far over 0.2
    assert psi(ref, same + 2) == pytest.approx(psi_by_hand(ref, same + 2), rel=1e-9)


def test_psi_of_discrete_and_constant_features():
    # one bin per reference value plus one for anything else: a constant that moves is a shift
    assert psi(np.zeros(500), np.zeros(300)) == 0.0
    assert psi(np.zeros(500), np.ones(300)) == pytest.approx(2 * (1 - 1e-4) * np.log(1 / 1e-4), rel=1e-6)
    ref = np.repeat([0, 1, 2], [500, 300, 200]).astype(float)
    cur = np.repeat([0, 1, 2], [200, 300, 500]).astype(float)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    assert psi(ref, cur) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)


def test_ks_statistic_is_the_largest_cdf_gap():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2, 3], [4, 5]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(700), rng.standard_normal(300) + 0.3
    grid = np.concatenate([a, b])
    by_hand = max(abs((a <= v).mean() - (b <= v).mean()) for v in grid)
    assert ks_statistic(a, b) == pytest.approx(by_hand)
    assert Reference(a).ks(np.sort(b)) == pytest.approx(by_hand)


def test_features_of_tables_and_images():
    rng = np.random.default_rng(3)
    table = tensor_features("x", rng.standard_normal((5, 3)).astype(np.float32))
    assert sorted(table) == ["x[0]", "x[1]", "x[2]"]
    wide = rng.standard_normal((5, 100))
    assert sorted(tensor_features("w", wide)) == ["w.max", "w.mean", "w.min", "w.std"]
    assert np.allclose(tensor_features("w", wide)["w.mean"], wide.mean(axis=1))
    nchw = rng.random((4, 3, 8, 8)).astype(np.float32)
    f = tensor_features("im", nchw)
    assert np.allclose(f["im.c1.mean"], nchw[:, 1].mean(axis=(1, 2)), atol=1e-6)
    assert np.allclose(f["im.c2.std"], nchw[:, 2].std(axis=(1, 2)), atol=1e-6)
    assert np.allclose(f["im.brightness"], nchw.mean(axis=(1, 2, 3)), atol=1e-6)
    assert np.allclose(f["im.contrast"], nchw.std(axis=(1, 2, 3)), atol=1e-6)
    nhwc = np.moveaxis(nchw, 1, -1)
    assert all(np.allclose(tensor_features("im", nhwc)[k], v, atol=1e-6) for k, v in f.items())
    pixels = tensor_features("image", (nhwc * 255).astype(np.uint8), pixels=True)
    assert sorted(pixels)[:3] == ["image.B.mean", "image.B.std", "image.G.mean"]
    assert "x" not in tensor_features("x", np.array([b"a", b"b"], dtype=object))


def test_tracker_first_requests_then_window_and_reset():
    config = ModelConfig(name="m", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "dims": [2]}],
                         monitoring={"drift": {"reference_size": 40, "window": 30, "min_samples": 20}})
    tracker = DriftTracker()
    batch = np.arange(16, dtype=np.float32).reshape(8, 2)
    for _ in range(6):  # 48 rows: 40 to the reference, 8 to the window
        tracker.observe([("m", "1", {"x": batch}, config)])
    d = tracker.snapshot()["m"]["1"]
    assert d["reference"] == {"source": "first_requests", "samples": 40, "complete": True}
    assert d["window"] == 8 and d["score"] is None and not d["alert"]
    for _ in range(5):  # the window keeps its last 30 rows
        tracker.observe([("m", "1", {"x": batch + 100}, config)])
    d = tracker.snapshot("m")["m"]["1"]
    assert d["window"] == 30 and d["alert"] and d["score"] == d["features"]["x[0]"]["psi"] > 5
    assert d["features"]["x[1]"]["ks"] == 1.0
    assert d["features"]["x[1]"]["window_mean"] == pytest.approx((6 * 110 + 24 * 108) / 30)
    assert tracker.reset("m") == ["1"]
    assert tracker.snapshot()["m"]["1"]["reference"] == {"source": "first_requests", "samples": 0,
                                                         "complete": False}
    assert tracker.snapshot("other") == {}


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def test_encoded_images_are_decoded_small_and_summarized_on_their_pixels():
    config = ModelConfig(name="v", max_batch_size=8, preprocess={"resize": [16, 16]},
                         inputs=[{"name": "image", "datatype": "BYTES", "dims": [1]}])
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    big = np.full((400, 300, 3), (10, 120, 240), np.uint8)  # decoded at thumbnail size: same means
    images = np.array([encoded(p) for p in small] + [encoded(big, "JPEG"), b"not an image"], dtype=object)
    f = features({"image": images.reshape(-1, 1)}, config)
    assert sorted(f) == sorted([f"image.{c}.{s}" for c in "RGB" for s in ("mean", "std")]
                               + ["image.brightness", "image.contrast"])
    assert len(f["image.R.mean"]) == 4  # the undecodable one is left out
    assert np.allclose(f["image.G.mean"][:3], small[..., 1].mean(axis=(1, 2)))
    assert np.allclose(f["image.B.std"][:3], small[..., 2].std(axis=(1, 2)))
    assert np.allclose(f["image.brightness"][:3], small.mean(axis=(1, 2, 3)))
    assert [f[f"image.{c}.mean"][3] for c in "RGB"] == pytest.approx([10, 120, 240], abs=3)
    # a reference file of decoded pixels under the image input's name gives the same features
    assert sorted(tensor_features("image", small, pixels=True)) == sorted(f)
    assert np.allclose(tensor_features("image", small, pixels=True)["image.G.mean"], f["image.G.mean"][:3])


def test_reference_file_loaded_once_subsampled_or_reported(tmp_path):
    config = ModelConfig(name="m", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "dims": [2]}],
                         monitoring={"drift": {"reference": "ref.npz", "reference_size": 100, "window": 20,
                                               "min_samples": 10}})
    (tmp_path / "m" / "1").mkdir(parents=True)
    np.savez(tmp_path / "m" / "ref.npz", x=np.random.default_rng(5).standard_normal((1000, 2)))
    tracker = DriftTracker().attach(tmp_path)
    tracker.observe([("m", "1", {"x": np.zeros((10, 2), np.float32)}, config)])
    d = tracker.snapshot()["m"]["1"]
    assert d["reference"] == {"source": "file:ref.npz", "samples": 100, "complete": True}
    assert d["window"] == 10 and d["features"]["x[0]"]["ks"] == pytest.approx(0.5, abs=0.15)
    assert d["features"]["x[0]"]["reference_mean"] == pytest.approx(0, abs=0.3)
    missing = config.model_copy(update={"monitoring": config.monitoring.model_copy(update={
        "drift": config.monitoring.drift.model_copy(update={"reference": "gone.npy"})})})
    tracker.observe([("m", "2", {"x": np.zeros((10, 2), np.float32)}, missing)])
    d = tracker.snapshot()["m"]["2"]
    assert d["reference"]["source"] == "file:gone.npy" and not d["reference"]["complete"]
    assert "no such file" in d["reference"]["error"] and d["score"] is None and d["window"] == 0


def test_drift_config_is_checked():
    assert DriftConfig().model_dump() == {"enabled": True, "reference": None, "reference_size": 1000,
                                          "window": 1000, "bins": 10, "threshold": 0.2, "min_samples": 100}
    for bad in ({"reference": "../x.npy"}, {"reference": "/etc/x.npy"}, {"reference": "x.csv"},
                {"window": 50, "min_samples": 100}, {"colour": 1}):
        with pytest.raises(ValueError):
            DriftConfig(**bad)


# -- a real server --------------------------------------------------------------------------

IMG = 24  # the images sent: IMG x IMG RGB PNGs


def mean_model(path):
    """images FP32 [b, 3, 16, 16] -> their per-channel mean [b, 3]."""
    return save_model([helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0)],
                      [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                      [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3])], path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("drift-repo")
    mlp_model(repo / "tab" / "1" / "model.onnx")
    rng = np.random.default_rng(10)
    np.save(repo / "tab" / "eval.npy", (rng.standard_normal((4000, FEATURES)) * SIGMA + MU).astype(np.float32))
    (repo / "tab" / "config.yaml").write_text(
        "max_batch_size: 64\nmonitoring:\n  drift: {reference: eval.npy, reference_size: 2000, window: 512, "
        "min_samples: 256}\n")
    identity_model(repo / "first" / "1" / "model.onnx", "FP32")
    (repo / "first" / "config.yaml").write_text(
        "max_batch_size: 64\nmonitoring: {drift: {reference_size: 512, window: 512, min_samples: 256}}\n")
    identity_model(repo / "quiet" / "1" / "model.onnx", "FP32")
    (repo / "quiet" / "config.yaml").write_text("monitoring: {payload_log: false}\n")
    mean_model(repo / "img" / "1" / "model.onnx")
    (repo / "img" / "config.yaml").write_text(
        "max_batch_size: 32\npreprocess: {resize: [16, 16]}\n"
        "monitoring: {drift: {reference_size: 150, window: 150, min_samples: 100, bins: 5}}\n")
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-db")
    with Server(repo, "--monitor-db", f"sqlite:///{tmp / 'monitor.db'}", "--monitor-spill",
                str(tmp / "spill.jsonl")) as srv:
        with httpx.Client(base_url=f"http://{srv.http_url}", timeout=60) as client:
            srv.client = client
            yield srv


def send(client: httpx.Client, model: str, x: np.ndarray, name: str = "x", rows: int = 64) -> None:
    for start in range(0, len(x), rows):
        part = x[start:start + rows]
        r = client.post(f"/v2/models/{model}/infer", json={"inputs": [
            {"name": name, "shape": list(part.shape), "datatype": "FP32", "data": part.ravel().tolist()}]})
        assert r.status_code == 200, r.text


def drift(client: httpx.Client, model: str) -> dict:
    assert client.post("/v2/logs/flush?timeout_s=30").status_code == 200  # the writer has seen everything
    r = client.get(f"/v2/models/{model}/drift")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["versions"]["1"]


def scrape(client: httpx.Client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        if family.name.startswith("modelserve_drift"):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def gauge(metrics: dict, name: str, **labels) -> float:
    return metrics[(f"modelserve_drift_{name}", tuple(sorted(labels.items())))]


def test_tabular_reference_file_then_shifted_columns(server):
    client, rng = server.client, np.random.default_rng(20)
    send(client, "tab", (rng.standard_normal((512, FEATURES)) * SIGMA + MU).astype(np.float32))
    d = drift(client, "tab")
    assert d["reference"] == {"source": "file:eval.npy", "samples": 2000, "complete": True}
    assert d["window"] == 512 and d["threshold"] == 0.2 and not d["alert"]
    assert sorted(d["features"]) == sorted(f"x[{j}]" for j in range(FEATURES))
    assert all(f["psi"] < 0.1 and f["ks"] < 0.1 for f in d["features"].values()), d["features"]
    assert d["score"] == max(f["psi"] for f in d["features"].values()) < 0.1
    m = scrape(client)
    assert gauge(m, "alert", model="tab", version="1") == 0.0
    assert gauge(m, "score", model="tab", version="1") == pytest.approx(d["score"])
    assert gauge(m, "samples", model="tab", version="1", set="reference") == 2000
    assert gauge(m, "samples", model="tab", version="1", set="window") == 512
    assert gauge(m, "psi", model="tab", version="1", feature="x[3]") == pytest.approx(d["features"]["x[3]"]["psi"])

    shifted = (rng.standard_normal((512, FEATURES)) * SIGMA + MU).astype(np.float32)
    shifted[:, SHIFTED] += 2 * SIGMA[SHIFTED]
    send(client, "tab", shifted)  # the window (512 rows) now holds only shifted requests
    d = drift(client, "tab")
    assert d["alert"] and d["window"] == 512
    for j in range(FEATURES):
        f = d["features"][f"x[{j}]"]
        if j in SHIFTED:
            assert f["psi"] > 2.0 and f["ks"] > 0.6, (j, f)
            assert f["window_mean"] == pytest.approx(float(MU[j] + 2 * SIGMA[j]), abs=0.2 * float(SIGMA[j]))
        else:
            assert f["psi"] < 0.1 and f["ks"] < 0.1, (j, f)
    m = scrape(client)
    assert gauge(m, "alert", model="tab", version="1") == 1.0
    assert gauge(m, "score", model="tab", version="1") == pytest.approx(d["score"]) and d["score"] > 2.0
    assert gauge(m, "psi", model="tab", version="1", feature="x[0]") > 2.0
    assert gauge(m, "ks", model="tab", version="1", feature="x[7]") == pytest.approx(d["features"]["x[7]"]["ks"])
    assert gauge(m, "psi", model="tab", version="1", feature="x[1]") < 0.1


def test_first_requests_reference_then_reset(server):
    client, rng = server.client, np.random.default_rng(30)
    send(client, "first", rng.standard_normal((300, 4)).astype(np.float32), name="INPUT0")
    d = drift(client, "first")
    assert d["reference"] == {"source": "first_requests", "samples": 300, "complete": False}
    assert d["window"] == 0 and d["score"] is None and d["features"] == {}
    send(client, "first", rng.standard_normal((212 + 512, 4)).astype(np.float32), name="INPUT0")
    d = drift(client, "first")
    assert d["reference"] == {"source": "first_requests", "samples": 512, "complete": True}
    assert d["window"] == 512 and d["score"] < 0.1 and not d["alert"]
    x = rng.standard_normal((512, 4)).astype(np.float32)
    x[:, 2] += 2
    send(client, "first", x, name="INPUT0")
    d = drift(client, "first")
    assert d["alert"] and d["score"] == d["features"]["INPUT0[2]"]["psi"] > 2.0
    assert max(d["features"][f"INPUT0[{j}]"]["psi"] for j in (0, 1, 3)) < 0.1
    assert gauge(scrape(client), "alert", model="first", version="1") == 1.0

    r = client.post("/v2/models/first/drift/reset")
    assert r.json() == {"model": "first", "reset": ["1"]}
    for unknown in (client.get("/v2/models/nosuch/drift"), client.post("/v2/models/nosuch/drift/reset"),
                    client.get("/v2/models/nosuch/quality")):
        assert unknown.status_code == 404 and "'nosuch'" in unknown.json()["error"]
    d = drift(client, "first")
    assert d["reference"] == {"source": "first_requests", "samples": 0, "complete": False}
    assert d["score"] is None and not d["alert"]
    send(client, "first", x, name="INPUT0")  # the shifted inputs are the new normal
    assert drift(client, "first")["reference"]["samples"] == 512

    # payload_log: false -> no drift either
    send(client, "quiet", x[:64], name="INPUT0", rows=32)
    assert client.get("/v2/models/quiet/drift").json() == {"model": "quiet", "versions": {}}
    every = client.get("/v2/drift").json()["models"]
    assert {"tab", "first"} <= set(every) and "quiet" not in every


def png(rng: np.random.Generator, level: float) -> bytes:
    base = rng.normal(level, 12.0) + rng.normal(0, 4.0, 3)  # each image: its own brightness and tint
    pixels = np.clip(base + rng.normal(0, 25.0, (IMG, IMG, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def send_images(url: str, images: list[bytes], chunk: int = 25) -> None:
    client = httpclient.InferenceServerClient(url)
    try:
        for start in range(0, len(images), chunk):
            part = np.array(images[start:start + chunk], dtype=object).reshape(-1, 1)
            x = httpclient.InferInput("image", list(part.shape), "BYTES")
            x.set_data_from_numpy(part)
            assert client.infer("img", [x]).as_numpy("means").shape == (len(part), 3)
    finally:
        client.close()


def test_brightened_images_raise_the_channel_mean_psi(server):
    client, rng = server.client, np.random.default_rng(40)
    send_images(server.http_url, [png(rng, 100.0) for _ in range(300)])
    d = drift(client, "img")
    assert d["reference"] == {"source": "first_requests", "samples": 150, "complete": True}
    # the image bytes decoded here (image.R.mean ...) or, where the vision stage hands the preprocessed
    # tensor on in their place, that tensor (images.c0.mean ...): the same statistics in other units
    prefix = "image" if "image.brightness" in d["features"] else "images"
    channels = ["R", "G", "B"] if prefix == "image" else ["c0", "c1", "c2"]
    scale = 1.0 if prefix == "image" else 1 / 255
    means = [f"{prefix}.{c}.mean" for c in channels]
    assert set(means) | {f"{prefix}.brightness", f"{prefix}.contrast"} <= set(d["features"])
    assert d["window"] == 150 and not d["alert"] and d["score"] < 0.2, d["features"]
    assert d["features"][means[0]]["reference_mean"] == pytest.approx(100 * scale, rel=0.05)

    send_images(server.http_url, [png(rng, 160.0) for _ in range(150)])
    d = drift(client, "img")
    assert d["alert"]
    for name in means + [f"{prefix}.brightness"]:
        f = d["features"][name]
        assert f["psi"] > 2.0 and f["ks"] > 0.8, (name, f)
        assert f["window_mean"] == pytest.approx(160 * scale, rel=0.05)
    assert gauge(scrape(client), "psi", model="img", version="1", feature=means[1]) > 2.0
