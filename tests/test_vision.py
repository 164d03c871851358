"""modelserve.vision on real photographs (scikit-image samples) and scikit-learn's digits,
encoded with Pillow in the test; every expectation is recomputed by hand with Pillow/numpy."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError

from modelserve.errors import InvalidInput, PayloadTooLarge
from modelserve.vision import (
    ImageError,
    ImageMeta,
    ImagePreprocess,
    ImageTooLarge,
    Postprocess,
    PostprocessError,
    Postprocessor,
    Preprocessor,
    box_iou,
    decode,
    load_labels,
    nms,
    png_to_mask,
    preprocess_many,
)

skdata = pytest.importorskip("skimage.data")

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(), "coffee": skdata.coffee()}


def encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def by_hand(pixels: np.ndarray, size_hw, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize with Pillow, normalize in float64, NCHW float32: what the preprocessor must equal."""
    resized = np.asarray(Image.fromarray(pixels).resize(size_hw[::-1], resample), np.float64)
    return ((resized / 255 - MEAN) / STD).astype(np.float32).transpose(2, 0, 1)


# -- preprocessing -----------------------------------------------------------------------------

def test_png_exact_resize_normalize_equals_by_hand(photos):
    pre = Preprocessor(ImagePreprocess(resize=[224, 200], mean=MEAN, std=STD))
    assert pre.shape == (3, 224, 200) and pre.datatype == "FP32"
    for name, pixels in photos.items():
        array, meta = pre(encode(pixels, "PNG"))
        assert array.dtype == np.float32 and array.shape == (3, 224, 200)
        np.testing.assert_array_equal(array, by_hand(pixels, (224, 200)), err_msg=name)
        assert (meta.height, meta.width) == pixels.shape[:2]
        assert (meta.input_height, meta.input_width) == (224, 200)


def test_shorter_side_then_center_crop_equals_by_hand(photos):
    pre = Preprocessor(ImagePreprocess(resize=256, center_crop=[224, 224], mean=MEAN, std=STD,
                                       interpolation="bicubic"))
    pixels = photos["coffee"]  # 400 x 600: shorter side 256 -> 256 x 384
    array, meta = pre(encode(pixels, "PNG"))
    full = by_hand(pixels, (256, 384), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(array, full[:, 16:240, 80:304])
    assert (meta.scale_y, meta.scale_x, meta.offset_y, meta.offset_x) == (256 / 400, 384 / 600, -16, -80)


def test_bgr_nhwc_fp16_and_uint8_layouts(photos):
    pixels = photos["chelsea"]
    data = encode(pixels, "PNG")
    bgr, _ = Preprocessor(ImagePreprocess(color="BGR", layout="NHWC", dtype="FP16", scale=1.0, mean=[10, 20, 30]))(data)
    want = (pixels[:, :, ::-1].astype(np.float64) - [10, 20, 30]).astype(np.float16)
    np.testing.assert_array_equal(bgr, want)
    raw, _ = Preprocessor(ImagePreprocess(dtype="UINT8"))(data)
    np.testing.assert_array_equal(raw, pixels.transpose(2, 0, 1))
    with pytest.raises(ValidationError, match="UINT8 passes raw pixels"):
        ImagePreprocess(dtype="UINT8", std=[2.0])


@pytest.mark.parametrize("fmt,kwargs,lossless", [
    ("PNG", {}, True), ("BMP", {}, True), ("WEBP", {"lossless": True}, True),
    ("JPEG", {"quality": 95}, False), ("WEBP", {"quality": 90}, False),
])
def test_formats_decode_to_the_photo(photos, fmt, kwargs, lossless):
    pixels = photos["astronaut"]
    image = decode(encode(pixels, fmt, **kwargs), ImagePreprocess())
    decoded = np.asarray(image)
    assert image.mode == "RGB" and decoded.shape == pixels.shape
    if lossless:
        np.testing.assert_array_equal(decoded, pixels)
    else:
        assert np.abs(decoded.astype(int) - pixels).mean() < 4


def test_gif_first_frame_and_grey_digits():
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:3] * 255 / 16).round().astype(np.uint8)  # 8x8, 0..16 -> 0..255
    frames = [Image.fromarray(d).convert("P") for d in digits]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(decode(buf.getvalue(), ImagePreprocess(color="L")))
    np.testing.assert_array_equal(first, np.asarray(frames[0].convert("L")))

    pre = Preprocessor(ImagePreprocess(color="L", resize=[32, 32], interpolation="nearest", mean=[0.5], std=[0.5]))
    batch, _ = pre.batch([encode(d, "PNG") for d in digits])
    assert batch.shape == (3, 1, 32, 32)
    want = np.repeat(np.repeat(digits, 4, axis=1), 4, axis=2)  # nearest x4 = each pixel a 4x4 block
    np.testing.assert_array_equal(batch[:, 0], ((want / 255 - 0.5) / 0.5).astype(np.float32))


