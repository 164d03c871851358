"""Graph optimization: rewrite an ONNX graph into an equivalent, cheaper one (same outputs, same weights).

Two engines:

* ``ort`` -- ONNX Runtime's offline optimization: a CPU session is created with
  ``SessionOptions.optimized_model_filepath`` set, and the graph it would run is saved. ``basic`` level
  does provider-independent rewrites with standard ops only (constant folding, dead node and redundant
  node elimination, Conv+BatchNorm/Add/Mul fusion); ``extended`` adds ONNX Runtime's fused contrib ops
  (``com.microsoft`` FusedConv, FusedGemm, GELU/LayerNorm/attention fusions). An ``extended`` file runs on
  ONNX Runtime only, and is best kept for the provider it was made with (CPU here). The layout level
  (NCHWc, tied to the exact CPU) is never written to a file.
* ``slim`` -- onnxslim: constant folding, dead code removal, common subexpression elimination and pattern
  fusions, with standard ops only, so the result stays portable to any ONNX runtime.

Before int8 or fp16 conversion the pipeline asks for ``basic``: the quantizer and the fp16 converter know
the standard ops, not the fused contrib ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

LEVELS = ("basic", "extended")


def optimize_graph(source: Path, output: Path, method: str = "ort", level: str = "extended") -> dict:
    """Write the graph-optimized ``source`` to ``output``; returns what was done (node counts before and after)."""
    before = _node_count(source)
    if method == "ort":
        _ort(source, output, level)
    elif method == "slim":
        _slim(source, output)
    elif method == "none":
        output.write_bytes(source.read_bytes())
    else:
        raise ValueError(f"graph optimization must be ort, slim or none, got {method!r}")
    step = {"step": "graph", "method": method, "nodes_before": before, "nodes_after": _node_count(output)}
    if method == "ort":
        step["level"] = level
    return step


def _ort(source: Path, output: Path, level: str) -> None:
    import onnxruntime as ort

    if level not in LEVELS:
        raise ValueError(f"graph optimization level must be one of {', '.join(LEVELS)}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == "basic"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    options.optimized_model_filepath = str(output)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    if not output.exists():
        raise RuntimeError(f"ONNX Runtime did not write the optimized model to {output}")


def _slim(source: Path, output: Path) -> None:
    try:
        import onnxslim
    except ImportError as exc:
        raise ValueError("graph optimization 'slim' needs onnxslim: pip install 'modelserve[slim]'") from exc
    model = onnxslim.slim(onnx.load(str(source)))
    if model is None:
        raise RuntimeError(f"onnxslim could not optimize {source}")
    with tempfile.TemporaryDirectory() as tmp:  # validate before replacing anything
        tmp_path = Path(tmp) / output.name
        onnx.save(model, str(tmp_path))
        onnx.checker.check_model(str(tmp_path))
        output.write_bytes(tmp_path.read_bytes())


def _node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)
