"""modelserve optimize / evaluate on the digits CNN: real data, real ONNX Runtime, the CLI for the main paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import needs
from onnx import numpy_helper

pytestmark = needs("torch")

MODELSERVE = Path(sys.executable).parent / "modelserve"


def cli(*args, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run the modelserve command; stderr comes back with rich's line wrapping undone."""
    res = subprocess.run([str(MODELSERVE), *map(str, args)], check=False, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "COLUMNS": "250"})
    res.stderr = " ".join(res.stderr.split())
    return res


@pytest.fixture(scope="module")
def cnn_onnx(digits_cnn, tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("optimize") / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(digits_cnn["module"], torch.zeros(1, 1, 8, 8), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    return path


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def held_out(digits_data) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits_data["test"]) as npz:
        return npz["x"], npz["labels"]


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def report_of(output: Path) -> dict:
    return json.loads(output.with_name(output.stem + ".report.json").read_text())


# --- int8 ------------------------------------------------------------------------------------------------------


def test_static_int8_cli_is_smaller_and_keeps_accuracy(cnn_onnx, digits_data, digits_cnn, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "cnn-int8.onnx"
    res = cli("optimize", cnn_onnx, "-o", out, "--quantize", "static", "--calibration", digits_data["train"],
              "--eval-data", digits_data["test"], "--no-speed-gate")
    assert res.returncode == 0, res.stderr + res.stdout
    report = report_of(out)
    assert report["accepted"] and report["refused"] is None
    assert report["summary"]["size_ratio"] >= 3.5
    assert report["summary"]["top1_drop_points"] <= 1.0
    assert report["gates"]["accuracy"]["passed"]
    assert cnn_onnx.stat().st_size / out.stat().st_size >= 3.5  # the files themselves
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(out)  # QDQ format
    assert any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(out)).graph.initializer)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)"]
    x, labels = held_out(digits_data)
    top1 = float((run_model(out, x).argmax(1) == labels).mean())
    assert top1 >= digits_cnn["accuracy"] - 0.01
    assert abs(top1 - report["result"]["top1"]) < 1e-9
    assert "size" in res.stdout and "top-1" in res.stdout  # the rich table


@pytest.mark.parametrize("method,per_channel", [("entropy", False), ("percentile", False), ("minmax", True)])
def test_static_int8_methods(cnn_onnx, digits_data, tmp_path, method, per_channel):
    from modelserve.optimize import OptimizeSpec, optimize

    calls = []
    spec = OptimizeSpec(quantize="static", calibration=digits_data["train"], calibration_method=method,
                        per_channel=per_channel, calibration_size=128, eval_data=digits_data["test"], speed_gate=False)
    report = optimize(cnn_onnx, tmp_path / "q.onnx", spec, progress=lambda *a: calls.append(a))
    step = report.steps[-1]
    assert step["calibration_method"] == method and step["calibration_samples"] == 128
    assert report.to_dict()["summary"]["top1_drop_points"] <= 1.0
    assert report.result.agreement >= 0.98
    assert ("calibrating", 4, 4) in calls  # 128 samples in batches of 32
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_weight_scales = [inits[n.input[1]] for n in model.graph.node
                          if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                          and inits[n.input[0]].ndim == 4]
    assert conv_weight_scales
    if per_channel:
        assert all(s.ndim == 1 and s.size in (32, 64) for s in conv_weight_scales)
    else:
        assert all(s.size == 1 for s in conv_weight_scales)


def test_dynamic_int8(cnn_onnx, digits_data, tmp_path):
    from modelserve.optimize import OptimizeSpec, optimize

    out = tmp_path / "dyn.onnx"
    report = optimize(cnn_onnx, out, OptimizeSpec(quantize="dynamic", eval_data=digits_data["test"], speed_gate=False))
    assert "DynamicQuantizeLinear" in op_types(out)
    assert report.to_dict()["summary"]["size_ratio"] > 3
    assert report.result.agreement >= 0.98
    assert report.to_dict()["summary"]["top1_drop_points"] <= 1.0


def test_fp16_halves_the_file_and_keeps_float32_io(cnn_onnx, digits_data, tmp_path):
    import onnxruntime as ort

    from modelserve.optimize import OptimizeSpec, optimize

    out = tmp_path / "fp16.onnx"
    report = optimize(cnn_onnx, out, OptimizeSpec(fp16=True, eval_data=digits_data["test"], speed_gate=False))
    ratio = cnn_onnx.stat().st_size / out.stat().st_size
    assert 1.7 <= ratio <= 2.3
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(out)).graph.initializer)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)"]
    assert report.result.max_abs_diff < 0.05 and report.result.agreement >= 0.99


# --- pruning and graph ------------------------------------------------------------------------------------------


