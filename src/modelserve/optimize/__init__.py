"""ONNX model -> smaller/faster ONNX model, measured: graph optimization, int8/fp16 quantization, pruning,
distillation, and the before/after report with its accuracy and speed gates.

Steps run in this order, each one optional (``OptimizeSpec`` says which):

1. PyTorch side, when there is a PyTorch module: the model given as ``pkg.module:factory`` (+ weights), or
   the distillation student. ``distill`` trains the student (``pkg.module:factory``) on the teacher's
   logits -- the teacher is the given model run by ONNX Runtime; ``prune`` prunes the module (structured:
   whole conv channels; fine-tuned when ``train_data`` is given). The module is then exported to ONNX.
2. ONNX magnitude pruning (unstructured, global threshold), when pruning was not done on the PyTorch side.
3. graph optimization (``graph.py``).
4. int8 (dynamic, or static with calibration data) or fp16 (``quantize.py``: the arithmetic is there).

Then original and result are measured (``report.py``) and two gates decide: the result is refused when it
loses more than ``max_accuracy_drop`` top-1 points on labeled ``eval_data``, or -- with ``speed_gate`` -- when
its p50 latency at batch 1 or 32 is more than ``speed_tolerance`` above the original's (measured twice
before refusing). A refused result raises ``GateRefused``; the output model is not written, the report JSON
(``OUT.report.json``) is, either way.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelserve.data import Dataset, load_dataset, onnx_input_specs, random_inputs
from modelserve.optimize.report import (
    Profile,
    Progress,
    Report,
    measure,
    remeasure_latency,
    session,
)

FACTORY_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
GENERATED_SAMPLES = 64


class OptimizeError(ValueError):
    """A model or an option the optimizer cannot work with; the message says what to change."""


class GateRefused(Exception):
    """The result lost too much accuracy or got slower; ``report`` has the figures, ``reason`` says which."""

    def __init__(self, report: Report, reason: str):
        super().__init__(reason)
        self.report, self.reason = report, reason


class OptimizeSpec(BaseModel):
    """Which optimization steps to run, with what data, and the gates the result must pass."""

    model_config = ConfigDict(extra="forbid")

    graph: Literal["none", "ort", "slim"] = "ort"
    graph_level: Literal["basic", "extended"] | None = None  # ort; None: extended, basic before int8/fp16
    quantize: Literal["dynamic", "static"] | None = None
    calibration: Path | None = None
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_size: int = Field(256, ge=1)
    per_channel: bool = False
    fp16: bool = False
    prune: float | None = None
    prune_structured: bool = False
    train_data: Path | None = None
    epochs: int = Field(5, ge=1)
    distill_student: str | None = None
    weights: Path | None = None
    pythonpath: Path | None = None
    input_shape: list[int] | None = None  # per-sample shape for exporting a PyTorch model, when no data file says
    eval_data: Path | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    max_accuracy_drop: float = Field(1.0, ge=0)
    speed_gate: bool = True
    speed_tolerance: float = Field(0.10, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _int8(cls, values):
        if isinstance(values, dict) and values.get("quantize") == "int8":  # the README's --quantize int8
            values = {**values, "quantize": "static" if values.get("calibration") else "dynamic"}
        return values

    @model_validator(mode="after")
    def _consistent(self):
        if self.quantize == "static" and self.calibration is None:
            raise ValueError("static int8 quantization needs calibration data (--calibration: a .npy/.npz file or "
                             "a folder of images); or use --quantize dynamic")
        if self.calibration is not None and self.quantize != "static":
            raise ValueError("--calibration is only used by --quantize static")
        if self.fp16 and self.quantize:
            raise ValueError("choose fp16 or int8, not both")
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise ValueError(f"--prune is the fraction of weights to zero: at least 0 and below 1, got {self.prune}")
        if self.prune_structured and self.prune is None:
            raise ValueError("structured pruning needs a target: --prune FRACTION")
        if self.distill_student and self.train_data is None:
            raise ValueError("distillation needs training data (--train-data)")
        if self.distill_student and not FACTORY_REF.match(self.distill_student):
            raise ValueError(f"--distill takes the student as pkg.module:factory, got {self.distill_student!r}")
        return self


def is_torch_reference(model: str | Path) -> bool:
    return isinstance(model, str) and not Path(model).exists() and bool(FACTORY_REF.match(model))


def check_onnx(path: Path) -> None:
    """Raise ``OptimizeError`` unless ``path`` is an ONNX model ONNX Runtime loads."""
    if not path.is_file():
        raise OptimizeError(f"{path}: no such file (give an .onnx file or a PyTorch pkg.module:factory)")
    try:
        session(path)
    except Exception as exc:  # onnxruntime raises its own types for bad files
        raise OptimizeError(f"{path}: not a valid ONNX model ({str(exc).strip()[:300]})") from exc


def optimize(model: str | Path, output: str | Path, spec: OptimizeSpec, progress: Progress = None) -> Report:
    """Run ``spec``'s steps on ``model`` (an .onnx file or ``pkg.module:factory``), write ``output`` if the gates pass."""
    output = Path(output)
    torch_model = is_torch_reference(model)
    if not torch_model:
        check_onnx(Path(model))
    if spec.prune_structured and not (torch_model or spec.distill_student):
        raise OptimizeError("structured pruning removes whole conv channels and needs the PyTorch model: give it "
                            "as pkg.module:factory with --weights instead of an .onnx file")
    if spec.prune and spec.train_data and not (torch_model or spec.distill_student):
        raise OptimizeError("fine-tuning after pruning needs the PyTorch model (pkg.module:factory with --weights); "
                            "drop --train-data to prune the ONNX weights without fine-tuning")
    steps: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="modelserve-optimize-") as tmp:
        work = Path(tmp)
        module = None
        original = Path(model)
        if torch_model:
            from modelserve.optimize.torch_side import load_and_export

            module, original = load_and_export(model, spec, work / "original.onnx", steps)
        specs = onnx_input_specs(original)
        current = original
        if spec.distill_student:
            from modelserve.optimize.torch_side import distill_student

            module = distill_student(original, spec, progress, steps)
        if module is not None and (spec.prune is not None or spec.distill_student):
            from modelserve.optimize.torch_side import prune_and_export

            current = prune_and_export(module, original, spec, work / "student.onnx", progress, steps)
        if spec.prune is not None and module is None:
            import onnx

            from modelserve.optimize.prune import magnitude_prune

            pruned = onnx.load(str(current))
            steps.append(magnitude_prune(pruned, spec.prune))
            current = work / "pruned.onnx"
            onnx.save(pruned, str(current))
        if spec.graph != "none":
            from modelserve.optimize.graph import optimize_graph

            level = spec.graph_level or ("basic" if spec.quantize or spec.fp16 else "extended")
            steps.append(optimize_graph(current, work / "graph.onnx", spec.graph, level))
            current = work / "graph.onnx"
        current = _precision(current, spec, specs, work, progress, steps)

        data = _measure_data(spec, specs)
        orig_profile, reference = measure(original, data, progress=progress)
        if torch_model:
            orig_profile.path = f"{model} (exported)"
        result_profile, _ = measure(current, data, reference, progress=progress)
        report = Report(orig_profile, result_profile, steps)
        reasons = _gates(report, spec, data, original, current)
        json_path = output.with_name(output.stem + ".report.json") if output.suffix else Path(f"{output}.report.json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if reasons:
            report.refused = "; ".join(reasons)
            report.result.path = f"{output} (not written)"
            report.write_json(json_path)
            raise GateRefused(report, report.refused)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(current, output)
        report.result.path = report.output = str(output)
        report.write_json(json_path)
    return report


def evaluate(model: str | Path, data: str | Path | None = None, mean=None, std=None,
             progress: Progress = None) -> Profile:
    """Measure one ONNX model: size, parameters, sparsity, latency, throughput; accuracy with labeled ``data``."""
    model = Path(model)
    check_onnx(model)
    dataset = None
    if data is not None:
        dataset = load_dataset(data, onnx_input_specs(model), mean=mean, std=std)
    profile, _ = measure(model, dataset, progress=progress)
    return profile


def _precision(current: Path, spec: OptimizeSpec, specs, work: Path, progress: Progress, steps: list[dict]) -> Path:
    from modelserve.optimize import quantize as q

    out = work / "precision.onnx"
    if spec.quantize == "dynamic":
        steps.append(q.quantize_dynamic_int8(current, out, per_channel=spec.per_channel))
    elif spec.quantize == "static":
        calibration = load_dataset(spec.calibration, specs, mean=spec.mean, std=spec.std, limit=spec.calibration_size)
        steps.append(q.quantize_static_int8(current, out, calibration, method=spec.calibration_method,
                                            per_channel=spec.per_channel, progress=progress))
    elif spec.fp16:
        steps.append(q.to_fp16(current, out))
    else:
        return current
    return out


def _measure_data(spec: OptimizeSpec, specs) -> Dataset:
    """Labeled eval data if given, else calibration or training inputs, else generated ones."""
    if spec.eval_data is not None:
        return load_dataset(spec.eval_data, specs, mean=spec.mean, std=spec.std)
    for path in (spec.calibration, spec.train_data):
        if path is not None:
            data = load_dataset(path, specs, mean=spec.mean, std=spec.std, limit=spec.calibration_size)
            return Dataset(data.inputs)
    return Dataset(random_inputs(specs, GENERATED_SAMPLES))


def _slower(o: Profile, r: Profile, tolerance: float) -> list[str]:
    slower = []
    for batch in (1, 32):
        before, after = o.p50(batch), r.p50(batch)
        if before and after and after > before * (1 + tolerance):
            slower.append(f"p50 at batch {batch} {after:.3g} ms vs {before:.3g} ms (+{after / before - 1:.0%})")
    return slower


def _gates(report: Report, spec: OptimizeSpec, data: Dataset, original: Path, result: Path) -> list[str]:
    o, r = report.original, report.result
    gates, reasons = report.gates, []
    if o.top1 is not None and r.top1 is not None:
        drop = 100 * (o.top1 - r.top1)
        passed = drop <= spec.max_accuracy_drop + 1e-9
        gates["accuracy"] = {"drop_points": drop, "max_drop_points": spec.max_accuracy_drop, "passed": passed}
        if not passed:
            reasons.append(f"top-1 accuracy dropped {drop:.2f} points ({o.top1:.2%} -> {r.top1:.2%}), more than "
                           f"the allowed {spec.max_accuracy_drop:g}")
    else:
        gates["notes"].append("no labeled evaluation data (--eval-data): accuracy not measured and not gated; "
                              f"max abs output difference vs the original: {r.max_abs_diff}")
    slower = _slower(o, r, spec.speed_tolerance)
    remeasured = False
    if slower and spec.speed_gate:  # this box is noisy: measure both again before refusing
        remeasure_latency(o, original, data)
        remeasure_latency(r, result, data)
        slower, remeasured = _slower(o, r, spec.speed_tolerance), True
    gates["speed"] = {"enabled": spec.speed_gate, "tolerance": spec.speed_tolerance, "slower": slower,
                      "remeasured": remeasured, "passed": not slower}
    if slower:
        what = "slower than the original on this machine: " + ", ".join(slower)
        if spec.speed_gate:
            reasons.append(what + " (integer or fp16 kernels can be slower than float ones on CPUs without "
                                  "fast int8/fp16 support; --no-speed-gate keeps it anyway)")
        else:
            gates["notes"].append(what + "; kept because the speed gate is off")
    return reasons
