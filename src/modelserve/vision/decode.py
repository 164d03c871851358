"""Encoded bytes -> a checked, opened image, then pixels.

Untrusted bytes go through here, so the order matters: size of the payload, then the format
(only JPEG/PNG/WebP/BMP/GIF parsers are ever tried: Pillow's other plugins, EPS among them, are
attack surface a model server has no use for), then the pixel count the header *declares*
(``Image.open`` reads only the header) against ``max_pixels``, and only then the decode.
Every failure names the image (``image 2: ...``) so a client sending a batch knows which one.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from modelserve.errors import InvalidInput, PayloadTooLarge
from modelserve.vision.config import ImagePreprocess

#: Pillow plugin names tried, and how each format's bytes start (for clearer messages)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP"}
#: EXIF orientation -> the transpose that shows the image upright: ImageOps.exif_transpose's table,
#: applied by hand because the preprocessor resizes *before* rotating (less to rotate) and the
#: resized image no longer carries the EXIF block
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_guard_lock = threading.Lock()


class ImageError(InvalidInput):
    """The bytes are not a decodable image (400): empty, unknown format, corrupt, truncated."""


class ImageTooLarge(PayloadTooLarge):
    """The encoded image or its declared pixel count is past the configured bound (413)."""


@dataclass(slots=True)
class Opened:
    """An image whose header passed the checks; pixels not decoded yet."""

    image: ImageFile.ImageFile
    format: str
    #: EXIF orientation (1 = as stored); 5..8 swap width and height. Known at open for JPEG and
    #: WebP; for PNG final only after ``load``
    orientation: int
    #: (width, height) the header declares, as stored (a JPEG draft shrinks ``image.size``)
    stored_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, i.e. after the EXIF orientation."""
        w, h = self.stored_size
        return (h, w) if self.orientation >= 5 else (w, h)


def ensure_bomb_guard(max_pixels: int) -> None:
    """Keep Pillow's own decompression-bomb check on, at no less than its default and above our
    bound (so images we accept never trip it). It is process-wide; we only ever raise it."""
    with _guard_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is None or current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _label(index: int | None) -> str:
    return "image" if index is None else f"image {index}"


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def open_image(data: bytes, spec: ImagePreprocess, index: int | None = None) -> Opened:
    """Check the payload and the header; decode nothing. Raises ImageError / ImageTooLarge."""
    what = _label(index)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{what}: expected encoded image bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageError(f"{what}: empty (0 bytes)")
    if size > spec.max_bytes:
        raise ImageTooLarge(f"{what}: {size} bytes exceeds max_bytes {spec.max_bytes}")
    head = bytes(data[:16])
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{what}: {exc}") from None
    except UnidentifiedImageError:
        sniffed = _sniff(head)
        if sniffed:
            raise ImageError(f"{what}: truncated or corrupt {sniffed} header ({size} bytes)") from None
        raise ImageError(
            f"{what}: cannot identify image format (got {size} bytes starting {head[:8]!r}; "
            f"accepted: {', '.join(FORMATS)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is a bad image
        fmt = _sniff(head) or "image"
        if "truncat" in str(exc).lower():
            raise ImageError(f"{what}: truncated {fmt} header ({size} bytes)") from None
        raise ImageError(f"{what}: corrupt {fmt} header ({exc})") from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what}: {image.format} declares an empty size {w}x{h}")
    if w * h > spec.max_pixels:
        raise ImageTooLarge(f"{what}: {w}x{h} = {w * h} pixels exceeds max_pixels {spec.max_pixels}")
    return Opened(image, image.format or "image", _orientation(image), (w, h))


def _orientation(image: Image.Image) -> int:
    """EXIF orientation from the EXIF block the parser has seen so far. Not ``getexif()``: for a
    PNG that decodes the whole image (to look for an eXIf chunk after the pixels)."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF is not worth rejecting the image for
        return 1
    return value if value in _ORIENT else 1


def load(opened: Opened, index: int | None = None) -> None:
    """Decode the pixels, mapping every decoder failure to ImageError. A PNG's eXIf chunk may
    follow the pixels, so the orientation is read again afterwards (JPEG/WebP know it at open)."""
    try:
        opened.image.load()
        opened.orientation = _orientation(opened.image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{_label(index)}: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        reason = str(exc) or type(exc).__name__
        if "truncat" in reason.lower() or isinstance(exc, EOFError):
            raise ImageError(f"{_label(index)}: truncated {opened.format}") from None
        raise ImageError(f"{_label(index)}: corrupt {opened.format} data ({reason})") from None


def to_mode(image: Image.Image, color: str, fmt: str, index: int | None = None) -> Image.Image:
    """RGB or L pixels (BGR is RGB here: the channel flip happens on the array)."""
    mode = "L" if color == "L" else "RGB"
    if image.mode == mode:
        return image
    try:  # alpha is dropped: the colour under transparent pixels is what the model sees
        if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: keep the top 8 bits
            # (Pillow's own conversion clips at 255 instead of scaling)
            grey = np.right_shift(np.asarray(image, dtype=np.int64), 8).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(grey)
            return image if mode == "L" else image.convert(mode)
        return image.convert(mode)
    except Exception as exc:  # noqa: BLE001 - odd modes fail in many ways
        raise ImageError(f"{_label(index)}: cannot convert {fmt} mode {image.mode} to {mode} ({exc})") from None


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation read earlier (the image at hand may have lost its EXIF block)."""
    method = _ORIENT.get(orientation)
    return image if method is None else image.transpose(method)


def decode(data: bytes, spec: ImagePreprocess, index: int | None = None) -> Image.Image:
    """Bytes -> an upright RGB or L Pillow image at full size (no resizing).

    Raises ImageError (400) for anything that is not a decodable image, ImageTooLarge (413) past
    ``spec.max_bytes`` / ``spec.max_pixels``. GIF and animated WebP give their first frame.
    """
    ensure_bomb_guard(spec.max_pixels)
    opened = open_image(data, spec, index)
    load(opened, index)
    image = to_mode(opened.image, spec.color, opened.format, index)
    return upright(image, opened.orientation)
