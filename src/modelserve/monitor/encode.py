"""Tensors to JSON for the payload log, and the prediction feedback is scored against.

Runs in the payload log's writer thread, never on the request path: the request path keeps
references to the arrays (they are not mutated after the response) and this turns them into
small JSON. Small tensors are kept as values; large ones as a summary that still lets one tell
two payloads apart (sha256) and see drift (mean, std, min, max).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

#: a BYTES tensor is kept as text only when it is this short and valid UTF-8 (an image is not)
MAX_TEXT_BYTES = 1024
#: output names that carry a class already (vision postprocess, classifier exports)
CLASS_OUTPUTS = ("classes", "class", "class_ids", "label_ids", "predicted_class")
LABEL_OUTPUTS = ("labels", "label", "predicted_label")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _dtype(array: np.ndarray) -> str:
    try:
        from modelserve.datatypes import v2_name

        return v2_name(array.dtype)
    except Exception:  # noqa: BLE001 - any dtype numpy has: name it numpy's way
        return str(array.dtype)


def _texts(array: np.ndarray) -> list | None:
    """An object (BYTES) array as nested lists of str, or None when it is binary or long."""
    total = 0
    out = []
    for item in array.ravel().tolist():
        if isinstance(item, bytes):
            total += len(item)
            if total > MAX_TEXT_BYTES:
                return None
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                return None
        elif not isinstance(item, str | int | float | bool | type(None)):
            item = str(item)
        out.append(item)
    return np.array(out, dtype=object).reshape(array.shape).tolist() if array.ndim else out[0]


def summary(array: np.ndarray) -> dict:
    """Shape, dtype, sha256 of the contents, and for numbers mean/std/min/max (NaN-free: None if none)."""
    doc: dict = {"summary": True, "shape": list(array.shape), "dtype": _dtype(array)}
    digest = hashlib.sha256()
    if array.dtype == object:
        size = 0
        for item in array.ravel().tolist():
            raw = item if isinstance(item, bytes) else str(item).encode()
            digest.update(len(raw).to_bytes(8, "little"))
            digest.update(raw)
            size += len(raw)
        doc["bytes"] = size
    else:
        contiguous = np.ascontiguousarray(array)
        digest.update(contiguous.data if contiguous.dtype.kind in "biuf" else contiguous.tobytes())
        if array.size and array.dtype.kind in "biuf":
            values = array.astype(np.float64, copy=False)
            finite = values[np.isfinite(values)] if array.dtype.kind == "f" else values
            if finite.size:
                doc.update(mean=_finite(float(finite.mean())), std=_finite(float(finite.std())),
                           min=_finite(float(finite.min())), max=_finite(float(finite.max())))
            if finite.size != values.size:
                doc["nonfinite"] = int(values.size - finite.size)
    doc["sha256"] = digest.hexdigest()
    return doc


def encode(array: np.ndarray, max_values: int):
    """One tensor for the log: its values (nested lists) when small, else ``summary()``."""
    array = np.asarray(array)
    if array.size <= max_values:
        if array.dtype == object:
            values = _texts(array)
            if values is not None:
                return values
        elif array.dtype.kind in "biuf":
            return array.tolist()  # NaN / Infinity become null when the row is serialized (orjson)
    return summary(array)


def encode_all(tensors: dict[str, np.ndarray] | None, max_values: int) -> dict | None:
    if tensors is None:
        return None
    return {name: encode(array, max_values) for name, array in tensors.items()}


def _rows(array: np.ndarray, batching: bool) -> list[np.ndarray]:
    return list(array) if batching and array.ndim else [array]


def _scalar(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def prediction(outputs: dict[str, np.ndarray] | None, batching: bool, task: str = "auto") -> dict | None:
    """What feedback scores: ``{"kind": "class", "values": [class per row], "labels": [label per row]?}``
    or ``{"kind": "value", "values": [number per row]}``; None when the outputs say neither.

    Classification: an explicit class/label output (top-1 = its first element per row), else the argmax
    of the first numeric output with more than one element per row. Regression: the first numeric
    output with one element per row (or any first numeric output when ``task`` says regression)."""
    if not outputs:
        return None
    if task != "regression":
        classes = next((outputs[n] for n in CLASS_OUTPUTS if n in outputs and outputs[n].dtype.kind in "iu"), None)
        labels = next((outputs[n] for n in LABEL_OUTPUTS if n in outputs), None)
        if labels is not None and labels.dtype.kind in "iu" and classes is None:
            classes, labels = labels, None
        if classes is not None or labels is not None:
            doc: dict = {"kind": "class"}
            if classes is not None:
                doc["values"] = [int(np.ravel(r)[0]) if np.size(r) else None for r in _rows(classes, batching)]
            if labels is not None:
                doc["labels"] = [_scalar(np.ravel(r)[0]) if np.size(r) else None for r in _rows(labels, batching)]
                doc.setdefault("values", doc["labels"])
            return doc
    numeric = [a for a in outputs.values() if a.dtype.kind in "biuf" and a.size]
    for array in numeric:
        rows = _rows(array, batching)
        per_row = rows[0].size if rows else 0
        if task == "regression" or (task == "auto" and per_row == 1):
            return {"kind": "value", "values": [float(np.ravel(r)[0]) for r in rows]}
        if per_row > 1:
            return {"kind": "class", "values": [int(np.argmax(np.ravel(r))) for r in rows]}
    return None