def test_prune_cli_reaches_the_sparsity(cnn_onnx, digits_data, tmp_path):
    out = tmp_path / "pruned.onnx"
    res = cli("optimize", cnn_onnx, "-o", out, "--prune", "0.5", "--graph", "none", "--eval-data", digits_data["test"],
              "--no-speed-gate", "--max-accuracy-drop", "5")
    assert res.returncode == 0, res.stderr + res.stdout
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(cnn_onnx)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    weights = [after[n] for n, a in before.items() if a.ndim >= 2]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert abs(sparsity - 0.5) < 0.001
    for name, a in before.items():  # biases untouched
        if a.ndim == 1:
            np.testing.assert_array_equal(after[name], a)
    report = report_of(out)
    assert abs(report["result"]["sparsity"] - sparsity) < 1e-9 and report["original"]["sparsity"] < 0.01
    assert report["result"]["top1"] is not None and report["result"]["top1"] > 0.9
    assert "top-1" in res.stdout


@pytest.mark.parametrize("engine", ["ort", "slim"])
def test_graph_optimization_keeps_outputs(cnn_onnx, digits_data, tmp_path, engine):
    from modelserve.optimize import OptimizeSpec, optimize

    pytest.importorskip("onnxslim") if engine == "slim" else None
    out = tmp_path / f"{engine}.onnx"
    report = optimize(cnn_onnx, out, OptimizeSpec(graph=engine, speed_gate=False))
    x, _ = held_out(digits_data)
    np.testing.assert_allclose(run_model(out, x), run_model(cnn_onnx, x), atol=1e-5, rtol=0)
    assert report.steps[-1]["step"] == "graph" and report.steps[-1]["method"] == engine
    assert report.result.max_abs_diff is not None and report.result.max_abs_diff <= 1e-5
    assert report.result.top1 is None and report.gates["notes"]  # no labels: says the accuracy gate did not apply
    if engine == "ort":
        assert "FusedConv" in op_types(out)  # extended level fused Conv+Relu


# --- gates ------------------------------------------------------------------------------------------------------


def test_accuracy_gate_refuses_a_heavily_pruned_model(cnn_onnx, digits_data, tmp_path):
    out = tmp_path / "pruned95.onnx"
    res = cli("optimize", cnn_onnx, "-o", out, "--prune", "0.95", "--eval-data", digits_data["test"],
              "--max-accuracy-drop", "0", "--no-speed-gate")
    assert res.returncode != 0
    assert "refused" in res.stderr and "accuracy dropped" in res.stderr and "points" in res.stderr
    assert not out.exists()
    report = report_of(out)
    assert not report["accepted"] and "accuracy dropped" in report["refused"]
    assert report["gates"]["accuracy"]["passed"] is False and report["gates"]["accuracy"]["drop_points"] > 0


def test_speed_gate_refuses_a_slower_result(cnn_onnx, digits_data, tmp_path):
    # dynamic int8 turns the convs into ConvInteger, several times slower than float Conv on x86 CPUs
    out = tmp_path / "dyn.onnx"
    res = cli("optimize", cnn_onnx, "-o", out, "--quantize", "dynamic", "--eval-data", digits_data["test"])
    assert res.returncode != 0, res.stdout
    assert "slower than the original" in res.stderr and not out.exists()
    report = report_of(out)
    assert report["gates"]["speed"]["remeasured"] and not report["gates"]["speed"]["passed"]
    assert report["result"]["latency_ms"]["32"]["p50"] > 1.1 * report["original"]["latency_ms"]["32"]["p50"]
    assert report["gates"]["accuracy"]["passed"]  # refused for speed only

    res = cli("optimize", cnn_onnx, "-o", out, "--quantize", "dynamic", "--eval-data", digits_data["test"],
              "--no-speed-gate")
    assert res.returncode == 0, res.stderr
    assert out.exists() and report_of(out)["accepted"]
    assert any("slower" in n for n in report_of(out)["gates"]["notes"])


# --- evaluate ---------------------------------------------------------------------------------------------------


def test_evaluate_cli_matches_torch_accuracy(cnn_onnx, digits_data, digits_cnn):
    res = cli("evaluate", cnn_onnx, "--data", digits_data["test"], "--json")
    assert res.returncode == 0, res.stderr
    profile = json.loads(res.stdout)
    assert abs(profile["top1"] - digits_cnn["accuracy"]) <= 0.005
    assert profile["samples"] == len(held_out(digits_data)[1])
    assert profile["latency_ms"]["1"]["p50"] > 0 and profile["throughput"] > 0
    assert profile["parameters"] == sum(p.numel() for p in digits_cnn["module"].parameters())
    table = cli("evaluate", cnn_onnx, "--data", digits_data["test"])
    assert table.returncode == 0 and "top-1" in table.stdout and f"{profile['top1']:.2%}" in table.stdout


# --- bad input --------------------------------------------------------------------------------------------------