def test_exif_orientation_is_honoured(photos):
    pixels = photos["chelsea"]  # stored 300 x 451
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the same decoder, no rotation
    upright = np.asarray(decode(data, ImagePreprocess()))
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))  # k=-1: clockwise
    array, meta = Preprocessor(ImagePreprocess(dtype="UINT8", layout="NHWC"))(data)
    np.testing.assert_array_equal(array, upright)
    assert (meta.height, meta.width) == (451, 300)
    # resized in stored orientation, then rotated: same as rotate-then-resize
    small, meta = Preprocessor(ImagePreprocess(resize=150, dtype="UINT8", layout="NHWC"))(data)
    assert small.shape == (226, 150, 3) and (meta.height, meta.width) == (451, 300)
    want = np.asarray(Image.fromarray(upright).resize((150, 226), Image.Resampling.BILINEAR), np.int16)
    assert np.abs(small.astype(np.int16) - want).max() <= 1


def test_png_exif_and_sixteen_bit_grey(photos):
    pixels = photos["chelsea"]
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 counter-clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif)
    array, meta = Preprocessor(ImagePreprocess(dtype="UINT8", layout="NHWC"))(buf.getvalue())
    np.testing.assert_array_equal(array, np.rot90(pixels, k=1))
    assert (meta.height, meta.width) == (451, 300)
    grey16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    array, _ = Preprocessor(ImagePreprocess(color="L", dtype="UINT8"))(encode(grey16, "PNG"))
    np.testing.assert_array_equal(array[0], grey16 >> 8)  # scaled to 8 bits, not clipped at 255


def test_jpeg_draft_fast_path_matches_full_decode(photos):
    big = np.asarray(Image.fromarray(photos["astronaut"]).resize((2048, 1536)))
    data = encode(big, "JPEG", quality=95)
    pre = Preprocessor(ImagePreprocess(resize=[224, 224], interpolation="area", dtype="UINT8", layout="NHWC"))
    start = time.perf_counter()
    fast, meta = pre(data)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BOX))
    full_s = time.perf_counter() - start
    print(f"\n224x224 from a 2048x1536 JPEG: draft path {fast_s * 1e3:.1f} ms, full decode {full_s * 1e3:.1f} ms")
    assert (meta.height, meta.width, meta.scale_x, meta.scale_y) == (1536, 2048, 224 / 2048, 224 / 1536)
    assert np.abs(fast.astype(int) - full).mean() < 2.5


