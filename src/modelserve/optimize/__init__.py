"""ONNX model -> smaller/faster ONNX model, measured: graph optimization, int8/fp16 quantization, pruning,
distillation, and the before/after report with its accuracy and speed gates.
"""

from __future__ import annotations

# CONTRACT (filled in by the optimize work):
#
# class OptimizeSpec(pydantic BaseModel): graph ("none"|"ort"|"slim", default "ort"), quantize (None|"dynamic"|
#     "static"), calibration (Path|None), calibration_method ("minmax"|"entropy"|"percentile"), calibration_size
#     (int), per_channel (bool), fp16 (bool), prune (float|None, target sparsity 0..1), prune_structured (bool),
#     train_data (Path|None), epochs (int), distill_student (str|None "pkg.mod:factory"), weights (Path|None: the
#     state dict when the model is a PyTorch "pkg.mod:factory"), pythonpath, eval_data (Path|None), mean/std,
#     max_accuracy_drop (points, default 1.0), speed_gate (bool, default True), speed_tolerance (0.10)
# class GateRefused(Exception): .report, .reason; the output model is not written, the report JSON is.
# def optimize(model: str|Path, output: Path, spec: OptimizeSpec, progress=None) -> Report
#     model: an .onnx file, or a PyTorch "pkg.mod:factory" (+ spec.weights) -- needed for structured pruning and
#     fine-tuning; it is exported with modelserve.convert.torch.export_onnx first.
# def evaluate(model: Path, data: Path|None, ...) -> Profile     (modelserve evaluate)
# report.py: Profile (size_bytes, parameters, sparsity, latency p50/p95 at batch 1 and 32, throughput,
#     top1/top5, agreement, max_abs_diff), Report(original, result, steps, gates, refused) with
#     to_dict()/write_json(path)/rich table.
#
# modelserve.optimize.torch_steps (PyTorch-side steps) exposes:
#   prune_module(module, sparsity: float, *, structured: bool = False, train: Dataset | None = None,
#                epochs: int = 3, progress=None) -> nn.Module
#       unstructured: global L1 magnitude over Conv/Linear weights; structured: L2-norm output channels of
#       Conv2d layers (channels removed for real when the next layer allows, so the file shrinks; else zeroed).
#       With `train`, fine-tunes with cross-entropy on train.labels, keeping the pruned weights at zero.
#   distill(teacher: Callable[[np.ndarray], np.ndarray], student: nn.Module, train: Dataset, *, epochs=10,
#           temperature=4.0, alpha=0.5, progress=None) -> nn.Module
#       teacher maps a batch of the (single) input to logits -- e.g. an ONNX Runtime session of the teacher.
