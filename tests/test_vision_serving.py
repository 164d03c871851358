"""Vision models served declaratively, end to end: a real ``modelserve serve`` process on 127.0.0.1,
real clients (httpx, tritonclient.http, tritonclient.grpc) and real images encoded with Pillow.

The classifier is the demo digits model (scikit-learn -> ONNX, input ``pixels`` FP32 [N, 64] in 0..16)
served twice: plain as ``digits`` and, as a copy of the same ONNX file, as ``digits-image`` whose
``config.yaml`` declares the preprocessing (grey, 8x8, area resize, pixel * 16/255) and a top-3
classification postprocess. Every expectation is computed independently: the digits test split is
rendered as 8-bit grey (round(v * 255 / 16)), preprocessed by hand in numpy and sent to the plain
model over /v2 infer; images served through ``digits-image`` on every protocol must answer the same.

The detector is built here with onnx.helper: constant boxes/scores broadcast to the batch, so the
expected detections (score threshold, class-wise NMS, letterbox mapped back to the original image)
are known by hand.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import Server, save_model
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tritonclient.utils import InferenceServerException

pytest.importorskip("sklearn", reason="needs scikit-learn (pip install 'modelserve[demo]')")
pytest.importorskip("skl2onnx", reason="needs skl2onnx (pip install 'modelserve[demo]')")

SCALE = 0.0627450980392  # 16 / 255: 8-bit grey back to the digits' 0..16
TOP_K = 3
LABELS = [f"digit-{i}" for i in range(10)]
DETECTOR_LABELS = ["cat", "dog", "bird"]

DIGITS_IMAGE_CONFIG = f"""\
name: digits-image
backend: onnxruntime
max_batch_size: 32
inputs:
  - {{name: pixels, datatype: FP32, dims: [64]}}
dynamic_batching:
  max_queue_delay_microseconds: 20000
preprocess: {{input: image, color: L, resize: [8, 8], interpolation: area, scale: {SCALE}}}
postprocess: {{kind: classification, output: probabilities, top_k: {TOP_K}, labels: labels.txt}}
"""

DETECTOR_CONFIG = f"""\
name: detector
backend: onnxruntime
max_batch_size: 8
inputs:
  - {{name: images, datatype: FP32, dims: [3, 64, 64]}}
preprocess: {{resize: [64, 64], resize_mode: letterbox}}
postprocess:
  kind: detection
  boxes: boxes
  scores: scores
  score_threshold: 0.3
  iou_threshold: 0.5
  labels: {json.dumps(DETECTOR_LABELS)}
"""

# The detector's constant output, in model-input pixels (64 x 64, xyxy) and per-class scores.
DETECTOR_BOXES = np.array([
    [10, 20, 30, 40],  # 0: cat 0.9                      -> kept, first
    [11, 21, 31, 41],  # 1: cat 0.8, IoU ~0.9 with box 0  -> suppressed by NMS
    [12, 22, 32, 42],  # 2: dog 0.7, overlaps box 0       -> kept (NMS is class-wise)
    [40, 18, 60, 44],  # 3: bird 0.2                      -> under the score threshold
    [34, 30, 50, 46],  # 4: bird 0.6                      -> kept, last
], np.float32)
DETECTOR_SCORES = np.array([
    [0.90, 0.05, 0.10],
    [0.80, 0.10, 0.05],
    [0.10, 0.70, 0.20],
    [0.05, 0.10, 0.20],
    [0.15, 0.05, 0.60],
], np.float32)


# -- images ---------------------------------------------------------------------------------------

def encode(grey: np.ndarray, fmt: str, size: tuple[int, int] | None = None, **kwargs) -> bytes:
    """An 8-bit grey image, upscaled with NEAREST to ``size`` (w, h), encoded as PNG/JPEG."""
    image = Image.fromarray(grey)
    if size is not None and size != image.size:
        image = image.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def size_for(i: int) -> tuple[int, int]:
    """Mixed sizes, integer multiples of 8 on each axis (so an area resize gives the digit back)."""
    factors = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 2), (2, 5), (7, 7), (8, 3), (6, 6), (1, 4)]
    fx, fy = factors[i % len(factors)]
    return 8 * fx, 8 * fy


@pytest.fixture(scope="module")
def digits_split():
    """The sklearn digits test split as 8-bit grey images, and their true labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, images, _, labels = train_test_split(d.images, d.target, test_size=0.25, random_state=0)
    grey = np.round(images * 255 / 16).astype(np.uint8)
    assert grey.shape == (450, 8, 8) and grey.max() == 255
    return grey, labels


