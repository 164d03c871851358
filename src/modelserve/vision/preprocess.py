"""Encoded image -> the model's input array, plus the geometry to map answers back.

Runs per request, before batching, so images of any size leave here with one shape and batch
together. Pillow does decode and resize (both release the GIL, so worker threads run in
parallel); numpy does normalization and layout. Order of work, cheapest first:

1. header checks (``decode.open_image``): nothing decoded for an oversized or bogus image;
2. JPEG ``draft``: the decoder itself downscales by 2/4/8 (DCT scaling) when the target is far
   smaller, keeping at least ``DRAFT_GAP`` times the target so the final resample stays sharp
   (``fast_decode: true``: at least the target itself);
3. resize in the stored orientation, *then* apply the EXIF rotation (fewer pixels to rotate);
   with ``fast_decode: true`` and a centre crop, only the kept part is resized, straight to the crop;
4. letterbox / center crop as one placement of the resized pixels in the output canvas;
5. normalize with a per-channel lookup table (256 entries: ``((v * scale + offset) - mean) / std``
   computed once in float64), which also writes the layout in the same pass.

Everything a ``Preprocessor`` holds is read-only after ``__init__``: share one across threads.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from modelserve.errors import InvalidInput
from modelserve.vision.config import ImagePreprocess
from modelserve.vision.decode import (
    ensure_bomb_guard,
    load,
    open_image,
    to_mode,
    upright,
)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX,
}
_NUMPY = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}
#: JPEG draft keeps at least this many decoded pixels per target pixel on each axis
DRAFT_GAP = 2


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """Where one original image went inside the model input.

    A point maps as ``model = original * scale + offset`` on each axis (``offset`` is the
    letterbox padding minus the crop start), so ``original = (model - offset) / scale``.
    """

    height: int  #: original size, upright (after EXIF orientation)
    width: int
    input_height: int  #: the model input's spatial size
    input_width: int
    scale_y: float  #: model-input pixels per original pixel
    scale_x: float
    offset_y: float  #: where the original's top-left corner lands in the model input
    offset_x: float

    def to_original(self, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
        """[..., 4] x1, y1, x2, y2 in model-input pixels -> original-image pixels (float64)."""
        b = np.asarray(boxes, np.float64)
        out = np.empty_like(b)
        out[..., 0::2] = (b[..., 0::2] - self.offset_x) / self.scale_x
        out[..., 1::2] = (b[..., 1::2] - self.offset_y) / self.scale_y
        if clip:
            np.clip(out[..., 0::2], 0, self.width, out=out[..., 0::2])
            np.clip(out[..., 1::2], 0, self.height, out=out[..., 1::2])
        return out

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """The inverse: original-image pixels -> model-input pixels."""
        b = np.asarray(boxes, np.float64)
        out = np.empty_like(b)
        out[..., 0::2] = b[..., 0::2] * self.scale_x + self.offset_x
        out[..., 1::2] = b[..., 1::2] * self.scale_y + self.offset_y
        return out


def _round(x: float) -> int:
    return max(1, int(x + 0.5))


class Preprocessor:
    """``ImagePreprocess`` made executable: ``pre(data) -> (array, meta)``, ``pre.batch(list)``."""

    def __init__(self, spec: ImagePreprocess):
        self.spec = spec
        self._resample = _RESAMPLE[spec.interpolation]
        self._mode = "L" if spec.color == "L" else "RGB"
        self._draft_gap = 1 if spec.fast_decode else DRAFT_GAP
        self._lut = None  # UINT8 passes pixels through
        if spec.dtype != "UINT8":
            c = spec.channels
            mean = np.broadcast_to(np.asarray(spec.mean or [0.0], np.float64), (c,))
            std = np.broadcast_to(np.asarray(spec.std or [1.0], np.float64), (c,))
            v = np.arange(256, dtype=np.float64)[None, :]
            lut = ((v * spec.scale + spec.offset) - mean[:, None]) / std[:, None]
            self._lut = lut.astype(_NUMPY[spec.dtype])
        ensure_bomb_guard(spec.max_pixels)

    @property
    def datatype(self) -> str:
        """V2 datatype of the produced arrays."""
        return self.spec.dtype

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Per-image output shape (no batch dim), or None when it follows the image's size."""
        spec = self.spec
        size = spec.center_crop or spec.target()
        if size is None:
            return None
        c = spec.channels
        return (c, *size) if spec.layout == "NCHW" else (*size, c)

    def check_model_input(self, dims: Sequence[int]) -> None:
        """Raise ValueError when ``dims`` (the model input without batch dim; -1 = any) cannot take
        what this produces; call it at model load so a mismatch never reaches a request."""
        shape = self.shape
        c = self.spec.channels
        want = shape or ((c, -1, -1) if self.spec.layout == "NCHW" else (-1, -1, c))
        ok = len(dims) == len(want) and all(d == -1 or w == -1 or d == w for d, w in zip(dims, want))
        if not ok:
            raise ValueError(f"preprocess produces {list(want)} ({self.spec.layout}, -1 = image size) "
                             f"but the model input takes {list(dims)}")

    def _plan(self, h: int, w: int) -> tuple[int, int, int, int, int, int]:
        """Original (h, w) -> resized (nh, nw), its top-left (oy, ox) in the canvas (out_h, out_w)."""
        spec = self.spec
        target = spec.target()
        if spec.resize is None:
            nh, nw = h, w
        elif spec.resize_mode == "shorter":
            s = spec.resize / min(h, w)
            nh, nw = (spec.resize, _round(w * s)) if h <= w else (_round(h * s), spec.resize)
        elif spec.resize_mode == "exact":
            nh, nw = target
        else:  # letterbox: fit inside, centre, pad
            s = min(target[0] / h, target[1] / w)
            nh, nw = min(target[0], _round(h * s)), min(target[1], _round(w * s))
        out_h, out_w, oy, ox = nh, nw, 0, 0
        if spec.resize_mode == "letterbox":
            out_h, out_w = target
            oy, ox = (out_h - nh) // 2, (out_w - nw) // 2
        if spec.center_crop:
            ch, cw = spec.center_crop
            oy, ox = oy - (out_h - ch) // 2, ox - (out_w - cw) // 2
            out_h, out_w = ch, cw
        return nh, nw, oy, ox, out_h, out_w

    def __call__(self, data: bytes, index: int | None = None, out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, ImageMeta]:
        """One encoded image -> (array without batch dim, its meta). ``index`` names the image in
        error messages; ``out`` (right shape and dtype) receives the array instead of a new one."""
        opened = open_image(data, self.spec, index)
        box = None
        if opened.format == "JPEG":  # orientation is known before decoding: plan a DCT downscale
            stored = self._stored_size(opened)
            full = opened.image.size
            gap = self._draft_gap
            big = stored[0] * gap * 2 <= full[0] and stored[1] * gap * 2 <= full[1]
            want = (stored[0] * gap, stored[1] * gap) if big else None
            drafted = opened.image.draft(self._mode, want)
            if drafted and want:
                box = drafted[1]  # the original's extent in drafted pixels: keeps the mapping exact
        load(opened, index)
        w0, h0 = opened.size
        nh, nw, oy, ox, out_h, out_w = self._plan(h0, w0)
        stored = self._stored_size(opened)  # Pillow (width, height) before the rotation
        image = to_mode(opened.image, self.spec.color, opened.format, index)
        if self.spec.fast_decode and opened.orientation == 1 and oy <= 0 and ox <= 0 \
                and out_h - oy <= nh and out_w - ox <= nw and (out_h, out_w) != (nh, nw):
            # fast_decode with a crop inside the resized image: resample only the kept part, straight
            # to the crop's size (the resize filter is centred where it would be for the whole image)
            bx0, by0, bx1, by1 = box if box is not None else (0, 0, *image.size)
            sx, sy = (bx1 - bx0) / nw, (by1 - by0) / nh
            crop = (bx0 - ox * sx, by0 - oy * sy, bx0 + (out_w - ox) * sx, by0 + (out_h - oy) * sy)
            image = image.resize((out_w, out_h), self._resample, box=crop)
            pixels = np.asarray(image)
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
            meta = ImageMeta(h0, w0, out_h, out_w, nh / h0, nw / w0, float(oy), float(ox))
            return self._finish(pixels, out), meta
        if box is not None or image.size != stored:
            image = image.resize(stored, self._resample, box=box)
        image = upright(image, opened.orientation)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        pixels = self._place(pixels, oy, ox, out_h, out_w)
        meta = ImageMeta(h0, w0, out_h, out_w, nh / h0, nw / w0, float(oy), float(ox))
        return self._finish(pixels, out), meta

    def _stored_size(self, opened) -> tuple[int, int]:
        """The resize target as Pillow's (width, height) in the stored (unrotated) orientation."""
        w0, h0 = opened.size
        nh, nw = self._plan(h0, w0)[:2]
        return (nh, nw) if opened.orientation >= 5 else (nw, nh)

    def _place(self, pixels: np.ndarray, oy: int, ox: int, out_h: int, out_w: int) -> np.ndarray:
        """Put the resized pixels at (oy, ox) of an (out_h, out_w) canvas: letterbox and crop."""
        h, w, c = pixels.shape
        if oy <= 0 and ox <= 0 and oy + h >= out_h and ox + w >= out_w:  # a crop (or nothing): a view
            return pixels[-oy:-oy + out_h, -ox:-ox + out_w]
        canvas = np.full((out_h, out_w, c), self.spec.pad_value, np.uint8)
        y0, x0 = max(oy, 0), max(ox, 0)
        y1, x1 = min(oy + h, out_h), min(ox + w, out_w)
        canvas[y0:y1, x0:x1] = pixels[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return canvas

    def _finish(self, pixels: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """HWC uint8 -> declared channel order, layout and dtype, in one pass."""
        if self.spec.color == "BGR":
            pixels = pixels[:, :, ::-1]
        chw = self.spec.layout == "NCHW"
        h, w, c = pixels.shape
        shape = (c, h, w) if chw else (h, w, c)
        if out is None:
            out = np.empty(shape, _NUMPY[self.spec.dtype])
        elif out.shape != shape:
            raise InvalidInput(f"image: preprocessed shape {shape} differs from the batch's {out.shape}")
        for i in range(c):
            dst = out[i] if chw else out[:, :, i]
            if self._lut is None:
                dst[...] = pixels[:, :, i]
            else:
                np.take(self._lut[i], pixels[:, :, i], out=dst, mode="clip")
        return out

    def batch(self, images: Sequence[bytes] | np.ndarray) -> tuple[np.ndarray, list[ImageMeta]]:
        """Several encoded images (a list, or a BYTES tensor of any shape) -> ([N, ...], metas),
        one after the other in the calling thread (see ``preprocess_many`` for the parallel way)."""
        items = _as_list(images)
        shape = self.shape
        if shape is not None:  # decode straight into the batch array: no stacking copy
            batch = np.empty((len(items), *shape), _NUMPY[self.spec.dtype])
            metas = [self(data, i, out=batch[i])[1] for i, data in enumerate(items)]
            return batch, metas
        arrays, metas = zip(*(self(data, i) for i, data in enumerate(items)))
        return _stack(list(arrays)), list(metas)


def _as_list(images: Sequence[bytes] | np.ndarray) -> list:
    items = list(images.reshape(-1)) if isinstance(images, np.ndarray) else list(images)
    if not items:
        raise InvalidInput("no images given")
    return items


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InvalidInput(f"images preprocess to different shapes {sorted(shapes)}: set resize to "
                           "[h, w] (or center_crop) to batch images of different sizes")
    return np.stack(arrays)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The process-wide decode pool, one thread per CPU (Pillow releases the GIL while working)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 4, thread_name_prefix="modelserve-vision")
        return _pool


async def preprocess_many(preprocessor: Preprocessor, images: Sequence[bytes] | np.ndarray
                          ) -> tuple[np.ndarray, list[ImageMeta]]:
    """``preprocessor.batch`` with the images decoded concurrently in ``pool()``; awaitable from
    the event loop. The first failing image's error is raised (the others still finish)."""
    loop = asyncio.get_running_loop()
    items = _as_list(images)
    done = await asyncio.gather(*(loop.run_in_executor(pool(), preprocessor, data, i)
                                  for i, data in enumerate(items)))
    return _stack([a for a, _ in done]), [m for _, m in done]
