"""The demo model: a digit classifier trained on scikit-learn's bundled 8x8 digits, exported to ONNX.

Nothing is downloaded: the data ships inside scikit-learn. Needs the ``demo`` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_MODEL = "digits"

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
"""


def build_demo_repository(repository: Path, force: bool = False) -> Path:
    """Train, export and lay out ``<repository>/digits/1/model.onnx``; returns the model file."""
    target = repository / DEMO_MODEL / "1" / "model.onnx"
    if target.exists() and not force:
        return target
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
    return target


def usage(http_port: int = 8000, grpc_port: int = 8001) -> str:
    """How to call the demo model once it is served: curl, and tritonclient over HTTP and gRPC."""
    zeros = ",".join(["0"] * 64)
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
"""
