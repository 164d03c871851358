"""Run a converted file (ONNX, TFLite, TorchScript) and compare its outputs with the source model's.

The check is numpy's ``allclose``: an element fails when ``|result - ref| > atol + rtol * |ref|``.
The report gives the largest absolute error and the largest relative error (over elements whose
reference is not about zero, where a relative error means nothing). Outputs named in ``exact``
(class labels) must be equal element for element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from modelserve.convert import ConversionError, Verification

REL_FLOOR = 1e-6  # |ref| below this: no relative error reported for that element


def run(path: Path, target: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The converted model's outputs on ``inputs``, by output name, in the file's output order."""
    try:
        if target == "onnx":
            return run_onnx(path, inputs)
        if target == "tflite":
            return run_tflite(path, inputs)
        if target == "torchscript":
            return run_torchscript(path, inputs)
    except ConversionError:
        raise
    except Exception as exc:  # the runtime's own message says what it could not do
        raise ConversionError(f"the converted model {path} does not run on the sample inputs "
                              f"({_shapes(inputs)}): {type(exc).__name__}: {exc}") from exc
    raise ConversionError(f"cannot verify target {target!r}")


def run_onnx(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = _match(names, inputs, path)
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, feed)))


def run_tflite(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=str(path))
    details = interpreter.get_input_details()
    names = [_tflite_name(d["name"]) for d in details]
    feed = _match(names, {_tflite_name(k): v for k, v in inputs.items()}, path)
    for d, name in zip(details, names):
        interpreter.resize_tensor_input(d["index"], feed[name].shape)
    interpreter.allocate_tensors()
    for d, name in zip(details, names):
        interpreter.set_tensor(d["index"], feed[name])
    interpreter.invoke()
    outs = sorted(interpreter.get_output_details(), key=lambda d: _natural(d["name"]))
    return {d["name"]: interpreter.get_tensor(d["index"]).copy() for d in outs}


def run_torchscript(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()))
    from modelserve.convert.torch import flatten_outputs

    arrays = flatten_outputs(out)
    return {f"output{i}" if len(arrays) > 1 else "output": a for i, a in enumerate(arrays)}


def compare(reference: Mapping[str, np.ndarray], result: Mapping[str, np.ndarray], *, atol: float, rtol: float,
            samples: int, exact: Sequence[str] = ()) -> Verification:
    """Pair outputs by name (by position when the names differ) and measure the differences."""
    if len(reference) != len(result):
        raise ConversionError(f"the source gives {len(reference)} outputs ({', '.join(reference)}), the converted "
                              f"model {len(result)} ({', '.join(result)})")
    if set(reference) == set(result):
        pairs = [(name, reference[name], result[name]) for name in result]
    else:
        pairs = [(name, ref, got) for (_, ref), (name, got) in zip(reference.items(), result.items())]
    exact_names = set(exact)
    max_abs = max_rel = 0.0
    failed: dict[str, int] = {}
    for name, ref, got in pairs:
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            if ref.size == got.size and _squeezed(ref.shape) == _squeezed(got.shape):
                ref = ref.reshape(got.shape)
            else:
                raise ConversionError(f"output '{name}': the converted model gives shape {list(got.shape)}, the "
                                      f"source {list(ref.shape)}")
        if name in exact_names or ref.dtype.kind in "OUSb" or got.dtype.kind in "OUSb":
            bad = ~_equal(ref, got)
            if bad.any():
                failed[name] = int(bad.sum())
            if ref.dtype.kind not in "OUS":
                max_abs = max(max_abs, float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max(initial=0)))
            continue
        r, g = ref.astype(np.float64), got.astype(np.float64)
        both_nan = np.isnan(r) & np.isnan(g)
        diff = np.where(both_nan, 0.0, np.abs(r - g))
        diff = np.where(np.isnan(diff), np.inf, diff)
        bad = diff > atol + rtol * np.abs(np.nan_to_num(r))
        if bad.any():
            failed[name] = int(bad.sum())
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        big = np.abs(r) >= REL_FLOOR
        if big.any():
            max_rel = max(max_rel, float((diff[big] / np.abs(r[big])).max()))
    return Verification(max_abs_error=max_abs, max_rel_error=max_rel, atol=atol, rtol=rtol, samples=samples,
                        outputs=[name for name, _, _ in pairs], passed=not failed, failed_elements=failed)


def _equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
        return np.vectorize(_text)(a) == np.vectorize(_text)(b)
    return a == b


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _squeezed(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def _match(names: Sequence[str], inputs: Mapping[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    if set(names) <= set(inputs):
        return {n: inputs[n] for n in names}
    if len(names) == len(inputs):
        return dict(zip(names, inputs.values()))
    raise ConversionError(f"{path} has inputs {list(names)}; the samples hold {list(inputs)}")


def _tflite_name(name: str) -> str:
    """TFLite input names look like ``serving_default_image:0``; the model's own name is ``image``."""
    return name.removeprefix("serving_default_").split(":")[0]


def _natural(name: str) -> tuple:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _shapes(inputs: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in inputs.items())
