"""Model outputs -> answers a client can read: top-k labels, boxes after NMS, segmentation masks.

A ``Postprocessor`` gets one batch's outputs and the ``ImageMeta`` of each image from the
preprocessor, so boxes and masks come back in the coordinates of the image the client sent,
whatever letterboxing or cropping the model needed. Results are JSON-ready dicts (one per image);
``to_tensors`` turns the same results into fixed-shape tensors for V2/Triton clients.

Pure numpy and stateless per call: one instance is safe to share across worker threads.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from modelserve.errors import ModelServeError
from modelserve.vision.config import Postprocess
from modelserve.vision.preprocess import ImageMeta

#: after the score threshold, at most this many candidates enter NMS (bounds a garbage model's cost)
PRE_NMS_LIMIT = 10_000


class PostprocessError(ModelServeError):
    """The model's outputs do not fit the declared postprocess (a config error: 500, not the client's)."""


class ImageResult(dict):
    """A JSON-ready dict; ``mask`` keeps a segmentation's label array for ``to_tensors``."""

    __slots__ = ("mask",)

    def __init__(self, *args, mask: np.ndarray | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = mask


def load_labels(labels: str | Sequence[str] | None, folder: str | Path | None = None) -> list[str] | None:
    """``Postprocess.labels`` -> a list: an inline list as is, a file name read from ``folder``
    (one label per line, line i is class i; trailing blank lines dropped)."""
    if labels is None or not isinstance(labels, str):
        return None if labels is None else list(labels)
    path = Path(folder or ".") / labels
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: [N,4] x [M,4] -> [N,M]."""
    a, b = np.asarray(a, np.float64)[:, None, :], np.asarray(b, np.float64)[None, :, :]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        classes: np.ndarray | None = None, max_detections: int | None = None) -> np.ndarray:
    """Greedy NMS; indices of the kept boxes, best first. With ``classes``, boxes only suppress
    boxes of their own class: each class is shifted to its own region so classes never overlap."""
    boxes = np.asarray(boxes, np.float64)
    if classes is not None and len(boxes):
        span = boxes.max() - boxes.min() + 1.0
        boxes = boxes + (np.asarray(classes, np.float64) * span)[:, None]
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size and (max_detections is None or len(keep) < max_detections):
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order.size:  # one box against all remaining, vectorized
            order = order[box_iou(boxes[best:best + 1], boxes[order])[0] <= iou_threshold]
    return np.asarray(keep, np.int64)


def _to_xyxy(b: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "cxcywh":
        half = b[..., 2:4] / 2
        return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)
    if fmt == "yxyx":
        return b[..., [1, 0, 3, 2]]
    return b


class Postprocessor:
    """``Postprocess`` made executable: ``post(outputs, metas) -> [result per image]``."""

    def __init__(self, spec: Postprocess, labels: Sequence[str] | None = None):
        self.spec = spec
        self.labels = list(labels) if labels is not None else None

    def label(self, cls: int) -> str:
        return self.labels[cls] if self.labels is not None and 0 <= cls < len(self.labels) else str(cls)

    def _output(self, outputs: Mapping[str, np.ndarray], name: str | None) -> np.ndarray:
        if name is None:
            if len(outputs) != 1:
                raise PostprocessError(f"{self.spec.kind}: the model has outputs {sorted(outputs)}; "
                                       "name the one to read in postprocess.output")
            return np.asarray(next(iter(outputs.values())))
        if name not in outputs:
            raise PostprocessError(f"{self.spec.kind}: no output {name!r} (have {sorted(outputs)})")
        return np.asarray(outputs[name])

    def __call__(self, outputs: Mapping[str, np.ndarray], metas: Sequence[ImageMeta] | None = None
                 ) -> list[ImageResult]:
        """One batch's outputs -> one JSON-ready dict per image. ``metas`` (from the preprocessor)
        is needed for detection and segmentation; classification ignores it."""
        kind = self.spec.kind
        if kind != "classification" and metas is None:
            raise PostprocessError(f"{kind} needs the images' metas to map results back")
        return getattr(self, f"_{kind}")(outputs, metas)

    def _classification(self, outputs, metas) -> list[ImageResult]:
        x = self._output(outputs, self.spec.output)
        if metas is not None and x.shape[0] != len(metas):
            raise PostprocessError(f"classification: outputs hold {x.shape[0]} images, {len(metas)} were sent")
        x = x.reshape(x.shape[0], -1).astype(np.float32, copy=False)
        if self.spec.softmax:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            x = e / e.sum(axis=1, keepdims=True)
        k = min(self.spec.top_k, x.shape[1])
        top = np.argsort(-x, axis=1, kind="stable")[:, :k]  # stable: ties go to the lower class id
        scores = np.take_along_axis(x, top, axis=1)
        return [ImageResult(labels=[self.label(int(c)) for c in row], scores=s.tolist(), classes=row.tolist())
                for row, s in zip(top, scores)]

    def _detection_arrays(self, outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> boxes [N,K,4] (declared format), scores [N,K], classes [N,K] from either layout."""
        spec = self.spec
        if spec.boxes is not None:
            boxes = self._output(outputs, spec.boxes)
            boxes = boxes.reshape(boxes.shape[0], -1, 4)
            scores = self._output(outputs, spec.scores).reshape(*boxes.shape[:2], -1)
            if spec.classes is not None:
                return boxes, scores[..., 0], self._output(outputs, spec.classes).reshape(boxes.shape[:2]).astype(np.int64)
            if scores.shape[-1] == 1:  # one class (or class-agnostic scores)
                return boxes, scores[..., 0], np.zeros(scores.shape[:2], np.int64)
            return boxes, scores.max(-1), scores.argmax(-1)
        y = self._output(outputs, spec.output)
        if y.ndim != 3:
            raise PostprocessError(f"detection: YOLO-style output must be [N,K,4+C] or [N,4+C,K], got {list(y.shape)}")
        extra = 4 + int(spec.objectness)
        want = extra + len(self.labels) if self.labels else None
        if (y.shape[1] == want) != (y.shape[2] == want):  # labels decide when they match one axis
            channels_first = y.shape[1] == want
        else:  # otherwise: anchors (thousands) outnumber attributes (4 + classes)
            channels_first = y.shape[1] < y.shape[2]
        if channels_first:
            y = y.transpose(0, 2, 1)
        if y.shape[2] <= extra:
            raise PostprocessError(f"detection: output {list(y.shape)} has no class scores after {extra} box columns")
        cls = y[..., extra:]
        if spec.objectness:
            cls = cls * y[..., 4:5]
        return y[..., :4], cls.max(-1), cls.argmax(-1)

    def _detection(self, outputs, metas) -> list[ImageResult]:
        spec = self.spec
        try:
            boxes, scores, classes = self._detection_arrays(outputs)
        except ValueError as exc:  # reshapes of outputs that do not fit together
            shapes = {k: list(np.shape(v)) for k, v in outputs.items()}
            raise PostprocessError(f"detection: outputs {shapes} do not fit boxes/scores ({exc})") from None
        if boxes.shape[0] != len(metas):
            raise PostprocessError(f"detection: outputs hold {boxes.shape[0]} images, {len(metas)} were sent")
        results = []
        for b, s, c, meta in zip(boxes, scores, classes, metas):
            hit = np.flatnonzero(s >= spec.score_threshold)
            if hit.size > PRE_NMS_LIMIT:
                hit = hit[np.argsort(-s[hit], kind="stable")[:PRE_NMS_LIMIT]]
            b = _to_xyxy(b[hit].astype(np.float64), spec.box_format)
            if spec.normalized:
                b = b * [meta.input_width, meta.input_height, meta.input_width, meta.input_height]
            s, c = s[hit], c[hit]
            keep = nms(b, s, spec.iou_threshold, classes=c, max_detections=spec.max_detections)
            b = meta.to_original(b[keep])
            visible = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # boxes wholly in padding vanish
            results.append(ImageResult(detections=[
                {"box": box.tolist(), "score": float(score), "class": int(cls), "label": self.label(int(cls))}
                for box, score, cls in zip(b[visible], s[keep][visible], c[keep][visible])
            ]))
        return results

    def _segmentation(self, outputs, metas) -> list[ImageResult]:
        y = self._output(outputs, self.spec.output)
        if y.ndim == 4:
            y = y.argmax(axis=1)  # at the model's resolution: cheaper than after resizing
        elif y.ndim != 3:
            raise PostprocessError(f"segmentation: output must be [N,C,H,W] or [N,H,W], got {list(y.shape)}")
        if y.shape[0] != len(metas):
            raise PostprocessError(f"segmentation: outputs hold {y.shape[0]} images, {len(metas)} were sent")
        wide = (self.labels is not None and len(self.labels) > 256) or (y.size and y.max() > 255)
        dtype = np.int32 if wide else np.uint8
        results = []
        for labels, meta in zip(y, metas):
            mask = _to_original(labels.astype(dtype), meta)
            counts = np.bincount(mask.ravel())
            result = ImageResult(classes_present={self.label(int(c)): int(counts[c]) for c in np.flatnonzero(counts)},
                                 shape=[meta.height, meta.width], mask=mask)
            if self.spec.png:
                result["mask_png"] = mask_to_png(mask)
            results.append(result)
        return results

    def to_tensors(self, results: Sequence[Mapping]) -> dict[str, np.ndarray]:
        """Results -> fixed-shape tensors for V2 clients (see ``tensor_specs`` for names and types)."""
        n = len(results)
        kind = self.spec.kind
        if kind == "classification":
            return {"labels": np.array([[lb.encode() for lb in r["labels"]] for r in results], dtype=object),
                    "scores": np.array([r["scores"] for r in results], np.float32),
                    "classes": np.array([r["classes"] for r in results], np.int32)}
        if kind == "detection":
            m = max((len(r["detections"]) for r in results), default=0)
            out = {"boxes": np.full((n, m, 4), -1, np.float32), "scores": np.full((n, m), -1, np.float32),
                   "classes": np.full((n, m), -1, np.int32), "labels": np.full((n, m), b"", dtype=object),
                   "num_detections": np.zeros((n, 1), np.int32)}
            for i, r in enumerate(results):
                for j, d in enumerate(r["detections"]):
                    out["boxes"][i, j], out["scores"][i, j] = d["box"], d["score"]
                    out["classes"][i, j], out["labels"][i, j] = d["class"], d["label"].encode()
                out["num_detections"][i, 0] = len(r["detections"])
            return out
        masks = [getattr(r, "mask", None) for r in results]
        masks = [m if m is not None else png_to_mask(r["mask_png"]) for m, r in zip(masks, results)]
        if len({m.shape for m in masks}) != 1:
            return {}  # different sizes do not stack: the JSON results carry them
        wide = any(m.dtype != np.uint8 for m in masks)
        return {"mask": np.stack(masks).astype(np.int32 if wide else np.uint8, copy=False)}

    def tensor_specs(self) -> list[tuple[str, str, list[int]]]:
        """(name, V2 datatype, dims without the batch dim; -1 = varies) of ``to_tensors``' output."""
        kind = self.spec.kind
        if kind == "classification":
            return [("labels", "BYTES", [-1]), ("scores", "FP32", [-1]), ("classes", "INT32", [-1])]
        if kind == "detection":
            return [("boxes", "FP32", [-1, 4]), ("scores", "FP32", [-1]), ("classes", "INT32", [-1]),
                    ("labels", "BYTES", [-1]), ("num_detections", "INT32", [1])]
        wide = self.labels is not None and len(self.labels) > 256
        return [("mask", "INT32" if wide else "UINT8", [-1, -1])]


def _to_original(labels: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """A label map over the model input (any resolution) -> the original image's size, nearest
    neighbour through the meta's geometry; pixels the model never saw (cropped away) get class 0."""
    mh, mw = labels.shape
    rows = np.floor(((np.arange(meta.height) + 0.5) * meta.scale_y + meta.offset_y) * mh / meta.input_height)
    cols = np.floor(((np.arange(meta.width) + 0.5) * meta.scale_x + meta.offset_x) * mw / meta.input_width)
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    vr, vc = (rows >= 0) & (rows < mh), (cols >= 0) & (cols < mw)
    out = np.zeros((meta.height, meta.width), labels.dtype)
    out[np.ix_(vr, vc)] = labels[np.ix_(rows[vr], cols[vc])]
    return out


def mask_to_png(mask: np.ndarray) -> str:
    """Label map -> base64 PNG: 8-bit grey up to 255 classes, 16-bit past that."""
    image = Image.fromarray(mask.astype(np.uint8 if mask.dtype == np.uint8 else np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # masks are flat: fast level compresses well
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_to_mask(data: str | bytes) -> np.ndarray:
    """The inverse of ``mask_to_png``."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        mask = np.asarray(image)
    return mask if mask.dtype == np.uint8 else mask.astype(np.int32)
