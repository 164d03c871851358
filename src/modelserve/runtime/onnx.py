"""The ONNX Runtime engine: execution providers from config, thread settings, every V2 datatype."""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import onnxruntime as ort

from modelserve.datatypes import BF16
from modelserve.errors import InvalidInput, ModelLoadError
from modelserve.runtime import Runtime, TensorSpec

log = logging.getLogger(__name__)

_V2_OF_ORT_TYPE = {
    "tensor(float)": "FP32", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(uint16)": "UINT16",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(string)": "BYTES",
    "tensor(bool)": "BOOL", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bfloat16)": "BF16",
}
_OPT_LEVEL = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# short names accepted in configs (Triton's accelerator names included)
_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider",
}


class OnnxRuntime(Runtime):
    platform = "onnxruntime_onnx"

    def load(self) -> None:
        if not self.model_file.is_file():
            raise ModelLoadError(f"model file {self.model_file} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.intra_op_threads
        opts.inter_op_num_threads = self.options.inter_op_threads
        opts.graph_optimization_level = _OPT_LEVEL.get(self.options.graph_optimization, _OPT_LEVEL["all"])
        opts.log_severity_level = 3
        providers = self._providers()
        try:
            # a path (not bytes) so that external data files beside the model are found
            self.session = ort.InferenceSession(str(self.model_file), opts, providers=providers)
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise ModelLoadError(f"ONNX Runtime cannot load {self.model_file.name}: {exc}") from None
        self._inputs = {i.name: i.type for i in self.session.get_inputs()}
        self._bf16_inputs = {n for n, t in self._inputs.items() if t == "tensor(bfloat16)"}
        self._string_inputs = {n for n, t in self._inputs.items() if t == "tensor(string)"}
        self._output_types = {o.name: o.type for o in self.session.get_outputs()}
        self._bf16 = bool(self._bf16_inputs) or "tensor(bfloat16)" in self._output_types.values()
        self._string_outputs = {n for n, t in self._output_types.items() if t == "tensor(string)"}
        self._all_outputs = list(self._output_types)

    def _providers(self) -> list[str]:
        available = ort.get_available_providers()
        wanted = [_PROVIDER_ALIASES.get(p.lower(), p) for p in self.options.execution_providers] or ["CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        for p in wanted:
            if p not in available:
                log.warning("%s: execution provider %s is not installed; available: %s", self.model_file, p, available)
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        def spec(arg) -> TensorSpec:
            if arg.type not in _V2_OF_ORT_TYPE:
                raise ModelLoadError(f"{self.model_file.name}: tensor '{arg.name}' has unsupported type {arg.type}")
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
            return TensorSpec(arg.name, _V2_OF_ORT_TYPE[arg.type], dims)

        return [spec(i) for i in self.session.get_inputs()], [spec(o) for o in self.session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self._all_outputs
        feeds = {}
        for name, array in inputs.items():
            if name in self._string_inputs:
                array = _to_text(array, name)
            feeds[name] = array
        try:
            if self._bf16:
                return self._infer_ort_values(feeds, names)
            results = dict(zip(names, self.session.run(names, feeds)))
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(f"model rejected the input: {exc}") from None
        for name in self._string_outputs.intersection(results):
            results[name] = _to_bytes(results[name])
        return results

    def _infer_ort_values(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        # numpy has no bfloat16 ORT understands: hand ORT raw 16-bit buffers tagged as bfloat16
        values = {
            n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(a).view(np.uint16), 16)
            if n in self._bf16_inputs else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            for n, a in feeds.items()
        }
        results = self.session.run_with_ort_values(names, values)
        out = {}
        for name, value in zip(names, results):
            if self._output_types[name] == "tensor(bfloat16)":
                shape = value.shape()
                count = int(np.prod(shape, dtype=np.int64))
                raw = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else []
                out[name] = np.array(raw, dtype=np.uint16).view(BF16).reshape(shape)
            else:
                out[name] = value.numpy()
        return out


def _to_text(array: np.ndarray, name: str) -> np.ndarray:
    # ONNX string tensors hold text; ORT takes str objects
    try:
        return np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])(array) \
            if array.size else array.astype(object)
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}': BYTES elements must be UTF-8 text for this ONNX model") from None


def _to_bytes(array: np.ndarray) -> np.ndarray:
    if not array.size:
        return array
    return np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else bytes(s), otypes=[object])(array)

