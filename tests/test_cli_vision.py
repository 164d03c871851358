"""``modelserve predict`` and ``modelserve init`` driven as a user would (CliRunner in-process), against the demo
repository's ``digits-image`` model and sample PNGs, and against models built here with onnx.helper, served by a
real ``modelserve serve`` process on 127.0.0.1.

Expectations are independent of the code under test: the demo's samples are checked pixel for pixel against
scikit-learn's digits they were made from, and their predicted digit against those digits' labels; the colour
classifier's answer is computed by hand in numpy (ImageNet normalization, mean pool, matmul, softmax).
"""

from __future__ import annotations

import io
import json
import socket

import httpx
import numpy as np
import pytest
from conftest import Server, save_model
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from modelserve.cli import app
from modelserve.server.config import read_model_config

pytest.importorskip("sklearn", reason="needs scikit-learn (pip install 'modelserve[demo]')")
pytest.importorskip("skl2onnx", reason="needs skl2onnx (pip install 'modelserve[demo]')")

runner = CliRunner()


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.exit_code, result.output, result.stderr, result.exception)
    if code:  # an error is one red line, never a traceback
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output, result.output
    return result


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


# -- the demo's digits-image ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("demo")
    result = cli("demo", "--model-repository", repo)
    assert "digits-image/predict" in result.output and "modelserve predict digits-image" in result.output
    return repo


@pytest.fixture(scope="module")
def samples(demo) -> dict:
    """{sample file: the digit it shows}, checked against the scikit-learn digits it was made from."""
    from sklearn.datasets import load_digits

    from modelserve.demo import SAMPLES

    digits = load_digits()
    found = {}
    for digit, index in SAMPLES.items():
        path = demo / "digits-image" / "samples" / f"digit-{digit}.png"
        pixels = np.asarray(Image.open(path))
        assert pixels.shape[0] >= 32 and pixels.shape[1] >= 32  # upscaled: viewable
        zoom = pixels.shape[0] // 8
        assert (pixels[::zoom, ::zoom] == np.rint(digits.images[index] * 255 / 16)).all()
        assert digits.target[index] == digit
        found[path] = digit
    assert len(found) >= 3
    return found


@pytest.fixture(scope="module")
def demo_server(demo):
    with Server(demo) as server:
        yield server


def test_demo_layout_and_idempotency(demo):
    folder = demo / "digits-image"
    assert (folder / "labels.txt").read_text().split() == ["zero", "one", "two", "three", "four", "five", "six",
                                                           "seven", "eight", "nine"]
    assert (folder / "1" / "model.onnx").read_bytes() == (demo / "digits" / "1" / "model.onnx").read_bytes()
    config = read_model_config(folder)
    assert config.preprocess.color == "L" and config.postprocess.top_k == 3
    assert "#" in (folder / "config.yaml").read_text()  # commented
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()}
    cli("demo", "--model-repository", demo)  # again: nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()} == before


def test_demo_rebuilds_a_missing_image_model_without_retraining(tmp_path, demo):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(demo, repo)
    shutil.rmtree(repo / "digits-image")
    digits_model = repo / "digits" / "1" / "model.onnx"
    stamp = digits_model.stat().st_mtime_ns
    cli("demo", "--model-repository", repo)
    assert digits_model.stat().st_mtime_ns == stamp
    assert len(list((repo / "digits-image" / "samples").glob("*.png"))) == len(list(
        (demo / "digits-image" / "samples").glob("*.png")))
    cli("demo", "--model-repository", repo, "--force")
    assert digits_model.stat().st_mtime_ns != stamp


def test_predict_in_process_gives_the_sample_digits(demo, samples):
    paths = sorted(samples)
    answer = json.loads(cli("predict", "digits-image", *paths, "--repository", demo, "--json").stdout)
    assert answer["model_name"] == "digits-image" and answer["model_version"] == "1"
    assert answer["images"] == [str(p) for p in paths]
    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for path, prediction in zip(paths, answer["predictions"]):
        assert prediction["classes"][0] == samples[path], path
        assert prediction["labels"][0] == labels[samples[path]]
        assert len(prediction["scores"]) == 3 and prediction["scores"] == sorted(prediction["scores"], reverse=True)

    table = cli("predict", "digits-image", paths[7], "--repository", demo).stdout
    assert str(paths[7]) in table and "digits-image v1" in table
    first = next(line for line in table.splitlines() if line.strip("│ ").startswith("1 "))
    assert "seven" in first and f"{answer['predictions'][7]['scores'][0]:.4f}" in first
    assert all(w in table for w in ("rank", "label", "score"))


