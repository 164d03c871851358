"""``modelserve predict`` and ``modelserve init``: images through a served vision model, and new vision
model folders to serve.

``predict`` posts the images to a running server's ``/models/{m}/predict`` (multipart, httpx), or with
``--repository`` loads the model in this process and runs the same code the route runs
(``modelserve.server.image_rest.predict_images``); both answer the route's JSON, shown as a table per image.
``init`` writes a commented ``config.yaml`` (checked with the server's own config parser), the model and
a labels file into ``DIR/<name>/``.

Errors print ``error: …`` on stderr and exit 1 (2 for bad usage), never a traceback.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import shutil
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

DEFAULT_URL = "http://127.0.0.1:8000"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# -- plumbing ----------------------------------------------------------------------------------

def _fail(message: str, code: int = 1):
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _console():
    from rich.console import Console

    return Console(highlight=False)


@contextmanager
def _quiet_server_logs():
    """In-process loading logs what it refuses; the command says it once, as ``error: …``."""
    logger = logging.getLogger("modelserve")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_in_process(repository: Path, model: str, work):
    """Load ``model`` from ``repository`` in this process (as ``modelserve serve`` would, explicit mode),
    run ``await work(dataplane)``, unload. Server errors propagate as ``ModelServeError``."""
    import asyncio

    from modelserve.errors import ModelLoadError
    from modelserve.server.dataplane import Dataplane
    from modelserve.server.models import ModelManager

    async def main():
        manager = ModelManager(repository, "explicit")
        try:
            try:
                await manager.load(model)
            except ModelLoadError as exc:  # its message names the versions' states; the index has the reasons
                reasons = [f"v{row['version']}: {row['reason']}" if "version" in row else row["reason"]
                           for row in manager.index() if row["name"] == model and row.get("reason")]
                raise ModelLoadError(f"model '{model}' failed to load: {'; '.join(reasons)}"
                                     if reasons else exc.message) from None
            return await work(Dataplane(manager))
        finally:
            await manager.close()

    with _quiet_server_logs():
        return asyncio.run(main())


# -- predict -----------------------------------------------------------------------------------

def predict(
    model: str = typer.Argument(..., metavar="MODEL", help="The model's name (its folder in the model repository)"),
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="Image files (JPEG, PNG, WebP, BMP, ...)",
                                        show_default=False),
    url: Optional[str] = typer.Option(None, help=f"The server's HTTP address (default: {DEFAULT_URL})",
                                      show_default=False),
    version: Optional[int] = typer.Option(None, help="Model version (default: the one the server picks)"),
    repository: Optional[Path] = typer.Option(None, help="Run in this process from this model repository, "
                                                         "no server needed"),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the server's answer"),
    json_out: bool = typer.Option(False, "--json", help="Print the answer as JSON (the route's answer, plus "
                                                        "\"images\": the files in order) instead of tables"),
):
    """Send images to a vision model and show its answers (top-k labels, boxes or mask classes) per image.

    MODEL's config declares preprocess: (and postprocess:); the images go to /models/MODEL/predict.

    With --repository no server is needed: the model is loaded in this process.

    Example: modelserve predict digits-image models/digits-image/samples/digit-7.png --url http://127.0.0.1:8000

    Example: modelserve predict resnet cat.jpg dog.png --repository models --json
    """
    if url is not None and repository is not None:
        _fail("give --url (a running server) or --repository (in this process), not both", 2)
    payloads = []
    for path in images:
        try:
            payloads.append((path, path.read_bytes()))
        except FileNotFoundError:
            _fail(f"{path}: no such file")
        except IsADirectoryError:
            _fail(f"{path}: is a folder, not an image file")
        except OSError as exc:
            _fail(f"{path}: {exc.strerror or exc}")
    if repository is not None:
        answer = _predict_in_process(repository, model, version, [data for _, data in payloads])
    else:
        answer = _predict_remote(url or DEFAULT_URL, model, version, payloads, timeout)
    predictions = answer.get("predictions", [])
    if json_out:
        typer.echo(json.dumps({**answer, "images": [str(p) for p in images]}, indent=2))
        return
    console = _console()
    for path, prediction in zip(images, predictions):
        console.print(_heading(path, answer, prediction), soft_wrap=True)
        table = _prediction_table(answer, prediction)
        if table is not None:
            console.print(table)


def _predict_in_process(repository: Path, model: str, version: Optional[int], images: list[bytes]) -> dict:
    from modelserve.errors import ModelServeError
    from modelserve.server.image_rest import predict_images

    if not repository.is_dir():
        _fail(f"model repository {repository} is not a folder")
    try:
        return _run_in_process(repository, model, lambda dataplane: predict_images(
            dataplane, model, None if version is None else str(version), images))
    except ModelServeError as exc:
        _fail(exc.message)


def _predict_remote(url: str, model: str, version: Optional[int], payloads: list[tuple[Path, bytes]],
                    timeout: float) -> dict:
    from urllib.parse import quote

    try:
        import httpx
    except ImportError:
        _fail("sending to a server needs httpx (pip install httpx), or run in process with --repository")

    base = (url if "://" in url else f"http://{url}").rstrip("/")
    path = f"/models/{quote(model, safe='')}" + (f"/versions/{version}" if version is not None else "") + "/predict"
    files = [("image", (p.name, data, mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
             for p, data in payloads]
    try:
        response = httpx.post(base + path, files=files, timeout=timeout)
    except httpx.ConnectError as exc:
        _fail(f"cannot reach the server at {base}: {exc} (is `modelserve serve` running there?)")
    except httpx.TimeoutException:
        _fail(f"no answer from {base} within {timeout:g} s (--timeout)")
    except httpx.HTTPError as exc:  # a bad URL, a dropped connection
        _fail(f"request to {base} failed: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        message = body.get("error") if isinstance(body, dict) and body.get("error") else response.text.strip()
        _fail(f"the server answered {response.status_code}: {message or response.reason_phrase}")
    if not isinstance(body, dict) or "predictions" not in body:
        _fail(f"{base}{path} did not answer a prediction (is it a modelserve server?)")
    return body


def _prediction_table(answer: dict, prediction: dict):
    """One image's prediction as a rich table (None: nothing to tabulate); the columns follow its kind."""
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    if "labels" in prediction and "scores" in prediction:  # classification
        for name, justify in (("rank", "right"), ("label", "left"), ("score", "right")):
            table.add_column(name, justify=justify)
        for rank, (label, score) in enumerate(zip(prediction["labels"], prediction["scores"]), 1):
            table.add_row(str(rank), escape(str(label)), f"{score:.4f}")
    elif "detections" in prediction:
        if not prediction["detections"]:
            return None
        for name, justify in (("label", "left"), ("score", "right"), ("box x1, y1, x2, y2", "left")):
            table.add_column(name, justify=justify)
        for det in prediction["detections"]:
            table.add_row(escape(str(det.get("label", det.get("class")))), f"{det['score']:.4f}",
                          ", ".join(f"{v:.1f}" for v in det["box"]))
    elif "classes_present" in prediction:  # segmentation
        h, w = prediction["shape"]
        for name in ("class", "pixels", "share"):
            table.add_column(name, justify="left" if name == "class" else "right")
        for cls, count in sorted(prediction["classes_present"].items(), key=lambda kv: -kv[1]):
            table.add_row(escape(cls), str(count), f"{100 * count / max(h * w, 1):.1f}%")
    else:  # no postprocess: the model's outputs as they are
        table.add_column("output")
        table.add_column("value", overflow="fold")
        for name, value in prediction.items():
            text = json.dumps(value)
            table.add_row(escape(name), escape(text if len(text) <= 400 else text[:400] + " …"))
    return table


