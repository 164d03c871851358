"""scikit-learn estimators and pipelines -> ONNX (skl2onnx).

Classifiers get two outputs, ``label`` and ``probabilities`` (a plain tensor: ``zipmap`` off, so
the server can send it), checked label for label and probability within the tolerance. Pickle and
joblib files run code while they load, so they are read only when the caller says it trusts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelserve.convert import ConversionError, finish_onnx
from modelserve.data import InputSpec


def load(source: Any, *, weights=None, pythonpath=None, trust_pickle: bool = False):
    if weights is not None:
        raise ConversionError("--weights is for PyTorch/Keras models; a scikit-learn model carries its parameters")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not trust_pickle:
            raise ConversionError(
                f"{path} is a pickle: loading it runs whatever code the file contains, so it is read only when "
                f"you say you trust it. Pass --trust-pickle (trust_pickle=True) if you made the file or trust "
                f"who did")
        import joblib

        try:
            source = joblib.load(str(path))  # reads plain pickles as well as joblib files
        except Exception as exc:
            raise ConversionError(f"{path}: cannot unpickle it: {type(exc).__name__}: {exc}") from exc
    if not hasattr(source, "predict"):
        raise ConversionError(f"expected a fitted scikit-learn estimator or pipeline, got a {type(source).__name__}")
    if getattr(source, "n_features_in_", None) is None:
        raise ConversionError(f"the {type(source).__name__} is not fitted (or does not record n_features_in_): "
                              f"fit it before converting")
    return source


def _is_classifier(model) -> bool:
    from sklearn.base import is_classifier

    return is_classifier(model) and hasattr(model, "predict_proba")


def input_specs(model, shapes, names, dynamic_batch: bool) -> list[InputSpec]:
    features = int(model.n_features_in_)
    if names and len(names) != 1:
        raise ConversionError(f"a scikit-learn model has one input (a [N, {features}] matrix); got {len(names)} names")
    batch = None
    if shapes:
        if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][1] not in (None, features):
            raise ConversionError(f"the model takes [N, {features}] ({features} features); --input-shape gave "
                                  f"{', '.join(str(list(s)) for s in shapes)}")
        batch = shapes[0][0]
    batch = None if dynamic_batch else (batch or 1)
    return [InputSpec(names[0] if names else "input", (batch, features), np.dtype(np.float32))]


def reference(model, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = next(iter(inputs.values()))
    try:
        if _is_classifier(model):
            return {"label": np.asarray(model.predict(x)), "probabilities": np.asarray(model.predict_proba(x))}
        return {"variable": np.asarray(model.predict(x))}
    except Exception as exc:
        raise ConversionError(f"the model fails on sample inputs of shape {list(x.shape)}: "
                              f"{type(exc).__name__}: {exc}") from exc


def exact_outputs(model, names) -> list[str]:
    return names[:1] if _is_classifier(model) else []


def export(model, output: Path, target: str, inputs, specs, *, output_names=None, opset=17, dynamic_batch=True,
           float16=False, external_data=False) -> list[str]:
    if target != "onnx":
        raise ConversionError(f"a scikit-learn model converts to onnx, not {target}")
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    spec = specs[0]
    options = {"zipmap": False} if _is_classifier(model) else None
    try:
        onnx_model = to_onnx(model, initial_types=[(spec.name, FloatTensorType(list(spec.shape)))],
                             options=options, target_opset={"": opset, "ai.onnx.ml": 3})
    except Exception as exc:
        raise ConversionError(f"skl2onnx cannot convert this {type(model).__name__}: "
                              f"{type(exc).__name__}: {exc}") from exc
    graph = onnx_model.graph
    names = [o.name for o in graph.output]
    if output_names:
        if len(output_names) != len(names):
            raise ConversionError(f"{len(output_names)} output names for {len(names)} outputs ({', '.join(names)})")
        rename = dict(zip(names, output_names))
        for node in graph.node:
            node.output[:] = [rename.get(n, n) for n in node.output]
        for o in graph.output:
            o.name = rename[o.name]
        names = list(output_names)
    output.write_bytes(onnx_model.SerializeToString())
    finish_onnx(output, external_data)
    return names