def test_predict_url_matches_in_process(demo, samples, demo_server):
    paths = sorted(samples)
    url = f"http://{demo_server.http_url}"
    remote = json.loads(cli("predict", "digits-image", *paths, "--url", url, "--json").stdout)
    local = json.loads(cli("predict", "digits-image", *paths, "--repository", demo, "--json").stdout)
    assert [p["classes"] for p in remote["predictions"]] == [p["classes"] for p in local["predictions"]]
    assert [p["classes"][0] for p in remote["predictions"]] == [samples[p] for p in paths]
    np.testing.assert_allclose([p["scores"] for p in remote["predictions"]],
                               [p["scores"] for p in local["predictions"]], rtol=1e-5)
    # the same answer as a plain client's upload of the same files
    with open(paths[3], "rb") as f:
        direct = httpx.post(f"{url}/models/digits-image/predict", files={"image": f}).json()
    assert direct["predictions"][0]["classes"] == remote["predictions"][3]["classes"]
    # a version, and an address without a scheme
    versioned = cli("predict", "digits-image", paths[2], "--url", demo_server.http_url, "--version", 1)
    assert "two" in versioned.stdout and "digits-image v1" in versioned.stdout


def test_predict_errors(tmp_path, demo, samples, demo_server):
    url = f"http://{demo_server.http_url}"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    # the server's own message, over HTTP and in process alike
    remote = cli("predict", "digits-image", corrupt, "--url", url, code=1).stderr
    local = cli("predict", "digits-image", corrupt, "--repository", demo, code=1).stderr
    assert "400" in remote
    message = local.removeprefix("error: ").strip()
    assert message and message in " ".join(remote.split()), (remote, local)
    assert "image" in message

    sample = min(samples)
    assert "no such file" in cli("predict", "digits-image", tmp_path / "missing.png", "--url", url, code=1).stderr
    assert "folder" in cli("predict", "digits-image", tmp_path, "--repository", demo, code=1).stderr
    assert "declares no image preprocessing" in cli("predict", "digits", sample, "--url", url, code=1).stderr
    unknown = cli("predict", "ghost", sample, "--url", url, code=1).stderr
    assert "404" in unknown and "ghost" in unknown
    assert "ghost" in cli("predict", "ghost", sample, "--repository", demo, code=1).stderr
    assert "version 9" in cli("predict", "digits-image", sample, "--url", url, "--version", 9, code=1).stderr
    assert "version 9" in cli("predict", "digits-image", sample, "--repository", demo, "--version", 9,
                              code=1).stderr
    assert "not both" in cli("predict", "digits-image", sample, "--url", url, "--repository", demo, code=2).stderr

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = cli("predict", "digits-image", sample, "--url", f"http://127.0.0.1:{port}", code=1).stderr
    assert "cannot reach the server" in down


