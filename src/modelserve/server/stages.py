"""Per-request stages: work a model version does for each request outside the batch.

The batcher works on model tensors; some work belongs to one request and must not wait in the
batch queue: a user model's ``preprocess`` / ``postprocess``, image decoding and resizing before a
vision model, top-k or NMS after it. A ``RequestStage`` carries that work:

    client inputs ──check──► before() ──► batcher / runtime ──► after() ──► client outputs
                             (thread)      (batched)             (thread)

``before`` returns the model inputs and a ``state`` that ``after`` gets back for the same request
(original image sizes, a crop's offset, ...). Both run in a worker thread from a shared pool, never
on the event loop. A stage may declare the client-facing ``inputs``/``outputs``: the server then
shows and validates those (metadata, config, input checks) instead of the model's own. A version
with no stage takes none of this path: the dataplane queues its requests directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelserve.errors import ModelServeError
from modelserve.runtime import Runtime
from modelserve.server.config import ModelConfig, TensorConfig
from modelserve.server.stats import POSTPROCESS, PREPROCESS

if TYPE_CHECKING:
    from modelserve.server.models import ModelVersion

log = logging.getLogger(__name__)


class RequestStage:
    """Override ``before`` and/or ``after``; set ``inputs``/``outputs`` when clients send or receive
    other tensors than the model's (e.g. encoded images in, labels out)."""

    #: client-facing inputs/outputs (dims without the batch dim when max_batch_size > 0); None = the model's
    inputs: list[TensorConfig] | None = None
    outputs: list[TensorConfig] | None = None

    def before(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Any]:
        """One request's validated client inputs -> (model inputs, state kept for ``after``).
        With batching, the model inputs' first dimension is the number of rows this request queues."""
        return inputs, None

    def after(self, outputs: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        """This request's slice of the model outputs (and ``before``'s state) -> the client outputs."""
        return outputs


class HookStage(RequestStage):
    """A runtime's own per-request hooks (a Python model's ``preprocess`` / ``postprocess``)."""

    def __init__(self, pre: Callable | None, post: Callable | None):
        self._pre, self._post = pre, post

    def before(self, inputs):
        if self._pre is None:
            return inputs, None
        result = self._pre(inputs)
        if not isinstance(result, dict):
            raise ModelServeError(f"preprocess returned {type(result).__name__}, expected a dict of arrays")
        return {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in result.items()}, None

    def after(self, outputs, state):
        return outputs if self._post is None else self._post(outputs)


def stage_for(config: ModelConfig, runtimes: list[Runtime]) -> RequestStage | None:
    """The stage a new model version carries, if any. Config-driven stages (vision pre/post
    processing) plug in here."""
    if config.preprocess is not None or config.postprocess is not None:
        from modelserve.server.vision_stage import VisionStage

        version_dir = Path(runtimes[0].model_file).parent  # labels files live beside the model or above it
        return VisionStage(config, [version_dir, version_dir.parent])
    pre, post = runtimes[0].request_hooks()
    if pre is None and post is None:
        return None
    return HookStage(pre, post)


def client_config(config: ModelConfig, stage: RequestStage) -> ModelConfig:
    """The config clients see: the stage's tensors in place of the model's, where it declares them."""
    update = {}
    if stage.inputs is not None:
        update["inputs"] = list(stage.inputs)
    if stage.outputs is not None:
        update["outputs"] = list(stage.outputs)
    return config.model_copy(update=update) if update else config


_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """Threads shared by every stage: created once, bounded, separate from model loading's threads
    (asyncio's default executor) so that a slow load never delays requests."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="stage")
    return _pool


def _call(label: str, what: str, fn: Callable, *args):
    try:
        return fn(*args)
    except ModelServeError:  # chosen by the stage (InvalidInput for a bad image...): passed on as is
        raise
    except Exception as exc:
        from modelserve.runtime.python import user_error

        log.exception("model '%s': %s failed", label, what)
        raise ModelServeError(f"model '{label}': {what} raised {user_error(exc)}") from None


def _timed(label: str, what: str, fn: Callable, *args):
    """``_call`` and how long it took, timed in the worker thread (the event loop records it)."""
    started = time.perf_counter_ns()
    return _call(label, what, fn, *args), time.perf_counter_ns() - started


async def infer_staged(mv: ModelVersion, inputs: dict[str, np.ndarray], wanted: list[str] | None) -> dict[str, np.ndarray]:
    """``before`` in a thread, the batcher, ``after`` in a thread; then only the outputs asked for."""
    stage = mv.stage
    label = f"{mv.name}:{mv.version}"
    loop = asyncio.get_running_loop()
    (model_inputs, state), pre_ns = await loop.run_in_executor(pool(), _timed, label, "preprocess", stage.before, inputs)
    mv.stats.stage_done(PREPROCESS, pre_ns)
    rows = batch_rows(model_inputs, mv.config.max_batch_size, label)
    results = await mv.infer(model_inputs, None, rows)
    outputs, post_ns = await loop.run_in_executor(pool(), _timed, label, "postprocess", stage.after, results, state)
    mv.stats.stage_done(POSTPROCESS, post_ns)
    names = wanted or [t.name for t in mv.config.outputs]
    try:
        return {name: outputs[name] for name in names}
    except KeyError as exc:
        raise ModelServeError(f"model '{label}': postprocess gave no output {exc} "
                              f"(it gave {sorted(outputs)})") from None


def batch_rows(inputs: dict[str, np.ndarray], max_batch_size: int | None, label: str) -> int:
    """How many rows a request queues after ``before``, which may change it (one image -> many crops)."""
    if not max_batch_size:
        return 1
    rows = None
    for name, array in inputs.items():
        if not isinstance(array, np.ndarray) or array.ndim == 0 or (rows is not None and array.shape[0] != rows):
            raise ModelServeError(f"model '{label}': preprocess output '{name}' has shape {list(np.shape(array))}; "
                                  "every model input needs the same first (batch) dimension")
        rows = array.shape[0]
    return 1 if rows is None else rows  # 0 is fair: a detector may find nothing to crop