def _heading(path: Path, answer: dict, prediction: dict) -> str:
    from rich.markup import escape

    version = answer.get("model_version")
    model = f"{answer.get('model_name')}" + (f" v{version}" if version else "")
    what = ""
    if "detections" in prediction:
        n = len(prediction["detections"])
        what = f": {n} detection{'s' if n != 1 else ''}" if n else ": no detections above the score threshold"
    elif "classes_present" in prediction:
        h, w = prediction["shape"]
        what = f": mask {w}x{h}"
    return f"[bold]{escape(str(path))}[/]  ({escape(model)}{escape(what)})"


# -- init --------------------------------------------------------------------------------------

init_app = typer.Typer(help="Write a ready-to-edit model folder (config.yaml, model, labels) for a vision model.",
                       no_args_is_help=True, add_completion=False)


class Template(str, Enum):
    classifier = "vision-classifier"
    detector = "vision-detector"


CLASSIFIER = """\
# modelserve model config: an image classifier (written by `modelserve init vision-classifier`).
# Edit it to fit the model; unknown keys are errors, so a typo fails at load, not silently.
# Serve:    modelserve serve --model-repository {repository}
# Predict:  modelserve predict {name} cat.jpg   (or curl -F image=@cat.jpg http://127.0.0.1:8000/models/{name}/predict)
name: {name}
backend: onnxruntime
# max_batch_size: 32          # default: 32 when the model's first dimension is dynamic, else 0 (no batching)
# dynamic_batching: {{max_queue_delay_microseconds: 2000}}   # wait this long to merge concurrent images

# encoded image (JPEG, PNG, ...) -> the model's input tensor, per image
preprocess:
  input: image                # clients send the encoded images in this BYTES input
  color: RGB                  # RGB; BGR for OpenCV-trained models; L for one grey channel
  resize: {resize}                 # shorter side to {resize} (keeps the aspect ratio) ...
  center_crop: [{size}, {size}]     # ... then the central {size}x{size}
  interpolation: bilinear     # nearest, bilinear, bicubic or area
  # scale: 0.00392156862745   # the default: pixel * 1/255 -> 0..1, then (x - mean) / std per channel
  mean: {mean}   # ImageNet's statistics: what torchvision/timm models expect
  std: {std}
  layout: NCHW                # NHWC for TensorFlow/Keras models
  dtype: FP32                 # FP16; or UINT8 for raw pixels (then remove mean and std)

# the model's output -> the top-k labels and scores
postprocess:
  kind: classification
  # output: logits            # the output to read (default: the model's only output)
  softmax: true               # the model outputs logits; false when it outputs probabilities already
  top_k: 5
  labels: labels.txt          # {labels_note}
"""

