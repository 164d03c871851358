"""Tensors to JSON for the payload log, and the prediction feedback is scored against.

Runs in the payload log's writer process, never on the request path: the request path keeps
references to the arrays (they are not mutated after the response) and this turns them into
small JSON. Small tensors are kept as values; large ones as a summary that still lets one tell
two payloads apart (sha256) and see drift (mean, std, min, max).

``encode_packed`` is the writer's hot path: a column of records whose tensors come
joined (one array per name) becomes each record's JSON text in one numpy pass per name, the text
built from a template (no per-record dict); anything else goes through ``encode_many``/``encode``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import orjson

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


#: (array, its row_stats) of the last joined summary: drift asks for the same rows' statistics right after
_last_stats: list = []


def forget_stats() -> None:
    _last_stats.clear()


def row_stats(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std, min and max of each row of a 2-D numeric array, accumulated in float64 without a
    float64 copy of the rows (one pass for the sums; the summary's and drift's hot spot)."""
    if _last_stats and _last_stats[0] is flat:  # the arrays are never mutated: the same object, the same rows
        return _last_stats[1]
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    n = flat.shape[1]
    mean = flat.mean(axis=1, dtype=np.float64)
    squares = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return mean, std, flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)


class Omitted:
    """A tensor the payload log kept no bytes of: its record was over the ring's per-record limit (an eighth of
    ``--monitor-buffer-mb``). Logged as its shape, dtype and size."""

    def __init__(self, shape: tuple, dtype: str, nbytes: int):
        self.shape, self.dtype, self.nbytes = tuple(shape), np.dtype(dtype), nbytes
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def document(self) -> dict:
        return {"omitted": "over the payload log's per-record limit (an eighth of --monitor-buffer-mb)",
                "shape": list(self.shape), "dtype": _dtype(self), "bytes": self.nbytes}


def encode(array: np.ndarray, max_values: int):
    """One tensor for the log: its values (nested lists) when small, else ``summary()``."""
    if isinstance(array, Omitted):
        return array.document()
    array = np.asarray(array)
    if math.prod(d or 1 for d in array.shape) <= max_values:  # not .size: tolist() of a [1e5, 1e5, 0] makes 1e10 lists
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


def encode_many(records: list[dict[str, np.ndarray] | None], max_values: int) -> list[dict | None]:
    """``encode_all`` of many records at once, the same result: tensors of one name, shape and numeric
    dtype are turned into values or summaries in one numpy pass over all of them (the writer thread's
    time is per cycle, not per record, and it holds the GIL the event loop needs)."""
    out: list[dict | None] = [None if t is None else {} for t in records]
    groups: dict[tuple, list[int]] = {}
    for i, tensors in enumerate(records):
        for name, array in (tensors or {}).items():
            if isinstance(array, Omitted):
                out[i][name] = array.document()
            else:
                groups.setdefault((name, array.shape, array.dtype), []).append(i)
    for (name, shape, dtype), idx in groups.items():
        if len(idx) > 1 and dtype.kind in "biuf" and np.prod(shape, dtype=np.int64) > 0:
            arrays = [records[i][name] for i in idx]
            # same shapes: joined along axis 0, each record's values are one contiguous row (np.stack's
            # per-array Python work is the writer's hot spot)
            flat = (np.concatenate(arrays) if len(shape) else np.stack(arrays)).reshape(len(idx), -1)
            if flat.shape[1] <= max_values:
                for i, values in zip(idx, flat.reshape(len(idx), *shape).tolist()):
                    out[i][name] = values
                continue
            if dtype.kind != "f" or np.isfinite(flat).all():  # else: per record, counting the non-finite
                stats = zip(*(column.tolist() for column in row_stats(flat)))
                head = {"summary": True, "shape": list(shape), "dtype": _dtype(flat)}
                for row, i, (mean, std, low, high) in zip(flat, idx, stats):
                    out[i][name] = {**head, "mean": mean, "std": std, "min": low, "max": high,
                                    "sha256": hashlib.sha256(row).hexdigest()}
                continue
        for i in idx:
            out[i][name] = encode(records[i][name], max_values)
    return out


_JSON = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(value) -> str:
    return orjson.dumps(value, option=_JSON).decode()


def _split_rows(rows: np.ndarray) -> list[str]:
    """Each row of ``rows`` (rows first, any rank) as JSON text, its values as ``tolist()`` gives them: one
    orjson call for all of them, cut at the row boundaries (a run of as many closing brackets as a row
    nests, which no row holds inside)."""
    if rows.dtype.kind == "f":
        rows = rows.astype(np.float64, copy=False)  # float32 values written as tolist() writes them
    depth = rows.ndim - 1
    text = orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    if not depth:
        return text[1:-1].split(",")
    open_, close = "[" * depth, "]" * depth
    return list(map(f"{open_}%s{close}".__mod__, text[1 + depth:-1 - depth].split(f"{close},{open_}")))


