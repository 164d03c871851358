"""One small interface, many engines.

A runtime loads one model file and runs it on named numpy arrays. It knows nothing about
protocols, batching or versions: the server creates one runtime per model instance and calls
``infer`` from a worker thread, never from the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # V2 name
    dims: list[int]  # full shape as the model declares it, -1 = any size


@dataclass(frozen=True)
class RuntimeContext:
    """What the server knows about the model beyond its file. Engines that read a signature from the
    file (ONNX) ignore it; code-defined models (``backend: python``) take their signature, parameters
    and class name from it."""

    name: str
    version: int
    model_dir: Path
    version_dir: Path
    parameters: dict[str, str] = field(default_factory=dict)
    #: the config's tensors with full shapes (batch dim included when ``max_batch_size`` > 0)
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    max_batch_size: int = 0
    #: the class to load from a code file ("" = the only candidate)
    entry_point: str = ""


class RuntimeOptions(BaseModel):
    """Engine settings; for ONNX Runtime: execution providers in order of preference, threads (0 = ORT decides)."""

    model_config = ConfigDict(extra="forbid")
    execution_providers: list[str] = []
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"


class Runtime(ABC):
    #: Triton-style platform name reported in model metadata
    platform = ""

    def __init__(self, model_file: Path, options: RuntimeOptions, context: RuntimeContext | None = None):
        self.model_file = model_file
        self.options = options
        self.context = context

    @abstractmethod
    def load(self) -> None:
        """Read the model; raise ``ModelLoadError`` with a reason a person can act on."""

    @abstractmethod
    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs as the model declares them (full shapes, batch dim included, -1 = any)."""

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model; ``outputs`` None = all. Thread-safe for one caller at a time."""

    def unload(self) -> None:
        """Release what ``load`` took."""

    def request_hooks(self) -> tuple[Callable | None, Callable | None]:
        """Per-request work to run outside the batch, before and after it: ``(preprocess, postprocess)``,
        each ``dict[str, ndarray] -> dict[str, ndarray]`` (user Python models). Engines have none."""
        return None, None


def runtime_class(backend: str) -> type[Runtime]:
    """The engine for a config's ``backend``."""
    from modelserve.errors import ModelLoadError

    if backend in ("onnxruntime", "onnx"):
        from modelserve.runtime.onnx import OnnxRuntime

        return OnnxRuntime
    if backend == "python":
        from modelserve.runtime.python import PythonRuntime

        return PythonRuntime
    raise ModelLoadError(f"backend '{backend}' is not supported (supported: onnxruntime, python, pipeline)")
