"""HTTP routes of the monitor: feedback, quality, drift, and the payload log read back.

- ``POST /v2/models/{m}/feedback``: ``{"request_id": "...", "ground_truth": <class | label | number | list>}``
  or ``{"items": [...]}``; joined with the logged prediction (memory first, then the database);
  404 unknown request id, 409 feedback already given;
- ``GET /v2/models/{m}/quality`` and ``GET /v2/quality``: sliding-window metrics per version;
- ``GET /v2/logs?model=&version=&status=&since=&request_id=&limit=``: stored payload-log rows;
- ``POST /v2/logs/flush``: wait until what was logged so far is in the database (tests, before an export);
- ``GET /v2/logs/status``: the writer's counters (buffered, spilled, replayed, written, database error).
- ``GET /v2/models/{m}/drift`` and ``GET /v2/drift``: input drift per version (reference, window, score,
  alert, per-feature PSI/KS; see ``modelserve.monitor.drift``); ``POST /v2/models/{m}/drift/reset
  [?version=]``: the next logged requests become the new reference.

None of this is on the inference path; database calls, and calls into the payload log's writer process
(quality, drift, status), run in threads.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from modelserve.errors import Conflict, InvalidInput, ModelNotFound, ModelNotReady, ModelServeError
from modelserve.monitor import query
from modelserve.server.dataplane import Dataplane
from modelserve.server.rest import json_object, json_response, read_body

MAX_ITEMS = 10_000


def monitor_router(dataplane: Dataplane, max_request_bytes: int) -> APIRouter:
    router = APIRouter(tags=["monitor"])

    def payload_log():
        if dataplane.payload_log is None:
            raise ModelNotReady("the payload log is off on this server (started with --no-payload-log)")
        return dataplane.payload_log

    async def one(model: str, item) -> dict:
        plog = payload_log()
        if not isinstance(item, dict):
            raise InvalidInput("each feedback item must be an object with request_id and ground_truth")
        request_id, truth = item.get("request_id"), item.get("ground_truth")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidInput("feedback needs a 'request_id' (the x-request-id the inference answered with)")
        if "ground_truth" not in item or truth is None:
            raise InvalidInput("feedback needs a 'ground_truth'")
        found = await asyncio.to_thread(plog.quality.lookup, request_id)
        if found is None:  # answered a moment ago: the writer may not have seen it yet
            await plog.sync()
            found = await asyncio.to_thread(plog.quality.lookup, request_id)
        if found is None:
            row = await asyncio.to_thread(query.find_prediction, plog.engine, request_id)
            if row is None:
                raise ModelNotFound(f"no logged request with id '{request_id}'")
            if row[2] is None:
                raise ModelNotFound(f"request '{request_id}' has no prediction to score "
                                    f"(status {row[3]}, or outputs that are neither a class nor a value)")
            found = row[:3]
        logged_model, version, prediction = found
        if logged_model != model:
            raise ModelNotFound(f"request '{request_id}' went to model '{logged_model}', not '{model}'")
        if await asyncio.to_thread(plog.quality.given, request_id):
            raise Conflict(f"request '{request_id}' has feedback already")
        try:
            exists = await asyncio.to_thread(query.feedback_exists, plog.engine, request_id)
        except ModelServeError:  # database down: the in-memory check above is what we have
            exists = False
        if exists:
            raise Conflict(f"request '{request_id}' has feedback already")
        # Conflict if raced
        scored = await asyncio.to_thread(plog.quality.add, request_id, logged_model, version, prediction, truth)
        plog.feedback({"request_id": request_id, "model": logged_model, "version": version, "ground_truth": truth,
                       "prediction": prediction, "samples": scored["samples"], "correct": scored["correct"],
                       "abs_error": scored["abs_error"], "sq_error": scored["sq_error"]})
        answer = {"request_id": request_id, "model": logged_model, "version": version,
                  "prediction": prediction.get("labels") if isinstance(truth, str) and "labels" in prediction
                  else prediction["values"], "samples": scored["samples"]}
        answer.update({"correct": scored["correct"]} if scored["correct"] is not None
                      else {"abs_error": scored["abs_error"]})
        return answer

    @router.post("/v2/models/{model}/feedback", summary="Ground truth for a logged request")
    async def feedback(request: Request, model: str):
        doc = json_object(await read_body(request.headers, request.stream(), max_request_bytes))
        if "items" not in doc:
            return json_response(await one(model, doc))
        items = doc["items"]
        if not isinstance(items, list) or len(items) > MAX_ITEMS:
            raise InvalidInput(f"'items' must be an array of at most {MAX_ITEMS} feedback objects")
        results = []
        for item in items:
            try:
                results.append({"status": 200, **await one(model, item)})
            except ModelServeError as exc:
                rid = item.get("request_id") if isinstance(item, dict) else None
                results.append({"request_id": rid, "status": exc.http_status, "error": exc.message})
        return json_response({"results": results, "accepted": sum(r["status"] == 200 for r in results)})

    def known(model: str, versions: dict) -> dict:
        """A model served now, or one with numbers from before it was unloaded; else 404."""
        if not versions and model not in dataplane.manager.models:
            raise ModelNotFound(f"Request for unknown model: '{model}' is not served and has no monitoring data")
        return {"model": model, "versions": versions}

    @router.get("/v2/models/{model}/quality", summary="Quality metrics per version over the feedback window")
    async def model_quality(model: str):
        versions = (await asyncio.to_thread(payload_log().quality.snapshot, model)).get(model, {})
        return json_response(known(model, versions))

    @router.get("/v2/quality", summary="Quality metrics of every model with feedback")
    async def quality():
        return json_response({"models": await asyncio.to_thread(payload_log().quality.snapshot)})

    @router.get("/v2/logs", summary="Payload-log rows, newest first")
    async def logs(model: str | None = None, version: str | None = None, status: str | None = None,
                   since: str | None = None, request_id: str | None = None, limit: int = 100):
        plog = payload_log()
        if not 1 <= limit <= MAX_ITEMS:
            raise InvalidInput(f"limit must be 1..{MAX_ITEMS}")
        rows = await asyncio.to_thread(query.query_rows, plog.engine, model, version, status,
                                       query.parse_since(since), limit, request_id)
        return json_response({"rows": rows})

    @router.post("/v2/logs/flush", summary="Wait until what was logged so far is in the database")
    async def flush(timeout_s: float = 10.0):
        result = await payload_log().flush(min(max(timeout_s, 0.0), 60.0))
        return json_response(result, 200 if result["flushed"] else 503)

    @router.get("/v2/logs/status", summary="The payload-log writer's counters")
    async def status():
        return json_response(await asyncio.to_thread(payload_log().status))

    @router.get("/v2/models/{model}/drift", summary="Input drift per version: PSI/KS against the reference")
    async def model_drift(model: str):
        drift = payload_log().drift
        versions = (await asyncio.to_thread(drift.snapshot, model)).get(model, {})
        return json_response(known(model, versions))

    @router.get("/v2/drift", summary="Input drift of every model with logged requests")
    async def all_drift():
        return json_response({"models": await asyncio.to_thread(payload_log().drift.snapshot)})

    @router.post("/v2/models/{model}/drift/reset", summary="Start a new drift reference from the next requests")
    async def drift_reset(model: str, version: str | None = None):
        reset = await asyncio.to_thread(payload_log().drift.reset, model, version)
        known(model, dict.fromkeys(reset))
        return json_response({"model": model, "reset": reset})

    return router
