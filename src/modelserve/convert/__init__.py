"""Framework model -> deployable file (ONNX, or TFLite / TorchScript where asked), checked by running both.

``convert`` picks the framework from the source, exports, then runs source and result on the same
sample inputs and refuses (``ConversionDrift``) a result whose outputs differ by more than the
tolerance. Each framework lives in its own module and is imported only when used, so the server and
the other converters need none of them.

Every framework module (``torch``, ``keras``, ``sklearn``) offers the same five functions, which
``convert`` calls in this order: ``load`` (source -> model), ``input_specs`` (declared inputs),
``reference`` (run the source), ``export`` (write the file; returns its output names) and
``exact_outputs`` (outputs compared for equality, e.g. class labels).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelserve.data import DataError, InputSpec, load_dataset, random_inputs

TARGET_OF_SUFFIX = {".onnx": "onnx", ".tflite": "tflite", ".pt": "torchscript", ".pth": "torchscript",
                    ".ts": "torchscript"}
TORCH_FILES = {".pt", ".pth", ".ts", ".pt2"}
KERAS_FILES = {".keras", ".h5", ".hdf5"}
PICKLE_FILES = {".pkl", ".pickle", ".joblib"}
EXTRAS = {  # framework -> (module to import, what to install)
    "torch": ("modelserve.convert.torch", "pip install 'modelserve[torch]'"),
    "keras": ("modelserve.convert.keras", "pip install 'modelserve[tensorflow]'"),
    "sklearn": ("modelserve.convert.sklearn", "pip install 'modelserve[sklearn]'"),
}
RANDOM_BATCH = 8  # generated samples: more than one, so the dynamic batch axis is exercised
SAMPLE_LIMIT = 512  # samples of a given file used for the check
FACTORY_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class ConversionError(ValueError):
    """A source that cannot be converted; the message says what to change."""


class ConversionDrift(ConversionError):
    """The converted model's outputs differ from the source's by more than the tolerance."""

    def __init__(self, message: str, verification: Verification):
        super().__init__(message)
        self.verification = verification


@dataclass
class Verification:
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    samples: int
    outputs: list[str]
    passed: bool
    failed_elements: dict[str, int] = field(default_factory=dict)  # output -> values over the tolerance

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ConversionResult:
    output: Path
    framework: str
    target: str
    verification: Verification
    inputs: list[InputSpec]

    def to_dict(self) -> dict:
        return {"output": str(self.output), "framework": self.framework, "target": self.target,
                "verification": self.verification.to_dict(),
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(np.dtype(s.dtype))}
                           for s in self.inputs]}


def convert(source: Any, output: str | Path, *, to: str | None = None, weights: str | Path | None = None,
            input_shapes: Sequence[Sequence[int | None]] | None = None, input_names: Sequence[str] | None = None,
            output_names: Sequence[str] | None = None, sample: str | Path | None = None, opset: int = 17,
            dynamic_batch: bool = True, float16: bool = False, trust_pickle: bool = False, atol: float = 1e-4,
            rtol: float = 1e-3, external_data: bool = False, pythonpath: str | Path | None = None) -> ConversionResult:
    """Convert ``source`` to ``output`` and check both give the same outputs (see the module doc).

    ``source``: a file (.pt/.pth TorchScript, .pt2 torch.export, .keras, .h5, a SavedModel folder,
    .pkl/.pickle/.joblib scikit-learn), ``"pkg.module:factory"`` (``factory()`` returns an ``nn.Module`` or a
    Keras model; ``weights`` is its state dict / weights file) or an in-memory module, Keras model or estimator.
    ``to``: onnx, tflite or torchscript; by default from ``output``'s suffix. Raises ``ConversionError``, or
    ``ConversionDrift`` (the output is removed) when the outputs differ by more than ``atol + rtol * |ref|``.
    """
    output = Path(output)
    target = _target(to, output)
    if float16 and target != "tflite":
        raise ConversionError("float16 weights apply to TFLite output (--to tflite); for ONNX use "
                              "`modelserve optimize --fp16`")
    framework, model = _identify(source, pythonpath)
    backend = _backend(framework)
    model = backend.load(model, weights=weights, pythonpath=pythonpath, trust_pickle=trust_pickle)
    shapes = [tuple(d if d is None or d > 0 else None for d in s) for s in input_shapes] if input_shapes else None
    names = list(input_names) if input_names else None
    specs = backend.input_specs(model, shapes, names, dynamic_batch)
    if specs is None:  # the model does not record its inputs (a PyTorch module): the sample file tells
        if sample is None or Path(sample).suffix not in (".npy", ".npz"):
            raise ConversionError(f"a {framework} model does not record its input shapes: pass --input-shape "
                                  f"(e.g. 1,3,224,224, once per input) or a .npy/.npz --sample")
        specs = specs_from_file(Path(sample), names, dynamic_batch)
    inputs = _inputs(specs, sample, dynamic_batch)
    reference = backend.reference(model, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        names = backend.export(model, output, target, inputs, specs, output_names=output_names, opset=opset,
                               dynamic_batch=dynamic_batch, float16=float16, external_data=external_data)
        from modelserve.convert import verify

        result = verify.run(output, target, inputs)
        samples = len(next(iter(inputs.values())))
        check = verify.compare(reference, result, atol=atol, rtol=rtol, samples=samples,
                               exact=backend.exact_outputs(model, names))
    except BaseException:
        remove_output(output)
        raise
    if not check.passed:
        remove_output(output)
        worst = ", ".join(f"{c} values of '{n}'" for n, c in check.failed_elements.items())
        raise ConversionDrift(
            f"the converted model's outputs differ from the source's: max abs error {check.max_abs_error:.3g}, "
            f"max rel error {check.max_rel_error:.3g} on {samples} samples; tolerance atol {atol:g}, rtol {rtol:g} "
            f"({worst} differ by more than atol + rtol*|ref|). {output} was not kept. If the model "
            f"behaves differently once exported (Python control flow on tensor values, random ops), fix the model; "
            f"if the difference is expected (e.g. float16), raise --atol/--rtol.", check)
    return ConversionResult(output, framework, target, check, specs)


def _target(to: str | None, output: Path) -> str:
    if to:
        to = to.lower()
        if to not in ("onnx", "tflite", "torchscript"):
            raise ConversionError(f"unknown target {to!r}: use onnx, tflite or torchscript")
        return to
    target = TARGET_OF_SUFFIX.get(output.suffix.lower())
    if target is None:
        raise ConversionError(f"cannot tell the target format from {output.name!r}: name it .onnx, .tflite or .pt, "
                              f"or pass --to onnx|tflite|torchscript")
    return target


def _identify(source: Any, pythonpath) -> tuple[str, Any]:
    """(framework, source) where source is now a Path or an in-memory model."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if isinstance(source, str) and not path.exists() and FACTORY_REF.fullmatch(source):
            return _identify(import_factory(source, pythonpath)(), None)
        if not path.exists():
            raise ConversionError(f"{source}: no such file or folder (a Python reference looks like pkg.module:factory)")
        suffix = path.suffix.lower()
        if path.is_dir():
            if (path / "saved_model.pb").exists():
                return "keras", path
            raise ConversionError(f"{path} is a folder without saved_model.pb: not a TensorFlow SavedModel")
        if suffix in TORCH_FILES:
            return "torch", path
        if suffix in KERAS_FILES:
            return "keras", path
        if suffix in PICKLE_FILES:
            return "sklearn", path
        if suffix == ".onnx":
            raise ConversionError(f"{path} is already ONNX: serve it as is, or use `modelserve optimize`")
        raise ConversionError(f"{path}: unknown model file type {suffix or '(no suffix)'!r}; expected .pt/.pth "
                              f"(TorchScript), .pt2 (torch.export), .keras/.h5 or a SavedModel folder, "
                              f".pkl/.pickle/.joblib (scikit-learn), or pkg.module:factory")
    for module, framework in (("torch", "torch"), ("keras", "keras"), ("tensorflow", "keras")):
        mod = sys.modules.get(module)
        if mod is None:
            continue
        base = getattr(getattr(mod, "nn", None), "Module", None) if module == "torch" else \
            getattr(mod, "Model", None) if module == "keras" else getattr(getattr(mod, "keras", None), "Model", None)
        if base is not None and isinstance(source, base):
            return framework, source
        if module == "torch" and isinstance(source, mod.export.ExportedProgram):
            return "torch", source
        if module == "tensorflow" and hasattr(source, "signatures"):
            return "keras", source
    if hasattr(source, "predict") and hasattr(source, "fit"):
        return "sklearn", source
    raise ConversionError(f"cannot convert a {type(source).__name__}: expected a torch nn.Module, a Keras model "
                          f"or a scikit-learn estimator")


