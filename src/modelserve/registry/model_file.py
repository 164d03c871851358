"""What the registry reads from a model file: its format, its signature, and the optimization report
``modelserve optimize`` writes beside it (``<stem>.report.json``), whose figures become the version's metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from modelserve.errors import InvalidInput

log = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".pt2": "torch_export",
           ".tflite": "tflite", ".pkl": "sklearn", ".joblib": "sklearn", ".keras": "keras", ".h5": "keras"}


def served_filename(path: Path, fmt: str) -> str:
    return "model.onnx" if fmt == "onnx" else path.name


def signature(path: Path, fmt: str) -> dict:
    """Inputs and outputs (V2 datatypes, -1 for free dims) of an ONNX file; checks it parses."""
    if fmt != "onnx":
        return {}
    import numpy as np
    import onnx

    from modelserve.datatypes import v2_name

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say so, store nothing
        raise InvalidInput(f"{path.name} is not a readable ONNX model: {exc}") from None
    if not model.graph.output:
        raise InvalidInput(f"{path.name} is not a readable ONNX model: its graph has no outputs")
    initializers = {t.name for t in model.graph.initializer}

    def tensors(values):
        out = []
        for t in values:
            if t.name in initializers:
                continue
            tt = t.type.tensor_type
            try:
                datatype = v2_name(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
            except Exception:  # noqa: BLE001 - a type V2 cannot name
                datatype = str(tt.elem_type)
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            out.append({"name": t.name, "datatype": datatype, "shape": dims})
        return out

    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output)}


def optimize_report(path: Path) -> dict | None:
    report = path.with_name(path.stem + ".report.json")
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable optimization report %s", report)
        return None


def report_metrics(report: dict) -> dict:
    result, summary = report.get("result") or {}, report.get("summary") or {}
    keep = ("size_bytes", "parameters", "sparsity", "top1", "top5", "agreement", "throughput")
    metrics = {k: result[k] for k in keep if result.get(k) is not None}
    for batch in ("1", "32"):
        lat = (result.get("latency_ms") or {}).get(batch)
        if lat:
            metrics[f"p50_ms_b{batch}"] = lat.get("p50")
    metrics.update({k: v for k, v in summary.items() if v is not None})
    return metrics
