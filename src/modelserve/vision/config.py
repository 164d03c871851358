"""What a model's ``config.yaml`` declares about images: how to turn bytes into its input tensor
(``ImagePreprocess``) and how to turn its outputs into answers (``Postprocess``).

Both are strict (unknown keys are errors) so a typo in a config fails at load time, not as a
silently ignored option on the first request. Example::

    preprocess:
      input: image            # clients send encoded JPEG/PNG bytes in this BYTES input
      resize: 256             # shorter side to 256 ...
      center_crop: [224, 224] # ... then the central 224x224
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
    postprocess:
      kind: classification
      softmax: true
      top_k: 5
      labels: labels.txt
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Size = tuple[int, int]


class ImagePreprocess(_Strict):
    """Encoded image bytes -> one model input tensor (per image; the batch dim is added later)."""

    #: name of the BYTES input clients send the encoded images in
    input: str = "image"
    #: the model input this fills; None = the model's only input
    tensor: str | None = None
    #: channels the model expects; L = one grey channel
    color: Literal["RGB", "BGR", "L"] = "RGB"
    #: int = target of the shorter side (or a square for exact/letterbox); [h, w] = target size;
    #: None = keep the decoded size
    resize: int | Size | None = None
    #: exact = stretch to [h, w]; shorter = scale so the shorter side is ``resize`` (keeps aspect);
    #: letterbox = fit inside [h, w] keeping aspect, pad the rest with ``pad_value``.
    #: None = shorter for an int ``resize``, exact for [h, w]
    resize_mode: Literal["exact", "shorter", "letterbox"] | None = None
    #: Pillow resampling filter; area = box averaging (best for large downscales)
    interpolation: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear"
    #: [h, w] taken from the centre after resizing (padded with ``pad_value`` if the image is smaller)
    center_crop: Size | None = None
    #: pixel value (0..255, every channel) for letterbox and crop padding; 114 is what YOLO uses
    pad_value: int = Field(114, ge=0, le=255)
    #: float input = pixel * scale + offset, then (x - mean) / std per channel
    scale: float = 1 / 255
    offset: float = 0.0
    #: per channel, in the model's channel order (BGR order when color is BGR); one value = all
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    #: UINT8 passes raw pixels: scale/offset/mean/std must then be left out
    dtype: Literal["FP32", "FP16", "UINT8"] = "FP32"
    #: decompression-bomb bound: width * height declared in the header, checked before decoding
    max_pixels: int = Field(40_000_000, gt=0)
    #: bound on one encoded image
    max_bytes: int = Field(32 * 1024 * 1024, gt=0)
    #: opt-in speed over bit-exactness (default off: pixels equal Pillow's plain decode + resize + crop).
    #: On: a JPEG is DCT-downscaled by libjpeg (draft 1/2, 1/4, 1/8) whenever the decoded image still
    #: has at least the resized size (off: only when it has twice that), and with ``center_crop`` only
    #: the part of the image the crop keeps is resized (off: the whole image, then cropped). The answer
    #: differs from the exact path by rounding (resize coefficients computed for a sub-box: pixels off
    #: by at most 1 of 255) and, where the draft applies, by libjpeg's DCT scaling instead of
    #: the resampling filter (a few levels of 255 on photos). The geometry (``ImageMeta``) is the same.
    fast_decode: bool = False

    @field_validator("resize", "center_crop")
    @classmethod
    def _positive(cls, value):
        sizes = value if isinstance(value, tuple) else (value,) if value is not None else ()
        if any(s <= 0 for s in sizes):
            raise ValueError(f"sizes must be positive, got {value}")
        return value

    @field_validator("std")
    @classmethod
    def _nonzero(cls, value):
        if value is not None and any(s == 0 for s in value):
            raise ValueError("std must not contain 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ImagePreprocess:
        mode = self.resize_mode
        if mode is None:
            object.__setattr__(self, "resize_mode", "shorter" if isinstance(self.resize, int) else "exact")
        elif mode == "shorter" and isinstance(self.resize, tuple):
            raise ValueError("resize_mode shorter takes one int resize (the shorter side), not [h, w]")
        elif mode != "exact" and self.resize is None:
            raise ValueError(f"resize_mode {mode} needs resize")
        channels = 1 if self.color == "L" else 3
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, channels):
                raise ValueError(f"{name} needs 1 or {channels} values for color {self.color}, got {len(values)}")
        if self.dtype == "UINT8":
            given = {"scale", "offset", "mean", "std"} & self.model_fields_set
            if given:
                raise ValueError(f"dtype UINT8 passes raw pixels; remove {', '.join(sorted(given))}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    def target(self) -> Size | None:
        """[h, w] for exact/letterbox resizing (an int means a square); None otherwise."""
        if self.resize is None or self.resize_mode == "shorter":
            return None
        return self.resize if isinstance(self.resize, tuple) else (self.resize, self.resize)


#: fields that belong to one kind only; setting them for another kind is a config error
_FIELDS_OF_KIND = {
    "classification": {"softmax", "top_k"},
    "detection": {"boxes", "scores", "classes", "box_format", "normalized", "objectness",
                  "score_threshold", "iou_threshold", "max_detections"},
    "segmentation": {"png"},
}


class Postprocess(_Strict):
    """Model outputs -> per-image answers: top-k labels, boxes after NMS, or a mask."""

    kind: Literal["classification", "detection", "segmentation"]
    #: the output tensor read: classification [N,C], segmentation [N,C,H,W] or [N,H,W] (already
    #: argmaxed), detection YOLO-style [N,K,4+C] or [N,4+C,K]; None = the model's only output
    output: str | None = None
    #: class names: a file in the model folder (one per line, line i = class i) or an inline list;
    #: None = classes are reported as their index
    labels: str | list[str] | None = None

    # -- classification
    #: True = apply softmax here (the model outputs logits); False = report scores as they come
    softmax: bool = False
    top_k: int = Field(5, gt=0)

    # -- detection: either ``boxes`` + ``scores`` (+ ``classes``) outputs, or one YOLO-style ``output``
    #: [N,K,4] boxes output name
    boxes: str | None = None
    #: [N,K,C] per-class scores, or [N,K] best scores when ``classes`` is given
    scores: str | None = None
    #: [N,K] class ids going with [N,K] ``scores``
    classes: str | None = None
    box_format: Literal["xyxy", "cxcywh", "yxyx"] = "xyxy"
    #: True = coordinates are fractions (0..1) of the model input's width/height
    normalized: bool = False
    #: YOLO-style output carries an objectness column after the box (YOLOv5: [N,K,5+C]); score = obj * class
    objectness: bool = False
    score_threshold: float = Field(0.25, ge=0)
    #: boxes of the same class overlapping more than this are suppressed (class-wise NMS)
    iou_threshold: float = Field(0.45, ge=0, le=1)
    max_detections: int = Field(100, gt=0)

    # -- segmentation
    #: also return the mask as a base64 PNG (8-bit, or 16-bit past 256 classes) in JSON answers
    png: bool = True

    @model_validator(mode="after")
    def _fields_match_kind(self) -> Postprocess:
        for kind, fields in _FIELDS_OF_KIND.items():
            stray = fields & self.model_fields_set
            if kind != self.kind and stray:
                raise ValueError(f"{', '.join(sorted(stray))}: only for kind {kind}, not {self.kind}")
        if self.kind == "detection":
            if self.boxes is not None and self.output is not None:
                raise ValueError("detection takes either boxes + scores, or one YOLO-style output")
            if (self.boxes is None) != (self.scores is None):
                raise ValueError("detection needs both boxes and scores (or neither, for a YOLO-style output)")
            if self.classes is not None and self.boxes is None:
                raise ValueError("classes goes with boxes + scores")
        return self
