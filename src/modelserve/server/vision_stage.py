"""The vision stage: a model config's ``preprocess`` / ``postprocess`` turned into per-request work.

Clients send encoded images (a BYTES input, one image per row); ``before`` decodes and resizes each
one in a stage thread, so images of any size leave as same-shaped rows and batch with other
requests; ``after`` turns this request's rows of model output into top-k labels, boxes after NMS
or masks, mapped back to each original image. The library is ``modelserve.vision``; this module
only wires it to the model's tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

from modelserve.errors import InvalidInput, ModelLoadError
from modelserve.server.config import ModelConfig, TensorConfig
from modelserve.server.stages import RequestStage
from modelserve.vision import Postprocessor, Preprocessor, load_labels


class VisionStage(RequestStage):
    def __init__(self, config: ModelConfig, model_dirs: list[Path]):
        self.name = config.name
        self.batching = bool(config.max_batch_size)
        self.pre = self.post = None
        if config.preprocess is not None:
            self.pre = Preprocessor(config.preprocess)
            self.image_input = config.preprocess.input
            target = config.preprocess.tensor or _only(config.inputs, "input", config.name)
            spec = next((t for t in config.inputs if t.name == target), None)
            if spec is None:
                raise ModelLoadError(f"model '{config.name}': preprocess.tensor '{target}' is not a model input "
                                     f"(inputs: {[t.name for t in config.inputs]})")
            self.tensor, self.dims = target, spec.dims if self.batching else spec.dims[1:]
            self.reshape = self._fit(self.dims)
            self.inputs = [TensorConfig(name=self.image_input, datatype="BYTES", dims=[1])] + \
                          [t for t in config.inputs if t.name != target]
        if config.postprocess is not None:
            spec = config.postprocess
            try:
                labels = next((load_labels(spec.labels, d) for d in model_dirs
                               if not isinstance(spec.labels, str) or (d / spec.labels).is_file()), None)
            except OSError as exc:
                raise ModelLoadError(f"model '{config.name}': cannot read labels: {exc}") from None
            if isinstance(spec.labels, str) and labels is None:
                raise ModelLoadError(f"model '{config.name}': labels file '{spec.labels}' is not in the model folder")
            self.post = Postprocessor(spec, labels)
            self.outputs = [TensorConfig(name=n, datatype=d, dims=dims) for n, d, dims in self.post.tensor_specs()]

    def _fit(self, dims: list[int]) -> bool:
        """Does the model take the image as it is, or the same pixels flattened/reshaped (e.g. [64] for 8x8)?"""
        try:
            self.pre.check_model_input(dims)
            return False
        except ValueError as exc:
            produced = self.pre.shape
            if produced is not None and -1 not in dims and math.prod(produced) == math.prod(dims):
                return True
            raise ModelLoadError(f"model '{self.name}': {exc}") from None

    def before(self, inputs):
        if self.pre is None:
            return inputs, None
        inputs = dict(inputs)  # the request keeps the client's images (the payload log and drift read them)
        images = inputs.pop(self.image_input).reshape(-1)
        if not self.batching and len(images) != 1:
            raise InvalidInput(f"model '{self.name}' takes one image per request, got {len(images)}")
        pixels, metas = self.pre.batch(images)
        if self.reshape:
            pixels = pixels.reshape((len(images), *self.dims))
        inputs[self.tensor] = pixels
        return inputs, metas

    def after(self, outputs, metas):
        if self.post is None:
            return outputs
        if not self.batching:  # the model's own outputs carry the (single) image's batch dim already
            outputs = {k: v if v.ndim and v.shape[0] == 1 else v[None] for k, v in outputs.items()}
        return self.post.to_tensors(self.post(outputs, metas))


def _only(tensors: list[TensorConfig], kind: str, model: str) -> str:
    if len(tensors) != 1:
        raise ModelLoadError(f"model '{model}' has {len(tensors)} {kind}s: name the one preprocess fills "
                             f"(preprocess.tensor: one of {[t.name for t in tensors]})")
    return tensors[0].name