DETECTOR = """\
# modelserve model config: an object detector (written by `modelserve init vision-detector`).
# Edit it to fit the model; unknown keys are errors, so a typo fails at load, not silently.
# Serve:    modelserve serve --model-repository {repository}
# Predict:  modelserve predict {name} street.jpg   (boxes come back in the original image's pixels)
name: {name}
backend: onnxruntime
# max_batch_size: 8           # default: 32 when the model's first dimension is dynamic, else 0 (no batching)

# encoded image (JPEG, PNG, ...) -> the model's input tensor, per image
preprocess:
  input: image                # clients send the encoded images in this BYTES input
  color: RGB                  # RGB; BGR for OpenCV-trained models
  resize: {size}                 # fit inside {size}x{size} keeping the aspect ratio ...
  resize_mode: letterbox      # ... and pad the rest with pad_value (boxes are mapped back)
  pad_value: 114              # what YOLO models are trained with
  interpolation: bilinear
  # scale: 0.00392156862745   # the default: pixel * 1/255 -> 0..1 (YOLO takes no mean/std)
  layout: NCHW                # NHWC for TensorFlow/Keras models

# the model's outputs -> boxes after class-wise NMS
postprocess:
  kind: detection
  # One YOLO-style output, [N, 4+C, K] (YOLOv8) or [N, K, 4+C]; the default is the model's only output:
  # output: output0
  # or separate outputs: boxes: boxes [N,K,4], scores: scores [N,K,C] (or [N,K] with classes: classes)
  box_format: cxcywh          # YOLO: centre x, centre y, width, height; xyxy or yxyx for other models
  normalized: false           # true when coordinates are fractions (0..1) of the input size
  objectness: false           # true for YOLOv5-style [box, objectness, classes]
  score_threshold: 0.25
  iou_threshold: 0.45
  max_detections: 100
  labels: labels.txt          # {labels_note}
"""

LABELS_GIVEN = "one class name per line, line i = class i"
LABELS_PLACEHOLDER = ("PLACEHOLDER, empty: put one class name per line in it (line i = class i);\n"
                      "                              # until then classes are reported by their number")


