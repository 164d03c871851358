"""Lower-precision ONNX models: int8 (dynamic or static, ONNX Runtime's quantizer) and fp16.

**Linear (affine) quantization.** A float tensor is stored as 8-bit integers ``q`` plus a ``scale`` (float)
and a ``zero_point`` (an integer of the same type as ``q``):

    real = scale * (q - zero_point)          q = clamp(round(real / scale) + zero_point, qmin, qmax)

For a range [rmin, rmax] that must hold, with rmin <= 0 <= rmax so that 0.0 is exact:
``scale = (rmax - rmin) / (qmax - qmin)`` and ``zero_point = qmin - round(rmin / scale)``. Weights are
quantized symmetrically (int8, zero_point = 0, range +-max|w|), per tensor or -- ``per_channel`` -- with one
scale per output channel, which keeps small channels precise. Activations need a range too:

* **dynamic**: weights are quantized offline; each activation's range is measured on the fly at every
  run (``DynamicQuantizeLinear``). No calibration data, but the integer ops (``MatMulInteger``,
  ``ConvInteger``) can be slower than float ones on CPUs -- the report's speed gate says so.
* **static**: the activations' ranges are fixed offline from calibration data run through the float model:
  ``minmax`` takes the observed min/max, ``entropy`` picks the range whose quantized histogram loses the
  least information (KL divergence), ``percentile`` clips outliers at the 99.999th percentile of |x|. The
  model is written in QDQ format: ``QuantizeLinear``/``DequantizeLinear`` pairs around each quantized op,
  which ONNX Runtime fuses into integer kernels at load time and which other runtimes (TensorRT,
  OpenVINO) read as well. ``quant_pre_process`` (shape inference and basic graph optimization) runs first
  when it works on the model; when it fails the model is quantized as it is.

Inputs and outputs stay float32 either way (quantize/dequantize happen inside the graph).

**fp16** stores weights and computes in IEEE half precision (range +-65504, ~3 significant digits);
``keep_io_types=True`` keeps float32 inputs and outputs, with casts at the edges, so clients do not change.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from modelserve.data import Dataset
from modelserve.logs import quiet

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_BATCH = 32
Progress = Callable[[str, int, int], None] | None


def quantize_dynamic_int8(source: Path, output: Path, *, per_channel: bool = False) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet(""):
        quantize_dynamic(str(source), str(output), per_channel=per_channel, weight_type=QuantType.QInt8)
    return {"step": "quantize", "method": "int8 dynamic", "per_channel": per_channel}


class _Reader:
    """The calibration data as batches, for ``quantize_static`` (an ``onnxruntime`` ``CalibrationDataReader``)."""

    def __init__(self, data: Dataset, batch: int, progress: Progress):
        self.data, self.batch, self.progress = data, batch, progress
        self.total = -(-len(data) // batch)
        self.rewind()

    def rewind(self) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(self.data.batches(self.batch))
        self._done = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is not None and self.progress:
            self._done += 1
            self.progress("calibrating", self._done, self.total)
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def quantize_static_int8(source: Path, output: Path, calibration: Dataset, *, method: str = "minmax",
                         per_channel: bool = False, progress: Progress = None) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if len(calibration) == 0:
        raise ValueError("the calibration data has no samples")
    reader_type = type("CalibrationReader", (_Reader, CalibrationDataReader), {})
    step = {"step": "quantize", "method": "int8 static QDQ", "calibration_method": method,
            "calibration_samples": len(calibration), "per_channel": per_channel, "pre_process": True}
    with tempfile.TemporaryDirectory() as tmp:
        model_in = source
        try:
            with quiet(""):
                quant_pre_process(str(source), str(Path(tmp) / "pre.onnx"))
            model_in = Path(tmp) / "pre.onnx"
        except Exception as exc:  # noqa: BLE001 -- pre-processing is an improvement, not a requirement
            step["pre_process"] = f"skipped: {type(exc).__name__}: {exc}"[:300]
        with quiet(""):
            quantize_static(
                str(model_in), str(output), reader_type(calibration, CALIBRATION_BATCH, progress),
                quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
                calibration_cache_path=None,
            )
    return step


def to_fp16(source: Path, output: Path) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(output))
    return {"step": "fp16", "method": "float16 weights and compute, float32 inputs/outputs"}

