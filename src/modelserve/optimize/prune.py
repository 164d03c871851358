"""Unstructured magnitude pruning of an ONNX model's weights, and the weight census the report uses.

The weights are the initializers that Conv, ConvTranspose, Gemm and MatMul nodes multiply with (for Gemm
and Conv the second input; for MatMul whichever input is an initializer). Biases are left alone. Pruning
to sparsity ``s`` zeroes the ``s`` fraction of all those weights with the smallest magnitude, under one
threshold for the whole model (global, not per layer), so that layers with many small weights give more.

The file does not shrink (ONNX stores dense tensors) and dense kernels do not get faster; pruning pays
off through compression of the file, through sparse kernels elsewhere, or when followed by structured
pruning (``torch_steps``) -- the report measures what it did.

``weight_tensors`` also finds weights behind ``DequantizeLinear``/``Cast`` (QDQ int8, fp16 models) and the
weight inputs of integer ops (``ConvInteger``, ``MatMulInteger``, ``QLinearConv``, ``QLinearMatMul``), so
``sparsity`` reads the fraction of zero weights of any model this package writes (a quantized weight is
zero when it equals its zero point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# op type -> indices of inputs holding weights (MatMul: either side) and, for integer ops, of their zero points
WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (0, 1),
                 "FusedConv": (1,), "FusedGemm": (1,), "FusedMatMul": (0, 1)}  # the last three: ORT's fused ops
INTEGER_WEIGHT_INPUTS = {"ConvInteger": (1, 3), "MatMulInteger": (1, 3), "QLinearConv": (3, 5),
                         "QLinearMatMul": (3, 5), "DynamicQuantizeMatMul": (1, 3)}
PASS_THROUGH = {"Cast", "Identity"}


@dataclass
class Weight:
    """One weight initializer: its name, values and the stored value that means zero (a zero point, or 0)."""

    name: str
    values: np.ndarray
    zero: np.ndarray | float = 0.0

    def zeros(self) -> int:
        zero = self.zero
        if isinstance(zero, np.ndarray) and zero.ndim == 1 and zero.size > 1:  # per-channel zero points: axis 0
            zero = zero.reshape((-1,) + (1,) * (self.values.ndim - 1))
        return int(np.count_nonzero(self.values == zero))


def weight_tensors(model: onnx.ModelProto) -> list[Weight]:
    """The weight initializers of ``model`` (see the module doc), each once."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, Weight] = {}

    def resolve(name: str) -> Weight | None:
        seen = 0
        while name not in inits and name in producer and seen < 4:
            node, seen = producer[name], seen + 1
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
                zero = numpy_helper.to_array(inits[zp]) if zp in inits else 0.0
                return Weight(node.input[0], numpy_helper.to_array(inits[node.input[0]]), zero)
            if node.op_type not in PASS_THROUGH and node.op_type != "DequantizeLinear":
                return None
            name = node.input[0]
        return Weight(name, numpy_helper.to_array(inits[name])) if name in inits else None

    for node in model.graph.node:
        if node.op_type in WEIGHT_INPUTS:
            for i in WEIGHT_INPUTS[node.op_type]:
                w = resolve(node.input[i]) if i < len(node.input) else None
                if w is not None and w.values.ndim >= 2:
                    found.setdefault(w.name, w)
        elif node.op_type in INTEGER_WEIGHT_INPUTS:
            wi, zi = INTEGER_WEIGHT_INPUTS[node.op_type]
            if wi < len(node.input) and node.input[wi] in inits:
                zp = node.input[zi] if zi < len(node.input) else ""
                zero = numpy_helper.to_array(inits[zp]) if zp in inits else 0.0
                found.setdefault(node.input[wi], Weight(node.input[wi], numpy_helper.to_array(inits[node.input[wi]]),
                                                        zero))
    return list(found.values())


def sparsity(model: onnx.ModelProto) -> float:
    """Fraction of zero weights (see ``weight_tensors``); 0.0 for a model without any."""
    weights = weight_tensors(model)
    total = sum(w.values.size for w in weights)
    return sum(w.zeros() for w in weights) / total if total else 0.0


def magnitude_prune(model: onnx.ModelProto, target: float) -> dict:
    """Zero the ``target`` fraction of smallest-magnitude float weights of ``model`` in place; returns what it did."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"pruning sparsity must be at least 0 and below 1, got {target}")
    inits = {t.name: t for t in model.graph.initializer}
    weights = [w for w in weight_tensors(model) if w.values.dtype.kind == "f" and w.name in inits]
    if not weights:
        raise ValueError("nothing to prune: the model has no float Conv/Gemm/MatMul weight initializers")
    flat = np.concatenate([np.abs(w.values.astype(np.float32)).ravel() for w in weights])
    k = round(target * flat.size)
    threshold = 0.0
    if k:
        order = np.argpartition(flat, k - 1)[:k]  # exactly k weights, ties broken by position
        threshold = float(flat[order].max())
        mask = np.ones(flat.size, bool)
        mask[order] = False
        start = 0
        for w in weights:
            keep = mask[start:start + w.values.size].reshape(w.values.shape)
            start += w.values.size
            pruned = np.where(keep, w.values, np.zeros((), w.values.dtype))
            inits[w.name].CopyFrom(numpy_helper.from_array(pruned, w.name))
    return {"step": "prune", "method": "magnitude, unstructured, global threshold", "target": target,
            "threshold": threshold, "weights": int(flat.size), "zeroed": k, "tensors": len(weights),
            "sparsity": sparsity(model)}
