"""The image-friendly route: ``POST /models/{m}/predict`` with a raw image body or multipart files,
answering JSON with labels and scores, boxes, or masks.

It is an adapter like the others: each uploaded image becomes one V2 request (a BYTES ``image``
row) through the same dataplane, so the model's config-declared preprocessing, batching, canary
split and statistics apply unchanged; the requests of one upload run concurrently and the dynamic
batcher merges them. ``/v2/models/{m}/infer`` stays pure V2.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from modelserve.errors import InvalidInput
from modelserve.server.dataplane import Dataplane, InferRequest, new_request_id
from modelserve.server.rest import peer, json_response, read_body
from modelserve.vision import mask_to_png

MAX_FILES = 64

_BODY = {"requestBody": {"required": True, "content": {
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {
        "type": "string", "format": "binary"}}}}}}


def image_router(dataplane: Dataplane, max_request_bytes: int) -> APIRouter:
    router = APIRouter(tags=["images"])

    async def predict(request: Request, model: str, version: str | None):
        image_input(dataplane, model, version)  # 404/503 (or 400: no preprocess) before reading an upload
        body = await read_body(request.headers, request.stream(), max_request_bytes)
        images = await _images(request, body)
        request_id = request.headers.get("x-request-id") or new_request_id()
        return json_response(await predict_images(
            dataplane, model, version, images, headers=request.scope["headers"], protocol="image-rest",
            client=peer(request.scope), request_id=request_id), headers={"x-request-id": request_id})

    @router.post("/models/{model}/predict", summary="Predict from image files (raw body or multipart)",
                 openapi_extra=_BODY)
    async def predict_latest(request: Request, model: str):
        return await predict(request, model, None)

    @router.post("/models/{model}/versions/{version}/predict", summary="Predict with one version",
                 openapi_extra=_BODY)
    async def predict_version(request: Request, model: str, version: int):
        return await predict(request, model, str(version))

    return router


def image_input(dataplane: Dataplane, model: str, version: str | None) -> str:
    """The BYTES input ``model`` takes encoded images in; raises when the model is unknown, not ready,
    or declares no image preprocessing."""
    pre = dataplane.manager.get(model, version).config.preprocess
    if pre is None:
        raise InvalidInput(f"model '{model}' declares no image preprocessing (preprocess: in its config); "
                           f"send tensors to /v2/models/{model}/infer instead")
    return pre.input


async def predict_images(dataplane: Dataplane, model: str, version: str | None, images: list[bytes],
                         **request_fields) -> dict:
    """Encoded images through ``model``, one V2 request each (run concurrently, so the batcher merges
    them) -> the route's JSON answer ``{"model_name", "model_version", "predictions": [one per image]}``.
    ``request_fields``: more ``InferRequest`` fields (headers, ...). Shared by the route and in-process
    callers (``modelserve predict --repository``)."""
    name = image_input(dataplane, model, version)
    requests = [InferRequest(model, version, {name: np.array([[image]], dtype=object)}, **request_fields)
                for image in images]
    if len(requests) > 1 and request_fields.get("request_id"):  # one upload, many images: <id>-0, <id>-1, ...
        for i, r in enumerate(requests):
            r.request_id = f"{r.request_id}-{i}"
    responses = []
    for start in range(0, len(requests), MAX_FILES):
        responses += await asyncio.gather(*(dataplane.infer(r) for r in requests[start:start + MAX_FILES]))
    return {"model_name": model, "model_version": responses[0].version if responses else None,
            "predictions": [_answer(r.outputs) for r in responses]}


async def _images(request: Request, body: bytes) -> list[bytes]:
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        if not body:
            raise InvalidInput("empty body: send an image file (e.g. curl --data-binary @cat.jpg) or multipart files")
        return [body]

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=MAX_FILES * 4, max_fields=MAX_FILES).parse()
    except MultiPartException as exc:
        raise InvalidInput(f"malformed multipart body: {exc.message}") from None
    files = [await value.read() for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise InvalidInput("the multipart body has no files: send them as e.g. curl -F image=@cat.jpg")
    return files


def _answer(outputs: dict[str, np.ndarray]) -> dict:
    """One image's output tensors (rows of one) as JSON: the shape follows the postprocess kind."""
    if "mask" in outputs:
        mask = outputs["mask"][0]
        counts = np.bincount(mask.ravel().astype(np.int64))
        return {"shape": list(mask.shape), "mask_png": mask_to_png(mask),
                "classes_present": {str(c): int(n) for c, n in enumerate(counts) if n}}
    if "boxes" in outputs:
        n = int(outputs["num_detections"][0][0])
        return {"detections": [
            {"box": [round(float(v), 2) for v in outputs["boxes"][0][i]], "score": float(outputs["scores"][0][i]),
             "class": int(outputs["classes"][0][i]), "label": _text(outputs["labels"][0][i])} for i in range(n)]}
    if "labels" in outputs and "scores" in outputs:
        return {"labels": [_text(v) for v in outputs["labels"][0]],
                "scores": [float(v) for v in outputs["scores"][0]],
                "classes": [int(v) for v in outputs["classes"][0]]}
    return {name: array[0].tolist() if array.dtype != object else [_text(v) for v in array[0].ravel()]
            for name, array in outputs.items()}


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