@pytest.fixture(scope="module")
def pngs(digits_split):
    grey, _ = digits_split
    return [encode(g, "PNG", size_for(i)) for i, g in enumerate(grey)]


@pytest.fixture(scope="module")
def jpegs(digits_split):
    grey, _ = digits_split
    return [encode(g, "JPEG", size_for(i), quality=95) for i, g in enumerate(grey)]


# -- the repository and the server ------------------------------------------------------------------

def detector_model(path):
    """images [N,3,64,64] -> boxes [N,5,4] and scores [N,5,3]: the constants above, one copy per image.
    The batch dim comes from the input: ones[N] = ReduceMean(x) * 0 + 1, reshaped to [N,1,1]."""
    inits = [numpy_helper.from_array(DETECTOR_BOXES, "box_const"),
             numpy_helper.from_array(DETECTOR_SCORES, "score_const"),
             numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
             numpy_helper.from_array(np.array([1.0], np.float32), "one"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "n11")]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["ones"]),
        helper.make_node("Reshape", ["ones", "n11"], ["ones11"]),
        helper.make_node("Mul", ["ones11", "box_const"], ["boxes"]),
        helper.make_node("Mul", ["ones11", "score_const"], ["scores"]),
    ]
    return save_model(
        nodes,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 5, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5, 3])],
        path, inits,
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from modelserve.demo import build_demo_repository

    repo = tmp_path_factory.mktemp("vision-repo")
    build_demo_repository(repo)
    folder = repo / "digits-image"  # the demo writes one too: this test's own config replaces it
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "1").mkdir(parents=True)
    shutil.copy(repo / "digits" / "1" / "model.onnx", folder / "1" / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "config.yaml").write_text(DIGITS_IMAGE_CONFIG)
    detector_model(repo / "detector" / "1" / "model.onnx")
    (repo / "detector" / "config.yaml").write_text(DETECTOR_CONFIG)
    return repo


@pytest.fixture(scope="module")
def srv(repo):
    with Server(repo) as server:
        yield server


