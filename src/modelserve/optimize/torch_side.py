"""The PyTorch side of the pipeline: load a ``pkg.module:factory`` model and export it, distill an ONNX teacher
into a PyTorch student, prune a module (``torch_steps``), and export the result with the ONNX model's io names.
Imported only when a PyTorch step runs, so ONNX-only optimization needs no torch.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx

from modelserve.data import load_dataset, onnx_input_specs, random_inputs
from modelserve.optimize import OptimizeError, OptimizeSpec
from modelserve.optimize.report import Progress, classifier_output, session


def load_and_export(model: str, spec: OptimizeSpec, output: Path, steps: list[dict]):
    """(the module, its unpruned ONNX export at ``output``): the report's original."""
    from modelserve.convert.torch import export_onnx, load_module

    module = load_module(model, spec.weights, spec.pythonpath)
    path = export_onnx(copy.deepcopy(module), output, _sample(spec), input_names=["input"], output_names=None)
    steps.append({"step": "export", "source": model})
    return module, Path(path)


def _sample(spec: OptimizeSpec):
    """One sample input for exporting a PyTorch model: from --input-shape, else the first data file's arrays."""
    if spec.input_shape:
        return np.zeros([1, *spec.input_shape], np.float32)
    for path in (spec.train_data, spec.calibration, spec.eval_data):
        if path is not None and path.suffix == ".npy":
            return np.load(path, mmap_mode="r")[:1].astype(np.float32)
        if path is not None and path.suffix == ".npz":
            with np.load(path) as npz:
                name = "x" if "x" in npz.files else next(k for k in npz.files if k not in ("labels", "y"))
                return np.ascontiguousarray(npz[name][:1]).astype(np.float32)
    raise OptimizeError("cannot tell the PyTorch model's input shape: give input_shape (per sample, e.g. 3,224,224) "
                        "or a .npy/.npz file as train, calibration or evaluation data")


def distill_student(teacher_path: Path, spec: OptimizeSpec, progress: Progress, steps: list[dict]):
    """The student (``spec.distill_student``) trained on the ONNX teacher's logits over ``spec.train_data``."""
    from modelserve.convert.torch import load_module
    from modelserve.optimize.torch_steps import distill

    specs = onnx_input_specs(teacher_path)
    if len(specs) != 1:
        raise OptimizeError(f"distillation takes a one-input teacher; this one has {len(specs)} inputs")
    teacher = session(teacher_path)
    train = load_dataset(spec.train_data, specs, mean=spec.mean, std=spec.std)

    def teacher_fn(x):
        out = classifier_output(teacher.run(None, {specs[0].name: x}), len(x))
        if out is None:
            raise OptimizeError("distillation needs a teacher with a [batch, classes] output")
        return out

    student = load_module(spec.distill_student, None, spec.pythonpath)
    student = distill(teacher_fn, student, train, epochs=spec.epochs, progress=progress)
    steps.append({"step": "distill", "student": spec.distill_student, "epochs": spec.epochs, "samples": len(train)})
    return student


def prune_and_export(module, original: Path, spec: OptimizeSpec, output: Path, progress: Progress,
                     steps: list[dict]) -> Path:
    """Prune ``module`` if asked (fine-tuned on ``spec.train_data``), then export it with ``original``'s io names."""
    from modelserve.convert.torch import export_onnx

    specs = onnx_input_specs(original)
    if spec.prune is not None:
        from modelserve.optimize.torch_steps import prune_info, prune_module

        train = load_dataset(spec.train_data, specs, mean=spec.mean, std=spec.std) if spec.train_data else None
        module = prune_module(module, spec.prune, structured=spec.prune_structured, train=train, epochs=spec.epochs,
                              progress=progress)
        info = prune_info(module)
        step = {"step": "prune", "method": "structured (conv channels)" if spec.prune_structured else
                "magnitude, unstructured (PyTorch)", "target": spec.prune, "fine_tuned": train is not None}
        if info is not None:
            step.update(sparsity=info.sparsity, parameters_before=info.parameters_before,
                        parameters_after=info.parameters_after, notes=info.notes)
        steps.append(step)
    output_names = [o.name for o in onnx.load(str(original), load_external_data=False).graph.output]
    sample = random_inputs(specs, 1)
    path = export_onnx(module, output, sample, input_names=[s.name for s in specs],
                       output_names=output_names if spec.distill_student is None else output_names[:1])
    steps.append({"step": "export", "source": ("distilled student " + spec.distill_student if spec.distill_student
                                               else "pruned PyTorch module")})
    return Path(path)