# -- init --------------------------------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "dark"]
#: logits = mean-pooled normalized channels @ W: one class per channel, and "dark" for low everything
W = np.array([[1, 0, 0, -1], [0, 1, 0, -1], [0, 0, 1, -1]], np.float32)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def colour_model(path):
    """pixels [N,3,224,224] -> GlobalAveragePool -> Flatten -> MatMul W -> logits [N,4]."""
    return save_model(
        [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        path, [numpy_helper.from_array(W, "w")],
    )


def expected(rgb) -> tuple[list[str], np.ndarray]:
    """The top-k of a one-colour image by hand: resize/crop keep the colour; normalize, pool, matmul, softmax."""
    x = (np.asarray(rgb) / 255 - MEAN) / STD
    logits = x @ W
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    return [COLOURS[i] for i in order], p[order]


@pytest.fixture
def colour_files(tmp_path):
    model = colour_model(tmp_path / "in" / "colours.onnx")
    labels = tmp_path / "in" / "colours.txt"
    labels.write_text("\n".join(COLOURS) + "\n")
    return model, labels


def test_init_classifier_serves_and_classifies(tmp_path, colour_files):
    model, labels = colour_files
    repo = tmp_path / "models"
    out = cli("init", "vision-classifier", repo, "--name", "colours", "--model", model, "--labels", labels).stdout
    assert "checked: the server loads it" in out
    folder = repo / "colours"
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert (folder / "labels.txt").read_text() == labels.read_text()
    text = (folder / "config.yaml").read_text()
    assert text.count("\n#") + text.count("  #") > 10  # commented, ready to edit
    config = read_model_config(folder)
    pre = config.preprocess
    assert (pre.resize, pre.center_crop, pre.mean, pre.std) == (256, (224, 224), list(MEAN), list(STD))
    assert config.postprocess.kind == "classification" and config.postprocess.softmax

    colours = {"red": (230, 20, 20), "green": (10, 240, 30), "blue": (0, 30, 250), "dark": (5, 5, 5)}
    with Server(repo) as server:
        url = f"http://{server.http_url}"
        for name, rgb in colours.items():
            image = np.zeros((300, 400, 3), np.uint8) + np.array(rgb, np.uint8)  # not square: resize + crop
            answer = httpx.post(f"{url}/models/colours/predict", content=png(image),
                                headers={"content-type": "image/png"}).json()
            want_labels, want_scores = expected(rgb)
            got = answer["predictions"][0]
            assert got["labels"] == want_labels and got["labels"][0] == name
            np.testing.assert_allclose(got["scores"], want_scores, atol=1e-3)  # fp32 pooling of 50k pixels
        red = tmp_path / "red.png"
        red.write_bytes(png(np.full((64, 64, 3), colours["red"], np.uint8)))
        table = cli("predict", "colours", red, "--url", url).stdout
        first = next(line for line in table.splitlines() if line.strip("│ ").startswith("1 "))
        assert "red" in first


def test_init_refuses_to_overwrite_without_force(tmp_path, colour_files):
    model, _ = colour_files
    repo = tmp_path / "models"
    cli("init", "vision-classifier", repo)  # no model yet: config and a placeholder labels file
    config = repo / "classifier" / "config.yaml"
    assert read_model_config(config.parent).postprocess.labels == "labels.txt"
    assert (repo / "classifier" / "labels.txt").read_text() == ""
    config.write_text(config.read_text() + "# my edit\n")
    (repo / "classifier" / "labels.txt").write_text("cat\ndog\n")

    refused = cli("init", "vision-classifier", repo, "--model", model, code=1).stderr
    assert "exists" in refused and "--force" in refused
    assert config.read_text().endswith("# my edit\n") and not (repo / "classifier" / "1" / "model.onnx").exists()

    cli("init", "vision-classifier", repo, "--model", model, "--force")
    assert "# my edit" not in config.read_text() and (repo / "classifier" / "1" / "model.onnx").is_file()
    assert (repo / "classifier" / "labels.txt").read_text() == "cat\ndog\n"  # labels the user wrote are kept


def test_init_checks_the_model_and_arguments(tmp_path, colour_files):
    model, _ = colour_files
    repo = tmp_path / "models"
    # a model that does not take what the config produces: written, with the server's reason
    out = cli("init", "vision-classifier", repo, "--model", model, "--size", 128).stdout
    assert "warning" in out and "would not load" in out and "224" in out and "128" in out
    assert "no such file" in cli("init", "vision-classifier", repo, "--name", "x", "--model",
                                 tmp_path / "missing.onnx", code=1).stderr
    assert not (repo / "x").exists()
    assert "folder name" in cli("init", "vision-detector", repo, "--name", "a/b", code=2).stderr
    assert "No such command" in runner.invoke(app, ["init", "vision-segmenter", str(repo)]).output


def yolo_model(path, size: int):
    """A YOLOv8-style detector whose output [N, 4+2, 3] (cxcywh, two classes) is a constant per image."""
    const = np.array([  # anchors as columns: box cx, cy, w, h, then the class scores
        [32, 10, 33], [32, 10, 33], [20, 8, 20], [20, 8, 20],
        [0.9, 0.05, 0.85],  # class 0: anchor 2 overlaps anchor 0 -> NMS drops it
        [0.1, 0.8, 0.0],    # class 1
    ], np.float32)
    zeros = np.zeros((3, const.size), np.float32)
    return save_model(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "zeros"], ["z"]),
         helper.make_node("Add", ["z", "const"], ["y"]),
         helper.make_node("Reshape", ["y", "shape"], ["output0"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 6, 3])],
        path, [numpy_helper.from_array(zeros, "zeros"), numpy_helper.from_array(const.reshape(-1), "const"),
               numpy_helper.from_array(np.array([-1, 6, 3], np.int64), "shape")],
    )


def test_init_detector_and_detection_table(tmp_path):
    model = yolo_model(tmp_path / "yolo.onnx", 64)
    labels = tmp_path / "names.txt"
    labels.write_text("cat\ndog\n")
    repo = tmp_path / "models"
    out = cli("init", "vision-detector", repo, "--model", model, "--labels", labels, "--size", 64).stdout
    assert "checked: the server loads it" in out
    config = read_model_config(repo / "detector")
    assert config.preprocess.resize_mode == "letterbox" and config.postprocess.kind == "detection"
    image = tmp_path / "street.png"
    image.write_bytes(png(np.zeros((64, 64, 3), np.uint8)))  # the input size: letterbox maps 1:1
    answer = json.loads(cli("predict", "detector", image, "--repository", repo, "--json").stdout)
    detections = answer["predictions"][0]["detections"]
    assert [(d["label"], d["box"]) for d in detections] == [("cat", [22, 22, 42, 42]), ("dog", [6, 6, 14, 14])]
    table = cli("predict", "detector", image, "--repository", repo).stdout
    assert "2 detections" in table and "22.0, 22.0, 42.0, 42.0" in table and "dog" in table


def test_segmentation_table():
    from rich.console import Console

    from modelserve.cli_vision import _heading, _prediction_table

    answer = {"model_name": "seg", "model_version": "3"}
    prediction = {"shape": [4, 5], "mask_png": "", "classes_present": {"0": 15, "2": 5}}
    console = Console(record=True, width=100)
    console.print(_heading("a.png", answer, prediction))
    console.print(_prediction_table(answer, prediction))
    text = console.export_text()
    assert "seg v3: mask 5x4" in text and "75.0%" in text and "25.0%" in text