def _backend(framework: str):
    module, install = EXTRAS[framework]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConversionError(f"converting a {framework} model needs {exc.name or 'a missing package'} "
                              f"({exc}): {install}") from exc


def import_factory(ref: str, pythonpath: str | Path | None = None):
    """The callable named by ``pkg.module:factory``, imported with ``pythonpath`` (default: cwd) on sys.path."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConversionError(f"{ref!r} is not a Python reference: write pkg.module:factory")
    folder = str(Path(pythonpath or os.getcwd()).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise ConversionError(f"cannot import {module_name!r} (from {ref}) with {folder} on the Python path: "
                              f"{type(exc).__name__}: {exc}. Pass --pythonpath with the folder that holds "
                              f"{module_name.split('.')[0]}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConversionError(f"{module_name} ({getattr(obj, '__file__', '')}) has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConversionError(f"{ref} is a {type(obj).__name__}, not a function that builds the model")

    def build():
        try:
            return obj()
        except Exception as exc:
            raise ConversionError(f"{ref}() failed: {type(exc).__name__}: {exc}") from exc

    return build


def specs_from_file(path: Path, names: Sequence[str] | None, dynamic_batch: bool = True) -> list[InputSpec]:
    """Input specs read off a .npy/.npz sample file (first axis: the batch)."""
    try:
        if path.suffix == ".npy":
            arrays = {"input": np.load(path, allow_pickle=False, mmap_mode="r")}
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files if k not in ("labels", "y")}
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: cannot read the sample file: {exc}") from exc
    if not arrays:
        raise ConversionError(f"{path}: holds no input arrays")
    keys = list(names) if names and len(names) == len(arrays) else list(arrays)
    if list(arrays) == ["x"] and not names:
        keys = ["input"]
    return [InputSpec(k, (None if dynamic_batch else a.shape[0], *a.shape[1:]), a.dtype)
            for k, a in zip(keys, arrays.values())]


def _inputs(specs: list[InputSpec], sample, dynamic_batch: bool) -> dict[str, np.ndarray]:
    try:
        if sample is None:
            return random_inputs(specs, batch=RANDOM_BATCH, seed=0)
        data = load_dataset(sample, specs, limit=SAMPLE_LIMIT)
    except DataError as exc:
        raise ConversionError(str(exc)) from exc
    if not dynamic_batch and specs[0].shape and specs[0].shape[0]:
        data = data.head(specs[0].shape[0])
    return data.inputs


def short_error(exc: BaseException, limit: int = 600) -> str:
    """An exception as one line for a message: its type and the first lines of its text."""
    text = " ".join(str(exc).split("\n")[:3]).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text[:limit]}"


def remove_output(output: Path) -> None:
    for path in (output, output.with_name(output.name + ".data")):
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def finish_onnx(output: Path, external_data: bool) -> Path:
    """One self-contained file (weights inlined, ``OUT.onnx.data`` removed), or weights in ``OUT.onnx.data``."""
    import onnx

    data = output.with_name(output.name + ".data")
    if not output.exists():
        raise ConversionError(f"the exporter did not write {output}")
    if not external_data and data.exists():
        model = onnx.load(str(output))
        try:
            onnx.save(model, str(output), save_as_external_data=False)
        except ValueError as exc:  # protobuf's 2 GB limit
            raise ConversionError(f"the model is too large for one ONNX file ({exc}): use --external-data") from exc
        data.unlink()
    elif external_data and not data.exists():
        model = onnx.load(str(output))
        onnx.save(model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    return output
