"""Framework model -> deployable file (ONNX, or TFLite / TorchScript where asked), checked by running both.

``convert`` picks the framework from the source, exports, then runs source and result on the same
sample inputs and refuses (``ConversionDrift``) a result whose outputs differ by more than the
tolerance. Each framework lives in its own module and is imported only when used, so the server and
the other converters need none of them.
"""

from __future__ import annotations

# CONTRACT (filled in by the convert work):
#
# class ConversionError(ValueError): a source that cannot be converted: unknown format, missing extra
#     (message says which `pip install modelserve[...]`), pickle without trust_pickle (says why), bad shapes.
# class ConversionDrift(ConversionError): verification failed; has .verification; message has the numbers.
# @dataclass Verification: max_abs_error, max_rel_error, atol, rtol, samples, outputs (names), passed; to_dict()
# @dataclass ConversionResult: output: Path, framework: str, target: str, verification: Verification,
#     inputs: list[InputSpec]; to_dict()
#
# def convert(source, output, *, to="onnx", weights=None, input_shapes=None, input_names=None,
#             output_names=None, sample=None, opset=17, dynamic_batch=True, float16=False,
#             trust_pickle=False, atol=1e-4, rtol=1e-3, external_data=False, pythonpath=None) -> ConversionResult
#   source: a path (.pt/.pth TorchScript, .pt2 torch.export, .keras, .h5, SavedModel folder,
#           .pkl/.pickle/.joblib scikit-learn) or "pkg.module:factory" (factory() -> nn.Module or keras Model;
#           weights = state-dict / weights file), or an in-memory nn.Module / keras Model / sklearn estimator.
#
# modelserve.convert.torch exposes, for modelserve.optimize:
#   load_module(source: str, weights=None, pythonpath=None) -> torch.nn.Module   (eval mode)
#   export_onnx(module, output: Path, sample: dict[str, np.ndarray] | tuple-of-arrays, *, input_names,
#               output_names, opset=17, dynamic_batch=True, external_data=False) -> Path
