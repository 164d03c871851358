"""PyTorch -> ONNX (torch.export-based exporter, legacy TorchScript exporter as the fallback) or TorchScript.

Sources: an ``nn.Module`` (in memory or built by ``pkg.module:factory`` plus a state dict), a TorchScript
file (.pt/.pth, legacy exporter only) or a ``torch.export`` program (.pt2, new exporter only; its own
dynamic dims decide the batch axis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelserve.convert import (
    ConversionError,
    finish_onnx,
    import_factory,
    remove_output,
    short_error,
)
from modelserve.data import InputSpec
from modelserve.logs import quiet

QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "torch._subclasses",
                 "torch.utils._sympy", "onnxscript", "onnx_ir")


@dataclass
class TorchSource:
    module: nn.Module  # what runs (ExportedProgram.module() for .pt2)
    program: Any = None  # the torch.export.ExportedProgram of a .pt2 file


def load_module(source: str | Path | nn.Module, weights: str | Path | None = None,
                pythonpath: str | Path | None = None) -> nn.Module:
    """An ``nn.Module`` in eval mode from ``pkg.module:factory`` (+ state dict), a TorchScript or a .pt2 file."""
    if isinstance(source, str) and not Path(source).exists() and ":" in source:
        source = import_factory(source, pythonpath)()
        if not isinstance(source, nn.Module):
            raise ConversionError(f"the factory returned a {type(source).__name__}, not a torch nn.Module")
    return load(source, weights=weights).module


def load(source: Any, *, weights=None, pythonpath=None, trust_pickle: bool = False) -> TorchSource:
    program = None
    if isinstance(source, nn.Module):
        module = source
    elif isinstance(source, torch.export.ExportedProgram):
        program, module = source, source.module()
    else:
        path = Path(source)
        if path.suffix == ".pt2":
            try:
                program = torch.export.load(str(path))
            except Exception as exc:
                raise ConversionError(f"{path}: not a torch.export program (torch.export.save): {short_error(exc)}") from exc
            module = program.module()
        else:
            module = _load_script(path)
    if weights is not None:
        if program is not None:
            raise ConversionError("a .pt2 program carries its weights: drop --weights")
        _load_weights(module, Path(weights))
    if program is None:
        module.eval()
    return TorchSource(module, program)


def _load_script(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        try:
            content = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            content = None
        if isinstance(content, Mapping):
            raise ConversionError(
                f"{path} holds a state dict (weights only), not a model: name the code that builds the module, "
                f"e.g. `modelserve convert mypkg.nets:build --weights {path} ...` (convert(\"mypkg.nets:build\", "
                f"weights=...) in Python)") from exc
        raise ConversionError(f"{path} is not a TorchScript file (torch.jit.save) nor a state dict: {short_error(exc)}. "
                              f"Save a TorchScript module, a torch.export .pt2 program, or pass "
                              f"pkg.module:factory with --weights") from exc


def _load_weights(module: nn.Module, path: Path) -> None:
    try:
        with quiet(*QUIET_LOGGERS):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"{path}: not a state dict torch.load can read safely (weights_only): {short_error(exc)}. "
                              f"Save it with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ConversionError(f"the weights in {path} do not fit the module: {exc}") from exc


def input_specs(model: TorchSource, shapes, names, dynamic_batch: bool) -> list[InputSpec] | None:
    if shapes:
        names = names or (["input"] if len(shapes) == 1 else [f"input{i}" for i in range(len(shapes))])
        if len(names) != len(shapes):
            raise ConversionError(f"{len(names)} input names for {len(shapes)} input shapes")
        return [InputSpec(n, (None if dynamic_batch else s[0], *s[1:]), np.dtype(np.float32))
                for n, s in zip(names, shapes)]
    if model.program is None:
        return None
    nodes = {n.name: n for n in model.program.graph.nodes if n.op == "placeholder"}
    user = [nodes[n] for n in model.program.graph_signature.user_inputs]
    names = names or [n.name for n in user]
    specs = []
    for name, node in zip(names, user):
        val = node.meta["val"]
        specs.append(InputSpec(name, tuple(d if isinstance(d, int) else None for d in val.shape),
                               torch.empty(0, dtype=val.dtype).numpy().dtype))
    return specs


def reference(model: TorchSource, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()]
    try:
        with torch.no_grad():
            arrays = flatten_outputs(model.module(*tensors))
    except Exception as exc:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
        raise ConversionError(f"the model fails on sample inputs {shapes}: {short_error(exc)}. Check --input-shape "
                              f"(or --sample) against what its forward() expects") from exc
    return {f"output{i}": a for i, a in enumerate(arrays)}


def exact_outputs(model, names) -> list[str]:
    return []


def export(model: TorchSource, output: Path, target: str, inputs, specs, *, output_names=None, opset=17,
           dynamic_batch=True, float16=False, external_data=False) -> list[str]:
    example = _example(inputs, dynamic_batch)
    if target == "onnx":
        source = model.program if model.program is not None else model.module
        export_onnx(source, output, example, input_names=[s.name for s in specs], output_names=output_names,
                    opset=opset, dynamic_batch=dynamic_batch, external_data=external_data)
        import onnx

        return [o.name for o in onnx.load(str(output), load_external_data=False).graph.output]
    if target == "torchscript":
        return export_torchscript(model.module, output, example)
    raise ConversionError(f"a PyTorch model converts to onnx or torchscript, not {target} "
                          f"(for TFLite, convert to ONNX and use an ONNX-to-TFLite tool)")


def export_onnx(module, output: Path, sample, *, input_names: Sequence[str] | None, output_names=None,
                opset: int = 17, dynamic_batch: bool = True, external_data: bool = False) -> Path:
    """Write ``module`` as ONNX: torch.export-based exporter first, then the legacy one; one file unless asked.

    ``sample``: input arrays (a dict by input name, a tuple, or one array) with the batch along axis 0.
    ``module``: an ``nn.Module``, a ``torch.jit.ScriptModule`` (legacy exporter only) or an
    ``ExportedProgram`` (new exporter only; its own dynamic dims apply). Raises ``ConversionError``.
    """
    output = Path(output)
    arrays = list(sample.values()) if isinstance(sample, Mapping) else \
        [sample] if isinstance(sample, np.ndarray) else list(sample)
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    input_names = list(input_names or (["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]))
    is_program = isinstance(module, torch.export.ExportedProgram)
    if output_names is None:
        with torch.no_grad():
            count = len(flatten_outputs((module.module() if is_program else module)(*args)))
        output_names = ["output"] if count == 1 else [f"output{i}" for i in range(count)]
    output_names = list(output_names)
    output.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    if not isinstance(module, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        batch = torch.export.Dim("batch")
        dynamic = None if is_program or not dynamic_batch else tuple({0: batch} for _ in args)
        try:
            with quiet(*QUIET_LOGGERS):
                torch.onnx.export(module, args, str(output), dynamo=True, input_names=input_names,
                                  output_names=output_names, opset_version=opset, dynamic_shapes=dynamic,
                                  external_data=external_data, verbose=False)
            return finish_onnx(output, external_data)
        except Exception as exc:
            errors.append(f"torch.export-based exporter: {short_error(exc)}")
            remove_output(output)
    if not is_program:
        axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
        try:
            with quiet(*QUIET_LOGGERS):
                torch.onnx.export(module, args, str(output), dynamo=False, input_names=input_names,
                                  output_names=output_names, opset_version=opset, dynamic_axes=axes)
            return finish_onnx(output, external_data)
        except Exception as exc:
            errors.append(f"TorchScript-based exporter: {short_error(exc)}")
            remove_output(output)
    raise ConversionError("PyTorch could not export the model to ONNX; " + "; ".join(errors))


def export_torchscript(module: nn.Module, output: Path, example: Mapping[str, np.ndarray]) -> list[str]:
    if not isinstance(module, torch.jit.ScriptModule):
        args = tuple(torch.from_numpy(v) for v in example.values())
        try:
            with quiet(*QUIET_LOGGERS), torch.no_grad():
                module = torch.jit.trace(module, args)
        except Exception as exc:
            raise ConversionError(f"torch.jit.trace failed: {short_error(exc)}") from exc
    with quiet(*QUIET_LOGGERS):
        torch.jit.save(module, str(output))
    with torch.no_grad():
        count = len(flatten_outputs(module(*(torch.from_numpy(v) for v in example.values()))))
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def flatten_outputs(out) -> list[np.ndarray]:
    """Tensors of a forward() result (a tensor, tuples/lists/dicts of them) as numpy arrays, in order."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, Mapping):
        return [a for v in out.values() for a in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [a for v in out for a in flatten_outputs(v)]
    return [np.asarray(out)]


def _example(inputs: Mapping[str, np.ndarray], dynamic_batch: bool) -> dict[str, np.ndarray]:
    """The export example: two samples when the batch is dynamic (torch.export specializes a size of 1)."""
    if not dynamic_batch:
        return {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    return {k: np.ascontiguousarray(v[:2] if len(v) >= 2 else np.concatenate([v, v])) for k, v in inputs.items()}


