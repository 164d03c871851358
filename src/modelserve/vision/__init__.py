"""Images in, answers out: the vision work around a model, independent of any protocol.

Before the model (per request, in worker threads, before batching)::

    pre = Preprocessor(ImagePreprocess(resize=256, center_crop=(224, 224), mean=[...], std=[...]))
    array, metas = pre.batch([jpeg_bytes, png_bytes])      # [N, 3, 224, 224] float32
    array, metas = await preprocess_many(pre, images)       # the same, decoded concurrently

After the model::

    post = Postprocessor(Postprocess(kind="detection", box_format="cxcywh"), labels)
    results = post(outputs, metas)      # JSON-ready dicts, boxes in original-image pixels
    tensors = post.to_tensors(results)  # fixed-shape arrays for V2 / Triton clients

Bad bytes raise ``ImageError`` (400), oversized ones ``ImageTooLarge`` (413), each naming the
image; outputs that do not fit the declared postprocess raise ``PostprocessError`` (500).
"""

from modelserve.vision.config import ImagePreprocess, Postprocess
from modelserve.vision.decode import FORMATS, ImageError, ImageTooLarge, decode
from modelserve.vision.postprocess import (
    ImageResult,
    PostprocessError,
    Postprocessor,
    box_iou,
    load_labels,
    mask_to_png,
    nms,
    png_to_mask,
)
from modelserve.vision.preprocess import ImageMeta, Preprocessor, pool, preprocess_many

__all__ = [
    "FORMATS", "ImageError", "ImageMeta", "ImagePreprocess", "ImageResult", "ImageTooLarge",
    "Postprocess", "PostprocessError", "Postprocessor", "Preprocessor", "box_iou", "decode",
    "load_labels", "mask_to_png", "nms", "png_to_mask", "pool", "preprocess_many",
]
