"""User Python models: a class in the model repository, served like any other model.

The user API is deliberately tiny (LitServe's shape)::

    # <repository>/<model>/<version>/model.py   (or <model>/model.py, shared by every version)
    import numpy as np
    from modelserve import PythonModel

    class Scaler(PythonModel):
        def setup(self, context):                 # once per instance, in a worker thread
            self.factor = float(context.parameters.get("factor", "1"))

        def predict(self, batch):                 # dict of arrays stacked on axis 0 by the batcher
            return {"y": batch["x"] * self.factor}

The server's dynamic batcher stacks concurrent requests on axis 0 before ``predict`` (when the
config's ``max_batch_size`` > 0) and slices the outputs back per request, so ``predict`` must
return arrays whose first dimension is the batch. ``preprocess`` / ``postprocess``, when a class
defines them, run once per request outside the batch (in worker threads, possibly several at
once: keep them free of shared mutable state). Raise ``modelserve.errors.InvalidInput`` for a bad
request (HTTP 400); any other exception fails the batch with a 500 naming the model.

Trust: a Python model is code from the operator's model repository and runs inside the server
with its full rights, exactly like the server's own code. Never serve a repository you do not trust.
"""

from __future__ import annotations

import abc
import itertools
import logging
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np

from modelserve.datatypes import NUMPY_OF
from modelserve.errors import InvalidInput, ModelLoadError, ModelServeError
from modelserve.runtime import Runtime, RuntimeContext, TensorSpec

log = logging.getLogger(__name__)

#: user modules are registered as ``modelserve_user_<model>_v<version>_<n>``; the counter keeps reloads apart
_PREFIX = "modelserve_user"
_counter = itertools.count(1)