@pytest.mark.parametrize("size,interpolation,max_diff", [
    ((500, 375), "bilinear", 1), ((500, 375), "bicubic", 1), ((224, 224), "bilinear", 1),
    ((1024, 768), "bilinear", 16),  # drafted: libjpeg's DCT scaling, not the resampling filter
])
def test_fast_decode_is_opt_in_and_close_to_exact(photos, size, interpolation, max_diff):
    data = encode(np.asarray(Image.fromarray(photos["coffee"]).resize(size, Image.Resampling.LANCZOS)), "JPEG",
                  quality=90)
    spec = dict(resize=256, center_crop=[224, 224], interpolation=interpolation, dtype="UINT8", layout="NHWC")
    assert ImagePreprocess(**spec).fast_decode is False
    exact, meta = Preprocessor(ImagePreprocess(**spec))(data)
    fast, fast_meta = Preprocessor(ImagePreprocess(**spec, fast_decode=True))(data)
    assert fast_meta == meta and fast.shape == exact.shape == (224, 224, 3)
    diff = np.abs(fast.astype(int) - exact)
    assert diff.max() <= max_diff and diff.mean() < 0.6
    # the default stays bit-exact: Pillow's resize of the whole image, then the crop
    w, h = size
    nw, nh = (round(w * 256 / h), 256) if h <= w else (256, round(h * 256 / w))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((nw, nh), getattr(
        Image.Resampling, interpolation.upper())))
    np.testing.assert_array_equal(exact, full[(nh - 224) // 2:(nh - 224) // 2 + 224, (nw - 224) // 2:(nw - 224) // 2 + 224])
    if max_diff == 1:  # no draft: EXIF-rotated images take the exact resize either way
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, format="JPEG", quality=90, exif=exif)
        rotated = buf.getvalue()
        np.testing.assert_array_equal(Preprocessor(ImagePreprocess(**spec, fast_decode=True))(rotated)[0],
                                      Preprocessor(ImagePreprocess(**spec))(rotated)[0])


def red_square(h: int, w: int, box) -> bytes:
    pixels = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = (255, 0, 0)
    return encode(pixels, "PNG")


def red_extent(hwc: np.ndarray) -> list[int]:
    ys, xs = np.nonzero((hwc[:, :, 0] > 128) & (hwc[:, :, 1] < 100))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("spec", [
    ImagePreprocess(resize=[320, 320], resize_mode="letterbox", dtype="UINT8", layout="NHWC", interpolation="nearest"),
    ImagePreprocess(resize=[256, 192], resize_mode="letterbox", dtype="UINT8", layout="NHWC", interpolation="nearest"),
    ImagePreprocess(resize=200, center_crop=[180, 180], dtype="UINT8", layout="NHWC", interpolation="nearest"),
])
def test_meta_maps_model_boxes_back_to_the_original(spec):
    box = [120, 40, 260, 210]
    array, meta = Preprocessor(spec)(red_square(300, 451, box))  # chelsea's size
    found = red_extent(array)  # where the square landed in the model input
    np.testing.assert_allclose(meta.to_original(np.array(found, float)), box, atol=2.5)
    np.testing.assert_allclose(meta.to_input(box), found, atol=1.5)
    if spec.resize_mode == "letterbox":  # padding is pad_value, the image keeps its aspect
        assert array[0, 0].tolist() == [114] * 3 or array[-1, -1].tolist() == [114] * 3
        assert meta.scale_x == pytest.approx(meta.scale_y, rel=0.01)


def test_mixed_sizes_batch_to_one_shape(photos):
    pre = Preprocessor(ImagePreprocess(resize=[256, 256], resize_mode="letterbox", mean=MEAN, std=STD))
    images = [encode(photos["astronaut"], "PNG"), encode(photos["chelsea"], "JPEG"),
              encode(photos["coffee"], "WEBP"), encode(photos["chelsea"][:50, :300], "BMP")]
    start = time.perf_counter()
    batch, metas = pre.batch(images)
    serial_s = time.perf_counter() - start
    assert batch.shape == (4, 3, 256, 256) and len(metas) == 4
    assert [(m.height, m.width) for m in metas] == [(512, 512), (300, 451), (400, 600), (50, 300)]
    start = time.perf_counter()
    again, metas2 = asyncio.run(preprocess_many(pre, np.array(images, dtype=object)))
    print(f"\n4 mixed images: batch {serial_s * 1e3:.1f} ms, preprocess_many {(time.perf_counter() - start) * 1e3:.1f} ms")
    np.testing.assert_array_equal(again, batch)
    assert metas2 == metas
    # without a fixed size the shapes differ and batching says how to fix it
    with pytest.raises(InvalidInput, match="set resize to"):
        Preprocessor(ImagePreprocess(resize=64)).batch(images[:2])


# -- bad bytes ------------------------------------------------------------------------------------

def test_bad_bytes_raise_image_error_naming_the_image(photos):
    pre = Preprocessor(ImagePreprocess(resize=[64, 64]))
    good = encode(photos["chelsea"], "JPEG")
    png = encode(photos["chelsea"], "PNG")
    corrupt = bytearray(png)
    corrupt[1000:1064] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()  # in IDAT
    cases = {
        b"": "image 1: empty",
        b"hello, not an image": "image 1: cannot identify image format (got 19 bytes starting b'hello, n'",
        good[: len(good) // 2]: "image 1: truncated JPEG",
        png[: len(png) // 2]: "image 1: truncated PNG",
        bytes(corrupt): "image 1: corrupt PNG",
        good[:10]: "image 1: truncated JPEG header",
    }
    for data, message in cases.items():
        with pytest.raises(ImageError) as info:
            pre.batch([good, data])
        assert info.value.message.startswith(message), info.value.message
        assert info.value.http_status == 400
    with pytest.raises(ImageError, match="expected encoded image bytes, got str"):
        pre("a string", 0)
    tiff = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(tiff, format="TIFF")
    with pytest.raises(ImageError, match="accepted: JPEG, PNG, WEBP, BMP, GIF"):
        pre(tiff.getvalue(), 0)


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (with a valid CRC)."""
    data = bytearray(encode(np.zeros((1, 1), np.uint8), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bombs_are_refused_before_decoding(monkeypatch):
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG", optimize=True)  # 64 Mpx, a few KiB
    real_bomb = bomb.getvalue()
    assert len(real_bomb) < 20_000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    pre = Preprocessor(ImagePreprocess(resize=[64, 64]))
    with pytest.raises(ImageTooLarge, match="image 0: 8000x8000 = 64000000 pixels exceeds max_pixels 40000000"):
        pre.batch([real_bomb])
    for data in (png_declaring(30000, 30000), png_declaring(70000, 1000)):
        with pytest.raises(ImageTooLarge) as info:
            pre(data, 3)
        assert info.value.message.startswith("image 3:") and isinstance(info.value, PayloadTooLarge)
        assert info.value.http_status == 413
    with pytest.raises(ImageTooLarge, match="exceeds max_bytes 100"):
        Preprocessor(ImagePreprocess(max_bytes=100))(real_bomb, 0)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard stays on


# -- postprocessing -------------------------------------------------------------------------------

def test_classification_top_k_matches_argsort(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 10)).astype(np.float32)
    (tmp_path / "labels.txt").write_text("\n".join(f"class-{i}" for i in range(10)) + "\n\n")
    labels = load_labels("labels.txt", tmp_path)
    assert labels[:2] == ["class-0", "class-1"] and len(labels) == 10
    post = Postprocessor(Postprocess(kind="classification", softmax=True, top_k=3, labels="labels.txt"), labels)
    results = post({"logits": logits}, None)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1)[:, :3]
    for r, want, p in zip(results, order, probs):
        assert r["classes"] == want.tolist()
        assert r["labels"] == [f"class-{i}" for i in want]
        np.testing.assert_allclose(r["scores"], p[want], rtol=1e-5)
    tensors = post.to_tensors(results)
    assert tensors["labels"].shape == (4, 3) and tensors["labels"][0, 0] == f"class-{order[0, 0]}".encode()
    assert tensors["scores"].dtype == np.float32 and tensors["classes"].tolist() == order.tolist()
    # no labels: the class index is the label; raw scores when softmax is off
    raw = Postprocessor(Postprocess(kind="classification", top_k=2))({"y": logits[:1]})
    assert raw[0]["labels"] == [str(c) for c in raw[0]["classes"]]
    assert raw[0]["scores"][0] == pytest.approx(float(logits[0].max()))


def test_nms_is_class_wise():
    boxes = np.array([
        [0, 0, 10, 10],      # 0: best of class 0
        [1, 1, 11, 11],      # 1: IoU 0.68 with 0, same class -> suppressed
        [1, 1, 11, 11],      # 2: same place, class 1 -> kept
        [20, 20, 30, 30],    # 3: alone -> kept
        [0, 0, 10, 5],       # 4: IoU 0.5 with 0 -> suppressed at 0.45, kept at 0.55
    ], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    classes = np.array([0, 0, 1, 0, 0])
    assert box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 119)
    assert nms(boxes, scores, 0.45, classes).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.55, classes).tolist() == [0, 2, 3, 4]
    assert nms(boxes, scores, 0.45).tolist() == [0, 3]  # class-agnostic: 2 goes too
    assert nms(boxes, scores, 0.45, classes, max_detections=2).tolist() == [0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5, np.zeros(0)).tolist() == []


def letterbox_meta() -> ImageMeta:
    # a 300 x 451 image letterboxed into 320 x 320: 213 x 320 pixels, 53 rows of padding on top
    s = 320 / 451
    return ImageMeta(300, 451, 320, 320, 213 / 300, s, 53.0, 0.0)


def test_yolo_output_equals_split_outputs_and_maps_to_original():
    meta = letterbox_meta()
    labels = ["cat", "dog", "bird"]
    # three candidates in model-input pixels, cx cy w h; 0 and 1 overlap (same class), 2 is another class on top of 0
    cxcywh = np.array([[100, 150, 80, 60], [104, 152, 80, 60], [100, 150, 80, 60], [300, 300, 40, 40]], np.float32)
    cls = np.array([[0.9, 0.05, 0.0], [0.8, 0.1, 0.0], [0.1, 0.0, 0.7], [0.1, 0.1, 0.1]], np.float32)
    yolo = np.concatenate([cxcywh, cls], axis=1)[None]  # [1, K, 4+C]
    common = {"kind": "detection", "box_format": "cxcywh", "score_threshold": 0.3, "iou_threshold": 0.5}
    from_yolo = Postprocessor(Postprocess(**common), labels)({"output0": yolo}, [meta])
    from_yolo_t = Postprocessor(Postprocess(**common), labels)({"output0": yolo.transpose(0, 2, 1)}, [meta])
    split = Postprocessor(Postprocess(boxes="b", scores="s", **common), labels)(
        {"b": cxcywh[None], "s": cls[None]}, [meta])
    normalized = Postprocessor(Postprocess(boxes="b", scores="s", normalized=True, **common), labels)(
        {"b": cxcywh[None] / 320, "s": cls[None]}, [meta])
    assert from_yolo == from_yolo_t == split
    dets = from_yolo[0]["detections"]
    assert [(d["label"], d["class"]) for d in dets] == [("cat", 0), ("bird", 2)]
    assert dets[0]["score"] == pytest.approx(0.9)
    want = meta.to_original(np.array([[60, 120, 140, 180]], float))[0]
    np.testing.assert_allclose(dets[0]["box"], want)
    np.testing.assert_allclose(dets[0]["box"], [60 * 451 / 320, (120 - 53) * 300 / 213,
                                                140 * 451 / 320, (180 - 53) * 300 / 213])
    for a, b in zip(dets, normalized[0]["detections"]):
        np.testing.assert_allclose(a["box"], b["box"], rtol=1e-5)
    # YOLOv5 objectness column: score = objectness * class score
    v5 = np.concatenate([cxcywh, np.full((4, 1), 0.5, np.float32), cls], axis=1)[None]
    dets5 = Postprocessor(Postprocess(objectness=True, **common), labels)({"o": v5}, [meta])[0]["detections"]
    assert [round(d["score"], 3) for d in dets5] == [0.45, 0.35]


def test_detection_clipping_padding_tensors_and_errors():
    meta = letterbox_meta()
    boxes = np.array([[[-20, 40, 100, 100], [10, 0, 60, 40], [0, 0, 0, 0]], [[0, 60, 320, 260], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.0], [0.95, 0.0, 0.0]], np.float32)
    classes = np.array([[1, 0, 0], [3, 0, 0]], np.int64)
    post = Postprocessor(Postprocess(kind="detection", boxes="boxes", scores="scores", classes="classes"), ["a", "b"])
    results = post({"boxes": boxes, "scores": scores, "classes": classes}, [meta, meta])
    first = results[0]["detections"]
    assert len(first) == 1  # the second box lies wholly in the top padding (y < 53)
    assert first[0]["box"][0] == 0.0 and first[0]["label"] == "b"  # clipped at the left edge
    assert results[1]["detections"][0]["label"] == "3"  # no label for class 3: its index
    np.testing.assert_allclose(results[1]["detections"][0]["box"], [0, 7 * 300 / 213, 451, 207 * 300 / 213])
    t = post.to_tensors(results)
    assert t["boxes"].shape == (2, 1, 4) and t["num_detections"].tolist() == [[1], [1]]
    empty = post({"boxes": boxes, "scores": scores * 0, "classes": classes}, [meta, meta])
    t = post.to_tensors(empty)
    assert t["boxes"].shape == (2, 0, 4) and t["num_detections"].tolist() == [[0], [0]]
    with pytest.raises(PostprocessError, match="no output 'classes'"):
        post({"boxes": boxes, "scores": scores}, [meta, meta])
    with pytest.raises(ValidationError, match="both boxes and scores"):
        Postprocess(kind="detection", boxes="b")
    with pytest.raises(ValidationError, match="only for kind detection"):
        Postprocess(kind="classification", iou_threshold=0.3)


def test_segmentation_mask_back_to_original_and_png_round_trip(photos):
    pre = Preprocessor(ImagePreprocess(resize=[128, 128], resize_mode="letterbox"))
    _, meta = pre(encode(photos["coffee"], "PNG"))  # 400 x 600 -> 85 x 128 at rows 21..106
    # a "model" that labels the left half of the picture 1 and a block 2, at half resolution
    logits = np.zeros((1, 3, 64, 64), np.float32)
    logits[0, 0] = 1
    logits[0, 1, :, :32] = 2
    logits[0, 2, 20:30, 40:50] = 3
    post = Postprocessor(Postprocess(kind="segmentation"), ["background", "left", "block"])
    (result,) = post({"out": logits}, [meta])
    mask = png_to_mask(result["mask_png"])
    assert result["shape"] == [400, 600] and mask.shape == (400, 600) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, result.mask)
    assert set(np.unique(mask)) == {0, 1, 2}
    assert (mask[:, :290] == 1).all() and (mask[:, 310:][mask[:, 310:] != 2] == 0).all()
    # the block: mask rows 20..30, cols 40..50 = model-input box (80, 40)-(100, 60)
    assert (meta.offset_y, meta.scale_y) == (21.0, 85 / 400)
    ys, xs = np.nonzero(mask == 2)
    want = [80 * 600 / 128, (40 - 21) * 400 / 85, 100 * 600 / 128, (60 - 21) * 400 / 85]
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], want, atol=1.5)
    assert result["classes_present"] == {"background": int((mask == 0).sum()), "left": int((mask == 1).sum()),
                                         "block": int((mask == 2).sum())}
    tensors = post.to_tensors([result, dict(result)])  # a plain dict falls back to the PNG
    assert tensors["mask"].shape == (2, 400, 600) and tensors["mask"].dtype == np.uint8
    # already argmaxed [N,H,W] with many classes: 16-bit PNG, INT32 tensors; sizes differ -> no tensor
    wide = Postprocessor(Postprocess(kind="segmentation"))
    other = ImageMeta(10, 20, 10, 20, 1.0, 1.0, 0.0, 0.0)
    ids = np.arange(200, dtype=np.int64).reshape(1, 10, 20) * 2
    (r,) = wide({"ids": ids}, [other])
    np.testing.assert_array_equal(png_to_mask(r["mask_png"]), ids[0])
    assert wide.to_tensors([r])["mask"].dtype == np.int32
    _, small = pre(encode(photos["chelsea"], "PNG"))
    assert "mask" not in post.to_tensors(post({"out": np.repeat(logits, 2, 0)}, [meta, small]))
    no_png = Postprocessor(Postprocess(kind="segmentation", png=False))({"out": logits}, [meta])[0]
    assert "mask_png" not in no_png  # the mask then travels only as a tensor