def _init(template: Template, directory: Path, name: Optional[str], model: Optional[Path],
          labels: Optional[Path], size: Optional[int], force: bool) -> None:
    from modelserve.errors import ModelServeError
    from modelserve.server.config import read_yaml

    classifier = template is Template.classifier
    name = name or ("classifier" if classifier else "detector")
    if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
        _fail(f"--name {name!r}: a model name is a folder name (no slashes, not starting with '.')", 2)
    size = size or (224 if classifier else 640)
    if size <= 0:
        _fail(f"--size {size}: must be positive", 2)
    for given, what in ((model, "--model"), (labels, "--labels")):
        if given is not None and not given.is_file():
            _fail(f"{what} {given}: no such file")
    folder = directory / name
    config_path = folder / "config.yaml"
    if config_path.exists() and not force:
        _fail(f"{config_path} exists; --force overwrites it (and the model and labels given with it)")

    labels_path = folder / "labels.txt"
    placeholder = labels is None and not (labels_path.is_file() and labels_path.read_text().strip())
    values = {"name": name, "repository": directory, "size": size,
              "labels_note": LABELS_PLACEHOLDER if placeholder else LABELS_GIVEN}
    if classifier:
        values.update(resize=round(size * 256 / 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    text = (CLASSIFIER if classifier else DETECTOR).format(**values)
    try:  # the server's own parser: what is written is what `serve` reads
        read_yaml(text, name)
    except ModelServeError as exc:
        _fail(f"the {template.value} template does not validate: {exc.message}")

    written = []
    try:
        (folder / "1").mkdir(parents=True, exist_ok=True)
        config_path.write_text(text)
        written.append(f"{config_path}  ({template.value} config: edit it to fit the model)")
        if model is not None:
            shutil.copyfile(model, folder / "1" / "model.onnx")
            written.append(f"{folder / '1' / 'model.onnx'}  (copy of {model})")
        if labels is not None:
            shutil.copyfile(labels, labels_path)
            written.append(f"{labels_path}  (copy of {labels})")
        elif not labels_path.exists():  # never clobber labels the user filled in
            labels_path.write_text("")
            written.append(f"{labels_path}  (placeholder, empty: one class name per line)")
    except OSError as exc:
        _fail(f"cannot write {folder}: {exc}")

    console = _console()
    console.print("wrote " + "\n      ".join(map(_esc, written)), soft_wrap=True)
    if model is None:
        console.print(f"next: put the model at {_esc(folder / '1' / 'model.onnx')}", soft_wrap=True)
        return
    try:  # the server's load: the config against the model itself (input shape, outputs, labels)
        _run_in_process(directory, name, _noop)
    except ModelServeError as exc:
        console.print(f"[bold yellow]warning:[/] the server would not load it yet: {_esc(exc.message)}\n"
                      f"  edit {_esc(config_path)} to fit the model", soft_wrap=True)
        return
    console.print(f"checked: the server loads it. Serve: modelserve serve --model-repository {_esc(directory)}",
                  soft_wrap=True)


async def _noop(dataplane) -> None:
    return None


def _esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


_InitDir = typer.Argument(..., metavar="DIR", help="The model repository to add the model folder to (created if missing)")
_InitModel = typer.Option(None, "--model", help="An .onnx model to copy to <name>/1/model.onnx")
_InitLabels = typer.Option(None, "--labels", help="Class names, one per line (default: an empty placeholder)")
_InitForce = typer.Option(False, "--force", help="Overwrite an existing config.yaml")


@init_app.command("vision-classifier")
def init_classifier(
    directory: Path = _InitDir,
    name: str = typer.Option("classifier", help="Model name (its folder)"),
    model: Optional[Path] = _InitModel,
    labels: Optional[Path] = _InitLabels,
    size: int = typer.Option(224, help="The model's input height and width: center crop SIZE after resizing the "
                                       "shorter side to SIZE*256/224"),
    force: bool = _InitForce,
):
    """An image classifier: resize 256, center crop 224, ImageNet mean/std, NCHW; softmax and top-5 labels.

    Example: modelserve init vision-classifier models --name resnet --model resnet50.onnx --labels imagenet.txt
    """
    _init(Template.classifier, directory, name, model, labels, size, force)


@init_app.command("vision-detector")
def init_detector(
    directory: Path = _InitDir,
    name: str = typer.Option("detector", help="Model name (its folder)"),
    model: Optional[Path] = _InitModel,
    labels: Optional[Path] = _InitLabels,
    size: int = typer.Option(640, help="The model's square input size: letterbox to SIZExSIZE"),
    force: bool = _InitForce,
):
    """A YOLO-style object detector: letterbox 640, one [N,4+C,K] output in cxcywh, NMS, labels.

    Example: modelserve init vision-detector models --name yolo --model yolov8n.onnx --labels coco.txt
    """
    _init(Template.detector, directory, name, model, labels, size, force)
