"""Keras / TensorFlow -> ONNX (tf2onnx, through a ``tf.function``) or TFLite (optionally float16 weights).

Sources: a Keras model (in memory, a .keras or .h5 file, or ``pkg.module:factory`` with a weights file)
or a TensorFlow SavedModel folder (its ``serving_default`` signature, else ``serve``). tf2onnx's own
Keras path does not handle Keras 3, so every source becomes one ``tf.function`` with named inputs and
a dict of named outputs, which both tf2onnx and the TFLite converter take.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from modelserve.convert import ConversionError, finish_onnx, short_error
from modelserve.data import InputSpec
from modelserve.logs import quiet

SIGNATURES = ("serving_default", "serve")


@dataclass
class KerasSource:
    call: Callable[[list], dict[str, Any]]  # input tensors in spec order -> {output name: tensor}
    specs: list[InputSpec]  # as the model declares them
    output_names: list[str]
    model: Any


def load(source: Any, *, weights=None, pythonpath=None, trust_pickle: bool = False) -> KerasSource:
    import keras

    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            if weights is not None:
                raise ConversionError("a SavedModel carries its weights: drop --weights")
            return _saved_model(path)
        try:
            with quiet("tf2onnx", "tensorflow", "absl"):
                source = keras.models.load_model(str(path), compile=False)
        except Exception as exc:
            raise ConversionError(f"{path}: Keras cannot load it: {short_error(exc)}") from exc
    if not isinstance(source, keras.Model):
        if hasattr(source, "signatures"):  # a tf.saved_model.load result
            return _signature_source(source, "the SavedModel object")
        raise ConversionError(f"expected a Keras model, got a {type(source).__name__}")
    if weights is not None:
        try:
            source.load_weights(str(weights))
        except Exception as exc:
            raise ConversionError(f"{weights}: cannot load these weights into the model: {short_error(exc)}") from exc
    return _keras_source(source)


def _keras_source(model) -> KerasSource:
    if not model.inputs:
        raise ConversionError("the Keras model has no defined inputs: build it (keras.Input or model.build) first")
    specs = [InputSpec(_clean(t.name, f"input{i}"), tuple(t.shape), np.dtype(str(t.dtype)))
             for i, t in enumerate(model.inputs)]
    outputs = model.outputs
    names = ["output"] if len(outputs) == 1 else [f"output{i}" for i in range(len(outputs))]
    if isinstance(getattr(model, "output", None), Mapping):
        names = list(model.output)

    def call(args: list) -> dict[str, Any]:
        out = model(args[0] if len(args) == 1 else list(args), training=False)
        if isinstance(out, Mapping):
            return dict(out)
        return dict(zip(names, out if isinstance(out, (list, tuple)) else [out]))

    return KerasSource(call, specs, names, model)


def _saved_model(path: Path) -> KerasSource:
    try:
        with quiet("tf2onnx", "tensorflow", "absl"):
            loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ConversionError(f"{path}: TensorFlow cannot load this SavedModel: {short_error(exc)}") from exc
    return _signature_source(loaded, str(path))


def _signature_source(loaded, where: str) -> KerasSource:
    key = next((k for k in SIGNATURES if k in loaded.signatures), None)
    if key is None:
        raise ConversionError(f"{where} has no serving_default or serve signature (it has: "
                              f"{', '.join(loaded.signatures) or 'none'}); export it with model.export(path)")
    sig = loaded.signatures[key]
    inputs = sig.structured_input_signature[1]
    specs = [InputSpec(name, tuple(spec.shape), np.dtype(spec.dtype.as_numpy_dtype)) for name, spec in inputs.items()]
    names = sorted(sig.structured_outputs)

    def call(args: list) -> dict[str, Any]:
        return dict(sig(**{s.name: a for s, a in zip(specs, args)}))

    return KerasSource(call, specs, names, loaded)


def input_specs(model: KerasSource, shapes, names, dynamic_batch: bool) -> list[InputSpec]:
    declared = model.specs
    if names:
        if len(names) != len(declared):
            raise ConversionError(f"{len(names)} input names for a model with {len(declared)} inputs "
                                  f"({', '.join(s.name for s in declared)})")
        declared = [InputSpec(n, s.shape, s.dtype) for n, s in zip(names, declared)]
    if shapes:
        if len(shapes) != len(declared):
            raise ConversionError(f"{len(shapes)} input shapes for a model with {len(declared)} inputs")
        for spec, shape in zip(declared, shapes):
            if len(shape) != len(spec.shape) or any(d is not None and g is not None and d != g
                                                    for d, g in zip(spec.shape[1:], shape[1:])):
                raise ConversionError(f"input '{spec.name}' is declared {_dims(spec.shape)} by the model; "
                                      f"--input-shape gave {_dims(shape)}")
        declared = [InputSpec(s.name, tuple(g if d is None else d for d, g in zip(s.shape, shape)), s.dtype)
                    for s, shape in zip(declared, shapes)]
    batch = None if dynamic_batch else (shapes[0][0] if shapes and shapes[0][0] else 1)
    return [InputSpec(s.name, (batch, *s.shape[1:]), s.dtype) for s in declared]


def reference(model: KerasSource, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        out = model.call([tf.constant(v) for v in inputs.values()])
    except Exception as exc:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
        raise ConversionError(f"the model fails on sample inputs {shapes}: {short_error(exc)}") from exc
    return {k: np.asarray(out[k]) for k in sorted(out)}  # tf.nest's order: sorted keys


def exact_outputs(model, names) -> list[str]:
    return []


def export(model: KerasSource, output: Path, target: str, inputs, specs, *, output_names=None, opset=17,
           dynamic_batch=True, float16=False, external_data=False) -> list[str]:
    if output_names and len(output_names) != len(model.output_names):
        raise ConversionError(f"{len(output_names)} output names for a model with {len(model.output_names)} outputs")
    rename = dict(zip(model.output_names, output_names or model.output_names))
    signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in specs]

    def fn(*args):
        return {rename.get(k, k): v for k, v in model.call(list(args)).items()}

    function = tf.function(fn, input_signature=signature)
    if target == "onnx":
        import tf2onnx

        try:
            with quiet("tf2onnx", "tensorflow", "absl"):
                tf2onnx.convert.from_function(function, input_signature=signature, opset=opset,
                                              output_path=str(output))
        except Exception as exc:
            raise ConversionError(f"tf2onnx could not convert the model: {short_error(exc)}") from exc
        finish_onnx(output, external_data)
        import onnx

        return [o.name for o in onnx.load(str(output), load_external_data=False).graph.output]
    if target == "tflite":
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        try:
            with quiet("tf2onnx", "tensorflow", "absl"):
                # frozen: the converter given a function with captured variables writes a model without weights
                frozen = convert_variables_to_constants_v2(function.get_concrete_function())
                converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
                if float16:
                    converter.optimizations = [tf.lite.Optimize.DEFAULT]
                    converter.target_spec.supported_types = [tf.float16]
                output.write_bytes(converter.convert())
        except Exception as exc:
            raise ConversionError(f"the TFLite converter failed: {short_error(exc)}") from exc
        return sorted(rename.values())
    raise ConversionError(f"a Keras/TensorFlow model converts to onnx or tflite, not {target}")



def _clean(name: str, default: str) -> str:
    name = (name or "").split(":")[0]
    return name or default


def _dims(shape) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"

