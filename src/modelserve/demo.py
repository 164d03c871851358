"""The demo model: a digit classifier trained on scikit-learn's bundled 8x8 digits, exported to ONNX.

Served twice from one repository: ``digits`` takes tensors (``pixels`` FP32 [N, 64], 0..16) and
``digits-image`` takes images (the same ONNX file, with a config that declares the preprocessing and
a top-3 classification), with a few sample PNGs in ``digits-image/samples/`` to send it.
Nothing is downloaded: the data ships inside scikit-learn. Needs the ``demo`` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_MODEL = "digits"
IMAGE_MODEL = "digits-image"
#: the digits rendered as sample images (digit -> its index in sklearn's dataset), as ``samples/digit-<d>.png``
SAMPLES = {d: d for d in range(10)}  # the dataset's first ten images are 0..9
#: sample images are the 8x8 digits upscaled this many times (NEAREST), so they are viewable
SAMPLE_ZOOM = 8
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CONFIG = """\
# modelserve model config (ours; a Triton config.pbtxt works too, or no file at all)
name: digits
backend: onnxruntime
max_batch_size: 64
inputs:
  - {name: pixels, datatype: FP32, dims: [64]}
dynamic_batching:
  preferred_batch_size: [16, 64]
  max_queue_delay_microseconds: 2000
instances: 1
monitoring:
  drift:
    reference: reference.npy  # the digits it learned from: /dashboard shows how far requests drift from them
"""

IMAGE_CONFIG = """\
# modelserve model config: the demo digits classifier (same ONNX file as ../digits) fed images.
# POST /models/digits-image/predict with a PNG/JPEG (raw body or multipart) -> top-3 labels and scores.
name: digits-image
backend: onnxruntime
# The model takes pixels FP32 [N, 64] in 0..16; the preprocessing below turns any image into that:
preprocess:
  input: image                # clients send encoded images in this BYTES input
  color: L                    # one grey channel
  resize: [8, 8]              # any size -> 8x8 (the 1x8x8 pixels are reshaped to the model's [64])
  interpolation: area         # box averaging: the right filter for a large downscale
  scale: 0.0627450980392      # 16 / 255: 8-bit grey -> the digits' 0..16
postprocess:
  kind: classification
  output: probabilities       # the model's [N, 10] class probabilities (no softmax needed)
  top_k: 3
  labels: labels.txt          # one label per line, line i = class i
"""


def build_demo_repository(repository: Path, force: bool = False) -> Path:
    """Train, export and lay out ``<repository>/digits/1/model.onnx``, and the image-fed ``digits-image``
    beside it; returns the ``digits`` model file. Parts already there are kept unless ``force``."""
    target = repository / DEMO_MODEL / "1" / "model.onnx"
    if force or not target.exists():
        _build_digits(repository, target)
    if force or not (repository / IMAGE_MODEL / "1" / "model.onnx").exists():
        _build_digits_image(repository, target)
    return target


def _build_digits(repository: Path, target: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x = digits.data.astype(np.float32)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, digits.target)
    onnx_model = to_onnx(model, x[:1], options={"zipmap": False}, target_opset=17,
                         initial_types=None, final_types=None)
    # friendly tensor names: pixels -> label, probabilities
    graph = onnx_model.graph
    rename = {graph.input[0].name: "pixels"}
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    graph.input[0].name = "pixels"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(onnx_model.SerializeToString())
    (repository / DEMO_MODEL / "config.yaml").write_text(CONFIG)
    np.save(repository / DEMO_MODEL / "sample.npy", x[:4])
    np.save(repository / DEMO_MODEL / "reference.npy", x)


def _build_digits_image(repository: Path, model_file: Path) -> None:
    """``digits-image``: a copy of the digits model, its config, labels and sample PNGs.

    The samples' folder is not a version folder: only folders named by a number are."""
    import shutil

    from PIL import Image
    from sklearn.datasets import load_digits

    folder = repository / IMAGE_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    # a copy, not a link: editing or replacing one model's file never changes the other
    shutil.copyfile(model_file, folder / "1" / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "config.yaml").write_text(IMAGE_CONFIG)
    samples = folder / "samples"
    samples.mkdir(exist_ok=True)
    images = load_digits().images
    for digit, index in SAMPLES.items():
        grey = np.rint(images[index] * 255 / 16).astype(np.uint8)  # 0..16 -> 8-bit grey
        big = Image.fromarray(grey, "L").resize((8 * SAMPLE_ZOOM, 8 * SAMPLE_ZOOM), Image.Resampling.NEAREST)
        big.save(samples / f"digit-{digit}.png")


def usage(http_port: int = 8000, grpc_port: int = 8001, repository: Path | str = "models") -> str:
    """How to call the demo models once they are served: curl, tritonclient over HTTP and gRPC, and images."""
    zeros = ",".join(["0"] * 64)
    samples = Path(repository) / IMAGE_MODEL / "samples"
    return f"""Call it (in another terminal) once the server prints 'modelserve ready':

  curl -s 127.0.0.1:{http_port}/v2/models/{DEMO_MODEL}
  curl -s -X POST 127.0.0.1:{http_port}/v2/models/{DEMO_MODEL}/infer \\
       -d '{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[{zeros}]}}]}}'

.venv/bin/python - <<'PY'
import numpy as np, tritonclient.http as http, tritonclient.grpc as grpc
from sklearn.datasets import load_digits
digits = load_digits(); x = digits.data[:8].astype(np.float32)
for mod, url in ((http, "127.0.0.1:{http_port}"), (grpc, "127.0.0.1:{grpc_port}")):
    c = mod.InferenceServerClient(url)
    i = mod.InferInput("pixels", list(x.shape), "FP32"); i.set_data_from_numpy(x)
    print(mod.__name__, c.infer("{DEMO_MODEL}", [i]).as_numpy("label"), "expected", digits.target[:8])
PY

Images go to {IMAGE_MODEL} (the same model, with preprocessing and top-3 labels declared in its config.yaml):

  curl -si -F image=@{samples}/digit-7.png http://127.0.0.1:{http_port}/models/{IMAGE_MODEL}/predict
  modelserve predict {IMAGE_MODEL} {samples}/digit-3.png {samples}/digit-7.png --url http://127.0.0.1:{http_port}

Every answer carries an x-request-id; give the ground truth for it and watch the live accuracy:

  modelserve feedback {IMAGE_MODEL} <x-request-id> seven --url http://127.0.0.1:{http_port}
  modelserve logs --model {IMAGE_MODEL}        # the stored requests (modelserve stats: per version)

Dashboard: http://127.0.0.1:{http_port}/dashboard    Prometheus: http://127.0.0.1:{http_port}/metrics
"""
