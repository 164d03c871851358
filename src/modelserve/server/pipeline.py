"""Pipelines (Triton's ensembles): one request through several served models, tensors passed by name.

A ``backend: pipeline`` model has no file of its own: its config declares the client-facing
inputs/outputs and ``steps``, each naming a served model and how its tensors map onto the
pipeline's (``inputs: {step input: pipeline tensor}``, ``outputs: {step output: pipeline tensor}``)::

    name: classify
    backend: pipeline
    max_batch_size: 8
    inputs:  [{name: raw, datatype: FP32, dims: [16]}]
    outputs: [{name: label, datatype: BYTES, dims: [1]}]
    steps:
      - {model: normalize, inputs: {x: raw},    outputs: {y: normed}}
      - {model: mlp,       inputs: {x: normed}, outputs: {probs: probs}}
      - {model: labels,    inputs: {probs: probs}, outputs: {label: label}}

Each step is an in-memory ``Dataplane.infer`` on its model, so a step gets that model's
validation, stage, dynamic batching (with other pipelines' and direct clients' requests) and
statistics; arrays move between steps by reference, never re-encoded. The response carries each
step's latency in its ``pipeline_step_ms`` parameter (a JSON object, step -> milliseconds).
A pipeline loads after the models it names and refuses to load (with the step and model named)
while one is missing; pipelines do not nest.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from modelserve.errors import ModelLoadError, ModelServeError
from modelserve.server.config import ModelConfig
from modelserve.server.dataplane import InferRequest
from modelserve.server.models import READY, UNAVAILABLE, ModelVersion

if TYPE_CHECKING:
    from modelserve.server.dataplane import Dataplane
    from modelserve.server.models import ModelManager

log = logging.getLogger(__name__)

STEP_MS = "pipeline_step_ms"


class Pipeline:
    def __init__(self, config: ModelConfig):
        """Check what the config alone can tell: steps present, every tensor made before it is used."""
        self.name = config.name
        self.steps = list(config.steps)
        if not self.steps:
            raise ModelLoadError(f"pipeline '{self.name}' has no steps")
        if not config.inputs or not config.outputs:
            raise ModelLoadError(f"pipeline '{self.name}' needs its inputs and outputs declared in its config")
        available = {t.name for t in config.inputs}
        seen: dict[str, int] = {}
        self.labels: list[str] = []
        for i, step in enumerate(self.steps, 1):
            where = f"pipeline '{self.name}' step {i} (model '{step.model}')"
            if step.model == self.name:
                raise ModelLoadError(f"{where}: a pipeline cannot run itself")
            if not step.outputs:
                raise ModelLoadError(f"{where}: maps no outputs")
            for tensor in step.inputs.values():
                if tensor not in available:
                    raise ModelLoadError(f"{where}: input tensor '{tensor}' is neither a pipeline input "
                                         "nor made by an earlier step")
            for tensor in step.outputs.values():
                if tensor in available:
                    raise ModelLoadError(f"{where}: tensor '{tensor}' is already defined; each tensor is made once")
                available.add(tensor)
            seen[step.model] = seen.get(step.model, 0) + 1
            self.labels.append(step.model if seen[step.model] == 1 else f"{step.model}#{i}")
        missing = [t.name for t in config.outputs if t.name not in available]
        if missing:
            raise ModelLoadError(f"pipeline '{self.name}': outputs {missing} are made by no step")
        self.config = config
        self.output_names = [t.name for t in config.outputs]
        self._versions = [None if s.version is None else str(s.version) for s in self.steps]
        self._wanted = [list(s.outputs) for s in self.steps]

    def bind(self, manager: ModelManager) -> ModelConfig:
        """Check the steps against the models now loaded; return the pipeline's completed config."""
        types = {t.name: t.datatype for t in self.config.inputs}
        batch_sizes = []
        for i, step in enumerate(self.steps, 1):
            where = f"step {i} model '{step.model}'"
            if step.model not in manager.models:
                raise ModelLoadError(f"{where} is not loaded")
            try:
                mv = manager.get(step.model, self._versions[i - 1])
            except ModelServeError as exc:
                raise ModelLoadError(f"{where} is not ready: {exc.message}") from None
            if mv.pipeline is not None:
                raise ModelLoadError(f"{where} is a pipeline; pipelines do not nest")
            ins = {t.name: t for t in mv.config.inputs}
            outs = {t.name: t for t in mv.config.outputs}
            for name, tensor in step.inputs.items():
                if name not in ins:
                    raise ModelLoadError(f"{where} has no input '{name}' (its inputs: {list(ins)})")
                if types[tensor] != ins[name].datatype:
                    raise ModelLoadError(f"{where}: input '{name}' is {ins[name].datatype}, "
                                         f"pipeline tensor '{tensor}' is {types[tensor]}")
            unfed = [t.name for t in mv.config.inputs if t.name not in step.inputs and not t.optional]
            if unfed:
                raise ModelLoadError(f"{where}: inputs {unfed} are not mapped to pipeline tensors")
            for name, tensor in step.outputs.items():
                if name not in outs:
                    raise ModelLoadError(f"{where} has no output '{name}' (its outputs: {list(outs)})")
                types[tensor] = outs[name].datatype
            batch_sizes.append(mv.config.max_batch_size or 0)
        for t in self.config.outputs:
            if types[t.name] != t.datatype:
                raise ModelLoadError(f"pipeline '{self.name}': output '{t.name}' is declared {t.datatype}, "
                                     f"its step makes {types[t.name]}")
        cfg = self.config.model_copy(deep=True)
        if cfg.max_batch_size is None:  # batch like the steps do: the smallest of theirs, none if one has none
            cfg.max_batch_size = min(batch_sizes) if all(batch_sizes) else 0
        cfg.platform = cfg.platform or "ensemble"
        return cfg

    async def run(self, dataplane: Dataplane, inputs: dict[str, np.ndarray], wanted: list[str] | None,
                  request_id: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """One request through every step; returns the outputs asked for and the response parameters."""
        tensors = dict(inputs)
        timings: dict[str, float] = {}
        for i, step in enumerate(self.steps):
            feed = {name: tensors[tensor] for name, tensor in step.inputs.items() if tensor in tensors}
            started = time.perf_counter_ns()
            try:
                response = await dataplane.infer(
                    InferRequest(step.model, self._versions[i], feed, self._wanted[i], request_id, protocol="pipeline"))
            except ModelServeError as exc:
                exc.message = f"pipeline '{self.name}' step {i + 1} (model '{step.model}'): {exc.message}"
                exc.args = (exc.message,)
                raise
            timings[self.labels[i]] = round((time.perf_counter_ns() - started) / 1e6, 3)
            for name, tensor in step.outputs.items():
                tensors[tensor] = response.outputs[name]
        return {name: tensors[name] for name in wanted or self.output_names}, {STEP_MS: json.dumps(timings)}


async def build_version(mv: ModelVersion, manager: ModelManager) -> ModelVersion:
    """A pipeline version: checked, then bound to its step models once their loads have settled
    (at start-up every model loads at once; a pipeline waits for those it names)."""
    manager.building_pipelines.add(mv.name)
    try:
        pipeline = Pipeline(mv.config)
        for i, step in enumerate(pipeline.steps, 1):
            if step.model in manager.building_pipelines:  # also stops two pipelines waiting on each other
                raise ModelLoadError(f"step {i} model '{step.model}' is a pipeline; pipelines do not nest")
            await manager.wait_loaded(step.model)
        mv.config = pipeline.bind(manager)
    except ModelServeError as exc:
        mv.state, mv.reason = UNAVAILABLE, exc.message
        log.error("model '%s' version %d: %s", mv.name, mv.version, exc.message)
        return mv
    finally:
        manager.building_pipelines.discard(mv.name)
    mv.pipeline, mv.state = pipeline, READY
    return mv