class PythonModel(abc.ABC):
    """Base class of user models. Override ``predict``; the other methods are optional."""

    def setup(self, context: RuntimeContext) -> None:
        """Load weights, read ``context.parameters`` (the config's ``parameters``), ``context.version_dir``..."""

    @abc.abstractmethod
    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs stacked on axis 0 (the batch) -> outputs with the same first dimension."""

    def preprocess(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's inputs (as the client sent them) -> what ``predict`` takes. Runs before batching."""
        return inputs

    def postprocess(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's slice of ``predict``'s outputs -> what the client gets. Runs after un-batching."""
        return outputs

    def teardown(self) -> None:
        """Release what ``setup`` took (the version is being unloaded)."""


def _overrides(obj: PythonModel, method: str) -> bool:
    return getattr(type(obj), method) is not getattr(PythonModel, method)


def user_error(exc: BaseException) -> str:
    """The last line of a traceback, which is what a person needs in a status reason."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({Path(exc.filename or '?').name}, line {exc.lineno})"
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


class PythonRuntime(Runtime):
    platform = "python"

    def load(self) -> None:
        ctx = self.context
        if ctx is None:
            raise ModelLoadError("a Python model needs the server's model context")
        if not ctx.inputs or not ctx.outputs:
            raise ModelLoadError(
                f"model '{ctx.name}': backend python needs its inputs and outputs declared in config.yaml "
                "(each with name, datatype and dims), since there is no model file to read them from")
        path = self.model_file
        if not path.is_file():
            shared = ctx.model_dir / path.name
            if not shared.is_file():
                raise ModelLoadError(f"model '{ctx.name}': no {path.name} in {ctx.version_dir} or {ctx.model_dir}")
            path = shared
        cls = self._class(path, ctx)
        if getattr(cls, "__abstractmethods__", None):
            sys.modules.pop(self._module_name, None)
            raise ModelLoadError(f"model '{ctx.name}': {cls.__name__} in {path.name} must define "
                                 f"{', '.join(sorted(cls.__abstractmethods__))}(self, batch)")
        try:
            self.model = cls()
            self.model.setup(ctx)
        except Exception as exc:  # noqa: BLE001 - user code: any failure makes the version unavailable
            sys.modules.pop(self._module_name, None)
            log.error("model '%s' version %d: setup failed\n%s", ctx.name, ctx.version, traceback.format_exc())
            raise ModelLoadError(f"model '{ctx.name}': {cls.__name__}.setup raised {user_error(exc)}") from None
        self._label = f"{ctx.name}:{ctx.version}"
        self._outputs = {t.name: t for t in ctx.outputs}
        self._has_post = _overrides(self.model, "postprocess")

    def _class(self, path: Path, ctx: RuntimeContext) -> type[PythonModel]:
        """Import ``path`` under a name of its own (two versions, or a reload, never share a module)."""
        safe = re.sub(r"\W", "_", ctx.name)
        self._module_name = f"{_PREFIX}_{safe}_v{ctx.version}_{next(_counter)}"
        module = types.ModuleType(self._module_name)
        module.__file__ = str(path)
        sys.modules[self._module_name] = module  # dataclasses and pickle look classes up here
        try:
            # compiled here rather than imported: no __pycache__ written into the repository, whose
            # file listing poll mode watches
            exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # noqa: S102 - trusted, see top
        except Exception as exc:  # noqa: BLE001 - SyntaxError, ImportError, anything at import time
            sys.modules.pop(self._module_name, None)
            log.error("model '%s' version %d: importing %s failed\n%s", ctx.name, ctx.version, path,
                      traceback.format_exc())
            raise ModelLoadError(f"model '{ctx.name}': importing {path.name} raised {user_error(exc)}") from None
        found = [v for v in vars(module).values()
                 if isinstance(v, type) and issubclass(v, PythonModel) and v is not PythonModel
                 and v.__module__ == self._module_name]
        if ctx.entry_point:
            chosen = getattr(module, ctx.entry_point, None)
            if not (isinstance(chosen, type) and issubclass(chosen, PythonModel)):
                sys.modules.pop(self._module_name, None)
                raise ModelLoadError(f"model '{ctx.name}': {path.name} has no PythonModel subclass "
                                     f"'{ctx.entry_point}' (found: {[c.__name__ for c in found]})")
            return chosen
        if len(found) != 1:
            what = "no subclass of modelserve.PythonModel" if not found else \
                f"several PythonModel subclasses {[c.__name__ for c in found]}; name one with 'class:' in the config"
            sys.modules.pop(self._module_name, None)
            raise ModelLoadError(f"model '{ctx.name}': {path.name} defines {what}")
        return found[0]

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return list(self.context.inputs), list(self.context.outputs)

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        try:
            results = self.model.predict(inputs)
        except ModelServeError:
            raise
        except Exception as exc:  # noqa: BLE001 - fails this batch only; the server goes on
            log.error("model '%s': predict failed\n%s", self._label, traceback.format_exc())
            raise ModelServeError(f"model '{self._label}': predict raised {user_error(exc)}") from None
        if not isinstance(results, dict):
            raise ModelServeError(f"model '{self._label}': predict returned {type(results).__name__}, "
                                  "expected a dict of output name -> numpy array")
        if self._has_post:  # postprocess makes the declared outputs; predict's are its own business
            return {k: np.asarray(v) for k, v in results.items()}
        return conform(results, self._outputs, outputs, self._label, "predict")

    def request_hooks(self):
        pre = self.model.preprocess if _overrides(self.model, "preprocess") else None
        post = self.postprocess if self._has_post else None
        return pre, post

    def postprocess(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.model.postprocess(outputs)
        if not isinstance(results, dict):
            raise ModelServeError(f"model '{self._label}': postprocess returned {type(results).__name__}, "
                                  "expected a dict of output name -> numpy array")
        return conform(results, self._outputs, None, self._label, "postprocess")

    def unload(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            try:
                model.teardown()
            except Exception:
                log.exception("model '%s': teardown failed", self._label)
            self.model = None
        sys.modules.pop(getattr(self, "_module_name", ""), None)


def conform(results: dict[str, Any], declared: dict[str, TensorSpec], wanted: list[str] | None,
            label: str, step: str) -> dict[str, np.ndarray]:
    """The declared outputs (or the ``wanted`` ones) as arrays of their declared datatype."""
    out = {}
    for name in wanted or declared:
        if name not in results:
            raise ModelServeError(f"model '{label}': {step} returned no output '{name}' "
                                  f"(it returned {sorted(results)}; the config declares {sorted(declared)})")
        array = np.asarray(results[name])
        dtype = NUMPY_OF[declared[name].datatype]
        if dtype.kind == "O":
            if array.dtype.kind in "US":
                array = np.vectorize(lambda s: s.encode() if isinstance(s, str) else bytes(s),
                                     otypes=[object])(array) if array.size else array.astype(object)
            elif array.dtype.kind != "O":
                raise ModelServeError(f"model '{label}': output '{name}' is declared BYTES, {step} gave {array.dtype}")
        elif array.dtype != dtype:
            try:
                array = array.astype(dtype, casting="same_kind" if array.dtype.kind == dtype.kind else "unsafe")
            except (TypeError, ValueError) as exc:
                raise ModelServeError(f"model '{label}': output '{name}' cannot be "
                                      f"{declared[name].datatype}: {exc}") from None
        out[name] = array
    return out


__all__ = ["InvalidInput", "PythonModel", "PythonRuntime", "RuntimeContext"]