@pytest.fixture(scope="module")
def web(srv):
    with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def http(srv):
    client = httpclient.InferenceServerClient(srv.http_url, concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(srv):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def by_hand(digits_split, http):
    """Probabilities of the plain ``digits`` model for the split, preprocessed here in numpy."""
    grey, labels = digits_split
    pixels = (grey.reshape(len(grey), 64).astype(np.float64) * SCALE).astype(np.float32)
    probs = []
    for start in range(0, len(pixels), 64):
        chunk = pixels[start:start + 64]
        x = httpclient.InferInput("pixels", list(chunk.shape), "FP32")
        x.set_data_from_numpy(chunk)
        probs.append(http.infer("digits", [x]).as_numpy("probabilities"))
    probs = np.concatenate(probs)
    assert probs.shape == (450, 10)
    # the pixels and the model are right: the by-hand answers are the true digits
    assert (probs.argmax(1) == labels).mean() >= 0.97
    return probs


# -- checking answers -------------------------------------------------------------------------------

def check_top_k(probs_row: np.ndarray, classes, scores, labels, where: str) -> None:
    """A served top-k answer equals the by-hand probabilities: best classes in order, their scores,
    their names. Compared through the scores so that near-ties among the runners-up cannot flip it."""
    classes, scores = [int(c) for c in classes], np.asarray(scores, np.float64)
    assert len(classes) == len(scores) == len(labels) == TOP_K, where
    assert classes[0] == int(np.argmax(probs_row)), where
    assert len(set(classes)) == TOP_K, where
    np.testing.assert_allclose(scores, probs_row[classes], rtol=1e-4, atol=1e-6, err_msg=where)
    np.testing.assert_allclose(scores, np.sort(probs_row)[::-1][:TOP_K], rtol=1e-4, atol=1e-6, err_msg=where)
    assert [lb.decode() if isinstance(lb, bytes) else lb for lb in labels] == [LABELS[c] for c in classes], where


def image_tensor(images: list[bytes], module=httpclient):
    x = module.InferInput("image", [len(images), 1], "BYTES")
    x.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    return x


def infer_images(client, module, images: list[bytes], chunk: int = 30):
    """(labels, scores, classes) of ``images`` through ``digits-image`` with a Triton client."""
    labels, scores, classes = [], [], []
    for start in range(0, len(images), chunk):
        result = client.infer("digits-image", [image_tensor(images[start:start + chunk], module)])
        labels.append(result.as_numpy("labels"))
        scores.append(result.as_numpy("scores"))
        classes.append(result.as_numpy("classes"))
    return np.concatenate(labels), np.concatenate(scores), np.concatenate(classes)


def predict(web, images: list[bytes], model: str = "digits-image") -> list[dict]:
    files = [("image", (f"img{i}.png", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = web.post(f"/models/{model}/predict", files=files)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


# -- 1. the classifier on every protocol ------------------------------------------------------------

def test_metadata_shows_the_image_input_and_answer_outputs(http, grpc, web):
    meta = http.get_model_metadata("digits-image")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {(o["name"], o["datatype"]) for o in meta["outputs"]} == {
        ("labels", "BYTES"), ("scores", "FP32"), ("classes", "INT32")}
    gmeta = grpc.get_model_metadata("digits-image", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in gmeta["inputs"]] == [("image", "BYTES", ["-1", "1"])]
    assert sorted(t["name"] for t in gmeta["outputs"]) == ["classes", "labels", "scores"]
    # the plain model keeps its own tensors: the stage belongs to digits-image only
    plain = http.get_model_metadata("digits")
    assert [t["name"] for t in plain["inputs"]] == ["pixels"]
    tf = web.get("/v1/models/digits-image/metadata").json()
    sig = tf["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["image"]["dtype"] == "DT_STRING"
    assert set(sig["outputs"]) == {"labels", "scores", "classes"}


def test_pngs_over_v2_binary_equal_preprocessing_by_hand(http, pngs, by_hand, digits_split):
    _, truth = digits_split
    labels, scores, classes = infer_images(http, httpclient, pngs)
    assert classes.shape == scores.shape == labels.shape == (450, TOP_K)
    assert labels.dtype == object and scores.dtype == np.float32 and classes.dtype == np.int32
    for i in range(len(pngs)):
        check_top_k(by_hand[i], classes[i], scores[i], labels[i], f"png {i} {size_for(i)}")
    assert (classes[:, 0] == truth).mean() >= 0.97  # right digits, as by hand


def test_jpegs_over_grpc_agree_with_by_hand(grpc, jpegs, pngs, by_hand, digits_split):
    _, truth = digits_split
    labels, scores, classes = infer_images(grpc, grpcclient, jpegs)
    assert classes.shape == (450, TOP_K)
    agree = (classes[:, 0] == by_hand.argmax(1)).mean()
    assert agree >= 0.90, f"only {agree:.1%} of JPEGs agree with the by-hand top-1"
    assert (classes[:, 0] == truth).mean() >= 0.90
    assert all(lb.decode() == LABELS[c] for row_l, row_c in zip(labels, classes) for lb, c in zip(row_l, row_c))
    # lossless PNGs over gRPC: exactly the by-hand answers
    labels, scores, classes = infer_images(grpc, grpcclient, pngs[:40])
    for i in range(40):
        check_top_k(by_hand[i], classes[i], scores[i], labels[i], f"grpc png {i}")


def test_predict_route_raw_body_png_and_jpeg(web, pngs, jpegs, by_hand):
    for i in range(6):
        for data, kind in ((pngs[i], "image/png"), (jpegs[i], "image/jpeg")):
            response = web.post("/models/digits-image/predict", content=data, headers={"content-type": kind})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_name"] == "digits-image" and body["model_version"] == "1"
            [answer] = body["predictions"]
            if kind == "image/png":
                check_top_k(by_hand[i], answer["classes"], answer["scores"], answer["labels"], f"raw png {i}")
            else:
                assert answer["labels"] == [LABELS[c] for c in answer["classes"]]
    # a version named in the path
    response = web.post("/models/digits-image/versions/1/predict", content=pngs[7])
    assert response.status_code == 200, response.text
    [answer] = response.json()["predictions"]
    check_top_k(by_hand[7], answer["classes"], answer["scores"], answer["labels"], "versioned png 7")


def test_predict_route_multipart_mixed_sizes_in_order(web, pngs, by_hand):
    picked = list(range(100, 124))  # 24 files, ten different sizes among them
    assert len({Image.open(io.BytesIO(pngs[i])).size for i in picked}) == 10
    answers = predict(web, [pngs[i] for i in picked])
    assert len(answers) == len(picked)
    for answer, i in zip(answers, picked):  # each answer in its file's place
        check_top_k(by_hand[i], answer["classes"], answer["scores"], answer["labels"], f"multipart png {i}")


def test_area_resize_of_odd_sizes_equals_pillow_box_by_hand(web, http, digits_split):
    """Sizes that are no multiple of 8: the declared area resize is Pillow's BOX filter to 8x8, done
    here by hand and fed to the plain model; the served answers must be the same."""
    grey, _ = digits_split
    sizes = [(20, 20), (13, 29), (50, 11), (9, 9), (100, 37)]
    images = [encode(grey[200 + i], "PNG", size) for i, size in enumerate(sizes)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(data)).resize((8, 8), Image.Resampling.BOX))
                       for data in images]).reshape(len(images), 64)
    assert any((p != g.reshape(64)).any() for p, g in zip(pixels, grey[200:205]))  # not simply the digit back
    x = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    x.set_data_from_numpy((pixels.astype(np.float64) * SCALE).astype(np.float32))
    probs = http.infer("digits", [x]).as_numpy("probabilities")
    for answer, row, size in zip(predict(web, images), probs, sizes):
        check_top_k(row, answer["classes"], answer["scores"], answer["labels"], f"area resize {size}")


def test_v2_rest_json_header_with_binary_bytes_input(web, pngs, by_hand):
    """A hand-written V2 request: the JSON header names the BYTES input, whose elements (4-byte length
    + the encoded image each) follow as binary data; the outputs are asked for as JSON."""
    picked = [3, 50, 77, 200, 311, 449]
    raw = b"".join(struct.pack("<I", len(pngs[i])) + pngs[i] for i in picked)
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(picked), 1],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in ("labels", "scores", "classes")],
    }).encode()
    response = web.post("/v2/models/digits-image/infer", content=header + raw,
                        headers={"Inference-Header-Content-Length": str(len(header)),
                                 "content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["labels"]["datatype"] == "BYTES" and outputs["labels"]["shape"] == [len(picked), TOP_K]
    labels = np.array(outputs["labels"]["data"], dtype=object).reshape(len(picked), TOP_K)
    scores = np.array(outputs["scores"]["data"]).reshape(len(picked), TOP_K)
    classes = np.array(outputs["classes"]["data"]).reshape(len(picked), TOP_K)
    for row, i in enumerate(picked):
        check_top_k(by_hand[i], classes[row], scores[row], labels[row], f"v2 json png {i}")
    # JSON strings cannot carry PNG bytes (not UTF-8); text that is not an image is refused by name
    response = web.post("/v2/models/digits-image/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["hello, not a picture"]}]})
    assert response.status_code == 400
    assert "cannot identify image format" in response.json()["error"]


def test_tf_serving_rest_b64_rows(web, pngs, by_hand):
    picked = [9, 21, 33, 45]
    rows = [[{"b64": base64.b64encode(pngs[i]).decode()}] for i in picked]  # each row: the [1] image input
    response = web.post("/v1/models/digits-image:predict", json={"instances": rows})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(picked)
    for p, i in zip(predictions, picked):
        check_top_k(by_hand[i], p["classes"], p["scores"], p["labels"], f"tf rows png {i}")
    columns = {"image": [[{"b64": base64.b64encode(pngs[i]).decode()}] for i in picked]}
    response = web.post("/v1/models/digits-image:predict", json={"inputs": columns})
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    for row, i in enumerate(picked):
        check_top_k(by_hand[i], outputs["classes"][row], outputs["scores"][row], outputs["labels"][row],
                    f"tf columns png {i}")


def test_tf_serving_rest_b64_instances_as_documented(web, pngs, by_hand):
    """The README's form: one {"b64": ...} per instance (TF Serving's image-bytes convention)."""
    response = web.post("/v1/models/digits-image:predict",
                        json={"instances": [{"b64": base64.b64encode(pngs[i]).decode()} for i in (1, 2)]})
    assert response.status_code == 200, response.text
    for p, i in zip(response.json()["predictions"], (1, 2)):
        check_top_k(by_hand[i], p["classes"], p["scores"], p["labels"], f"tf b64 png {i}")


# -- 2. images of different sizes batch together ----------------------------------------------------

def model_stats(web, model: str) -> dict:
    response = web.get(f"/v2/models/{model}/stats")
    assert response.status_code == 200, response.text
    [stats] = response.json()["model_stats"]
    return stats


def test_concurrent_requests_of_different_sizes_batch_together(web, srv, digits_split, by_hand):
    grey, _ = digits_split
    n = 16
    # every request a different size: any batch of two or more mixes sizes
    sizes = [(8 + 8 * i, 8 * (1 + (i * 5) % 7)) for i in range(n)]
    assert len(set(sizes)) == n
    images = [encode(grey[i], "PNG", sizes[i]) for i in range(n)]
    before = model_stats(web, "digits-image")
    barrier = threading.Barrier(n)

    def one(i: int) -> dict:
        with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as client:
            barrier.wait()
            response = client.post("/models/digits-image/predict", content=images[i])
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    for i, answer in enumerate(answers):
        check_top_k(by_hand[i], answer["classes"], answer["scores"], answer["labels"], f"concurrent {sizes[i]}")
    after = model_stats(web, "digits-image")
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == n
    assert executions < n, f"{n} requests ran as {executions} model executions: nothing was batched"
    grown = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    was = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert any(size > 1 and count > was.get(size, 0) for size, count in grown.items()), after["batch_stats"]


# -- 3. detection: letterbox in, class-wise NMS, boxes back in original pixels -----------------------

def expected_detections(width: int, height: int) -> list[tuple[list[float], float, str]]:
    """By hand: threshold 0.3, class-wise NMS at IoU 0.5, then undo the 64x64 letterbox."""
    scale = min(64 / width, 64 / height)
    pad_x, pad_y = (64 - round(width * scale)) // 2, (64 - round(height * scale)) // 2
    out = []
    for k in (0, 2, 4):  # box 1 suppressed by box 0 (same class), box 3 under the threshold
        x1, y1, x2, y2 = DETECTOR_BOXES[k].astype(np.float64)
        box = [(x1 - pad_x) / scale, (y1 - pad_y) / scale, (x2 - pad_x) / scale, (y2 - pad_y) / scale]
        box = [min(max(v, 0.0), lim) for v, lim in zip(box, (width, height, width, height))]
        cls = int(DETECTOR_SCORES[k].argmax())
        out.append((box, float(DETECTOR_SCORES[k, cls]), DETECTOR_LABELS[cls]))
    return out


def rgb_png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_detection_boxes_mapped_back_through_the_letterbox(web, http, grpc):
    wide = rgb_png(128, 64)  # scale 0.5, 16 rows of padding above and below
    expected = expected_detections(128, 64)
    assert [e[0] for e in expected] == [[20, 8, 60, 48], [24, 12, 64, 52], [68, 28, 100, 60]]
    [answer] = predict(web, [wide], model="detector")
    got = answer["detections"]
    assert [d["label"] for d in got] == ["cat", "dog", "bird"]
    assert [d["class"] for d in got] == [0, 1, 2]
    for d, (box, score, _) in zip(got, expected):
        assert d["box"] == pytest.approx(box, abs=0.01)
        assert d["score"] == pytest.approx(score, rel=1e-6)
    assert [d["score"] for d in got] == sorted((d["score"] for d in got), reverse=True)

    # a tall image in the same V2 request: padding on the sides instead, and a box clipped at x = 0
    tall = rgb_png(64, 128, seed=1)
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        x = module.InferInput("image", [2, 1], "BYTES")
        x.set_data_from_numpy(np.array([[wide], [tall]], dtype=object))
        result = client.infer("detector", [x])
        n = result.as_numpy("num_detections")
        boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
        labels, classes = result.as_numpy("labels"), result.as_numpy("classes")
        assert n.tolist() == [[3], [3]]
        for row, (w, h) in enumerate(((128, 64), (64, 128))):
            exp = expected_detections(w, h)
            np.testing.assert_allclose(boxes[row], [e[0] for e in exp], atol=1e-3)
            np.testing.assert_allclose(scores[row], [e[1] for e in exp], rtol=1e-6)
            assert [lb.decode() for lb in labels[row]] == [e[2] for e in exp]
            assert classes[row].tolist() == [0, 1, 2]
        assert expected_detections(64, 128)[0][0] == [0, 40, 28, 80]  # (10 - 16) / 0.5 clipped to 0


# -- 4. bad uploads, and the server keeps serving ---------------------------------------------------

def png_declaring(width: int, height: int) -> bytes:
    """A PNG written by hand: a header declaring width x height (1-bit grey) and one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_are_refused_by_name_and_the_server_keeps_serving(web, http, grpc, srv, pngs, jpegs, by_hand):
    def refused(body: bytes, status: int, *phrases: str, kind: str = "application/octet-stream") -> None:
        response = web.post("/models/digits-image/predict", content=body, headers={"content-type": kind})
        assert response.status_code == status, (phrases, response.text)
        error = response.json()["error"]
        for phrase in phrases:
            assert phrase in error, (phrase, error)

    rng = np.random.default_rng(7)
    refused(b"\0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)), 400, "cannot identify image format")
    refused(b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 20, 400, "PNG")
    jpeg = jpegs[5]
    refused(jpeg[:len(jpeg) // 2], 400, "truncated JPEG", kind="image/jpeg")
    refused(b"just some text, certainly not a picture\n", 400, "cannot identify image format", kind="text/plain")
    refused(b"", 400, "empty body")

    # decompression bombs: refused from the header, 413, before any decoding
    refused(png_declaring(20000, 20000), 413, "400000000 pixels", "exceeds")  # Pillow's own guard words this one
    refused(png_declaring(9000, 5000), 413, "9000x5000 = 45000000 pixels exceeds max_pixels 40000000")
    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, format="PNG", optimize=True)  # 49 Mpx in a few KiB
    assert len(buf.getvalue()) < 20_000
    refused(buf.getvalue(), 413, "7000x7000", "exceeds max_pixels")

    # one bad file in a multipart upload fails it, naming the problem
    response = web.post("/models/digits-image/predict",
                        files=[("image", ("ok.png", pngs[0])), ("image", ("bad.jpg", jpeg[:40]))])
    assert response.status_code == 400 and "JPEG" in response.json()["error"], response.text
    response = web.post("/models/digits-image/predict", files={"note": (None, "no files here")})
    assert response.status_code == 400 and "no files" in response.json()["error"], response.text

    # the same refusals on the Triton protocols
    with pytest.raises(InferenceServerException, match="truncated JPEG") as info:
        http.infer("digits-image", [image_tensor([jpeg[:len(jpeg) // 2]])])
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="max_pixels") as info:
        grpc.infer("digits-image", [image_tensor([png_declaring(9000, 5000)], grpcclient)])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"

    # a model without declared preprocessing, an unknown model, an unknown version
    response = web.post("/models/digits/predict", content=pngs[0])
    assert response.status_code == 400 and "declares no image preprocessing" in response.json()["error"]
    response = web.post("/models/no-such-model/predict", content=pngs[0])
    assert response.status_code == 404 and "no-such-model" in response.json()["error"]
    response = web.post("/models/digits-image/versions/7/predict", content=pngs[0])
    assert response.status_code == 404, response.text

    # still up, still right
    assert srv.proc.poll() is None
    assert web.get("/v2/health/ready").status_code == 200
    assert http.is_model_ready("digits-image") and grpc.is_server_ready()
    answers = predict(web, [pngs[i] for i in (10, 11, 12)] + [jpegs[13]])
    for answer, i in zip(answers[:3], (10, 11, 12)):
        check_top_k(by_hand[i], answer["classes"], answer["scores"], answer["labels"], f"after errors png {i}")
    labels, scores, classes = infer_images(grpc, grpcclient, [pngs[20]])
    check_top_k(by_hand[20], classes[0], scores[0], labels[0], "after errors grpc")