def _joined_texts(joined: np.ndarray, counts: list[int], max_values: int) -> list[str] | None:
    """The JSON text of each record's tensor (``encode``'s document), when every record holds the same
    number of rows of a numeric tensor (``joined``: the records' tensors joined along axis 0); None for
    anything else (the caller encodes record by record). Per record only C-level work: the values or
    the summary's numbers come from one orjson call per column, the sha256 from hashlib."""
    n = len(counts)
    if not n or joined.ndim == 0 or joined.dtype.kind not in "biuf":
        return None
    k = counts[0]
    if counts.count(k) != n or len(joined) != k * n:
        return None
    shape = (k, *joined.shape[1:])
    size = math.prod(shape)
    if not size:
        return None
    if size <= max_values:
        return _split_rows(joined.reshape(n, *shape))
    flat = np.ascontiguousarray(joined).reshape(n, size)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():  # per record, counting the non-finite
        return None
    stats = row_stats(flat)
    if not all(np.isfinite(s).all() for s in stats):
        return None
    if joined.shape == flat.shape:  # one row per record: drift's features of this input are these
        _last_stats[:] = [joined, stats]
    buf = memoryview(flat).cast("B")
    step = size * flat.itemsize
    sha = hashlib.sha256
    digests = [sha(buf[i:i + step]).hexdigest() for i in range(0, n * step, step)]
    template = (f'{{"summary":true,"shape":{orjson.dumps(list(shape)).decode()},"dtype":'
                f'{orjson.dumps(_dtype(flat)).decode()},').replace("%", "%%")
    template += '"mean":%s,"std":%s,"min":%s,"max":%s,"sha256":"%s"}'
    return list(map(template.__mod__, zip(*map(_split_rows, stats), digests)))


def encode_packed(packed: tuple, count: int, max_values: int) -> list[str | None]:
    """A column of ``count`` records' tensors as the writer packs it (``("c", {name: (joined, rows per
    record)})`` or ``("l", [dict | None, ...])``, see ``ring.pack_dicts``) -> each record's
    ``encode_all`` document as JSON text (None where the record has no tensors)."""
    kind, value = packed
    if kind == "c" and value:
        parts = []
        for name, (joined, counts) in value.items():
            texts = _joined_texts(joined, counts, max_values)
            if texts is None:
                break
            parts.append((dumps(name), texts))
        else:
            if len(parts) == 1:
                key, texts = parts[0]
                return [f"{{{key}:{t}}}" for t in texts]
            keys = [key for key, _ in parts]
            return ["{" + ",".join(f"{k}:{t}" for k, t in zip(keys, row)) + "}"
                    for row in zip(*(texts for _, texts in parts))]
        records = unpack(packed)
    else:
        records = list(value) if kind == "l" else unpack(packed)
    return [None if doc is None else dumps(doc) for doc in encode_many(records, max_values)]


def unpack(packed: tuple) -> list:
    """``ring.pack_dicts``'s output -> one dict (or None) per record; joined arrays come back as views."""
    kind, value = packed
    if kind == "l":
        return list(value)
    parts = []
    for joined, counts in value.values():
        if len(counts) == len(joined) and counts.count(1) == len(counts):  # one row each: the common case
            parts.append([joined[i:i + 1] for i in range(len(joined))])
        else:
            ends = np.cumsum(counts).tolist()
            parts.append([joined[end - c:end] for c, end in zip(counts, ends)])
    names = list(value)
    if len(names) == 1:
        return [{names[0]: part} for part in parts[0]]
    return [dict(zip(names, row)) for row in zip(*parts)]


def _rows(array: np.ndarray, batching: bool) -> np.ndarray:
    """Rows first, one row per request row (a model without batching: the whole tensor is one row)."""
    if batching and array.ndim:
        return array.reshape(len(array), -1)
    return array.reshape(1, -1)


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
    outputs = {n: a for n, a in (outputs or {}).items() if isinstance(a, np.ndarray)}  # not an Omitted one
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
                doc["values"] = _firsts(_rows(classes, batching), int)
            if labels is not None:
                doc["labels"] = _firsts(_rows(labels, batching), _scalar)
                doc.setdefault("values", doc["labels"])
            return doc
    numeric = [a for a in outputs.values() if a.dtype.kind in "biuf" and a.size]
    for array in numeric:
        rows = _rows(array, batching)
        per_row = rows.shape[1]
        if task == "regression" or (task == "auto" and per_row == 1):
            return {"kind": "value", "values": rows[:, 0].astype(np.float64).tolist()}
        if per_row > 1:
            return {"kind": "class", "values": rows.argmax(axis=1).tolist()}
    return None


def predictions_packed(packed: tuple, count: int, batching: bool, task: str = "auto") -> list[str | None] | None:
    """Each record's ``prediction`` as JSON text, from outputs joined (``encode_packed``'s "c" form) of a
    batching model: one ``prediction`` of the joined outputs, cut per record (row-wise, so the same result).
    None when the outputs are not joined that way (the caller goes record by record)."""
    kind, value = packed
    if kind != "c" or not value or not batching:
        return None
    columns = list(value.values())
    counts = columns[0][1]
    if any(c != counts for _, c in columns[1:]) or len(counts) != count:
        return None
    whole = prediction({name: joined for name, (joined, _) in value.items()}, True, task)
    if whole is None:
        return [None] * count
    kind, values, labels = whole["kind"], whole["values"], whole.get("labels")
    if len(values) != sum(counts):
        return None
    if kind == "class" and labels is None and counts.count(1) == count:
        try:  # one class id per record: the common case, filled in C
            return list(map('{"kind":"class","values":[%d]}'.__mod__, values))
        except TypeError:  # a None (an empty row)
            pass
    out, start = [], 0
    for c in counts:
        doc = {"kind": kind, "values": values[start:start + c]}
        if labels is not None:
            doc["labels"] = labels[start:start + c]
        out.append(dumps(doc))
        start += c
    return out


def _firsts(rows: np.ndarray, convert) -> list:
    """Each row's first element (top-1 of a top-k output), None for an empty row."""
    if not rows.shape[1]:
        return [None] * len(rows)
    return [convert(v) for v in rows[:, 0].tolist()]