def test_static_without_calibration_is_refused(cnn_onnx, tmp_path):
    res = cli("optimize", cnn_onnx, "-o", tmp_path / "x.onnx", "--quantize", "static")
    assert res.returncode == 2 and "needs calibration data" in res.stderr
    assert "Traceback" not in res.stderr


def test_corrupt_onnx_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    res = cli("optimize", bad, "-o", tmp_path / "x.onnx")
    assert res.returncode == 1 and "not a valid ONNX model" in res.stderr and str(bad) in res.stderr
    res = cli("evaluate", bad)
    assert res.returncode == 1 and "not a valid ONNX model" in res.stderr


def test_eval_data_with_wrong_shape_is_refused(cnn_onnx, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((10, 1, 4, 4), np.float32), labels=np.zeros(10, np.int64))
    res = cli("evaluate", cnn_onnx, "--data", wrong)
    assert res.returncode == 1 and "wrong.npz" in res.stderr and "[10, 1, 4, 4]" in res.stderr
    res = cli("optimize", cnn_onnx, "-o", tmp_path / "x.onnx", "--eval-data", wrong)
    assert res.returncode == 1 and "[10, 1, 4, 4]" in res.stderr and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("options,message", [
    ({"fp16": True, "quantize": "dynamic"}, "fp16 or int8"),
    ({"prune": 1.5}, "below 1"),
    ({"prune": -0.1}, "at least 0"),
    ({"prune_structured": True}, "--prune"),
    ({"calibration": "x.npz"}, "only used by --quantize static"),
    ({"distill_student": "a.b:c"}, "training data"),
    ({"graph": "magic"}, "'ort'"),
])
def test_spec_validation(options, message):
    from pydantic import ValidationError

    from modelserve.optimize import OptimizeSpec

    with pytest.raises(ValidationError, match=message):
        OptimizeSpec(**options)


def test_structured_pruning_of_onnx_is_refused(cnn_onnx, tmp_path):
    from modelserve.optimize import OptimizeError, OptimizeSpec, optimize

    with pytest.raises(OptimizeError, match="PyTorch model"):
        optimize(cnn_onnx, tmp_path / "x.onnx", OptimizeSpec(prune=0.5, prune_structured=True))
    assert not (tmp_path / "x.onnx").exists()


def test_int8_alias_picks_static_with_calibration(digits_data):
    from modelserve.optimize import OptimizeSpec

    assert OptimizeSpec(quantize="int8", calibration=digits_data["train"]).quantize == "static"
    assert OptimizeSpec(quantize="int8").quantize == "dynamic"


# --- PyTorch-side steps (modelserve.optimize.torch_steps, exported with modelserve.convert.torch) ---------------


def test_structured_pruning_of_a_torch_factory_shrinks_the_file(digits_cnn, digits_data, tmp_path):
    from modelserve.optimize import OptimizeSpec, optimize

    out = tmp_path / "channels.onnx"
    spec = OptimizeSpec(prune=0.5, prune_structured=True, train_data=digits_data["train"], epochs=2,
                        weights=digits_cnn["weights"], pythonpath=digits_cnn["pythonpath"],
                        eval_data=digits_data["test"], speed_gate=False, max_accuracy_drop=3)
    report = optimize(digits_cnn["factory"], out, spec)
    assert [s["step"] for s in report.steps][:3] == ["export", "prune", "export"]
    assert report.original.parameters == sum(p.numel() for p in digits_cnn["module"].parameters())
    assert abs(report.original.top1 - digits_cnn["accuracy"]) <= 0.005  # the original is the unpruned export
    assert report.result.parameters < 0.6 * report.original.parameters
    assert report.to_dict()["summary"]["size_ratio"] > 1.6
    assert report.to_dict()["summary"]["top1_drop_points"] <= 3
    x, labels = held_out(digits_data)
    assert float((run_model(out, x).argmax(1) == labels).mean()) == pytest.approx(report.result.top1)


def test_distillation_into_a_small_student(cnn_onnx, digits_data, digits_cnn, tmp_path):
    from modelserve.optimize import OptimizeSpec, optimize

    out = tmp_path / "student.onnx"
    spec = OptimizeSpec(distill_student="digits_torch:small_cnn", train_data=digits_data["train"], epochs=3,
                        pythonpath=digits_cnn["pythonpath"], eval_data=digits_data["test"], speed_gate=False,
                        max_accuracy_drop=50)
    report = optimize(cnn_onnx, out, spec)
    assert report.steps[0]["step"] == "distill"
    import digits_torch

    assert report.result.parameters == sum(p.numel() for p in digits_torch.small_cnn().parameters())
    assert report.to_dict()["summary"]["size_ratio"] > 10
    assert report.result.top1 > 0.5 and report.result.agreement > 0.5  # it learned from the teacher
    assert onnx.load(str(out)).graph.input[0].name == "x"  # the teacher's input name, so clients do not change
