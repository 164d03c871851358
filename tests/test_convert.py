"""modelserve convert: real PyTorch, Keras/TensorFlow and scikit-learn models, converted, checked, served.

The main paths go through the ``modelserve convert`` command in a child process (what users run); the
rest through the Python API. Served results come from the real server queried with tritonclient.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import EXAMPLES, Server, needs

from modelserve.convert import ConversionDrift, ConversionError, convert


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "2000", "TF_CPP_MIN_LOG_LEVEL": "2"}  # no wrapped error lines
    proc = subprocess.run([sys.executable, "-m", "modelserve", "convert", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def onnx_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def served(path: Path, model: str, x: np.ndarray, input_name: str, output_name: str,
           batches=(1, 16)) -> list[np.ndarray]:
    """Serve ``path`` as ``<repo>/<model>/1/model.onnx`` and send ``x`` in batches over HTTP and gRPC."""
    repo = path.parent.parent.parent
    assert path == repo / model / "1" / "model.onnx"
    outs = []
    with Server(repo) as srv:
        http = httpclient.InferenceServerClient(srv.http_url)
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            for mod, client in ((httpclient, http), (grpcclient, grpc)):
                for size in batches:
                    inp = mod.InferInput(input_name, list(x[:size].shape), "FP32")
                    inp.set_data_from_numpy(np.ascontiguousarray(x[:size]))
                    outs.append(client.infer(model, [inp]).as_numpy(output_name))
        finally:
            http.close()
            grpc.close()
    return outs


# --- PyTorch ----------------------------------------------------------------------------------------------------

@needs("torch", "onnxscript")
def test_torch_factory_to_onnx_is_one_file_and_serves(digits_cnn, digits_data, tmp_path):
    import torch

    out = tmp_path / "repo" / "cnn" / "1" / "model.onnx"
    proc = run_cli(digits_cnn["factory"], "--weights", digits_cnn["weights"], "--pythonpath", digits_cnn["pythonpath"],
                   "--input-shape", "1,1,8,8", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["verification"]["passed"] and report["verification"]["samples"] == 8
    assert report["inputs"] == [{"name": "input", "shape": [None, 1, 8, 8], "dtype": "float32"}]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # weights inlined, no .data left

    with np.load(digits_data["test"]) as npz:
        x, labels = npz["x"][:16], npz["labels"][:16]
    with torch.no_grad():
        expected = digits_cnn["module"](torch.from_numpy(x)).numpy()
    for got in served(out, "cnn", x, "input", "output"):
        np.testing.assert_allclose(got, expected[:len(got)], atol=1e-4, rtol=0)
    assert (expected.argmax(1) == labels).mean() > 0.8  # a trained model, not noise


@needs("torch", "onnxscript")
def test_torchscript_and_torch_export_files(digits_cnn, digits_data, tmp_path):
    import torch

    module = digits_cnn["module"]
    x = torch.rand(2, 1, 8, 8)
    torch.jit.save(torch.jit.script(module), tmp_path / "cnn_script.pt")
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    with np.load(digits_data["test"]) as npz:
        test = npz["x"][:40]
    with torch.no_grad():
        expected = module(torch.from_numpy(test)).numpy()

    proc = run_cli(tmp_path / "cnn_script.pt", "--sample", digits_data["test"], "-o", tmp_path / "script.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "checked on 450 samples" in proc.stdout
    result = convert(tmp_path / "cnn.pt2", tmp_path / "program.onnx")
    assert result.framework == "torch" and result.verification.passed and result.verification.samples == 8
    assert result.inputs[0].shape == (None, 1, 8, 8)  # the program's own dynamic batch dim
    for name in ("script.onnx", "program.onnx"):
        got = next(iter(onnx_run(tmp_path / name, test).values()))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    ts = convert(tmp_path / "cnn.pt2", tmp_path / "traced.pt")  # target from the suffix: TorchScript
    assert ts.target == "torchscript" and ts.verification.max_abs_error < 1e-5
    np.testing.assert_allclose(torch.jit.load(str(tmp_path / "traced.pt"))(torch.from_numpy(test)).detach().numpy(),
                               expected, atol=1e-5)


@needs("torch", "onnxscript")
def test_export_onnx_api_single_file_or_external_data(digits_cnn, tmp_path):
    import onnx

    from modelserve.convert.torch import export_onnx, load_module

    module = load_module(digits_cnn["factory"], digits_cnn["weights"], digits_cnn["pythonpath"])
    assert not module.training
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    one = export_onnx(module, tmp_path / "one.onnx", {"pixels": x}, input_names=["pixels"], output_names=["logits"])
    assert not (tmp_path / "one.onnx.data").exists()
    split = export_onnx(module, tmp_path / "split.onnx", (x,), input_names=["pixels"], output_names=["logits"],
                        external_data=True)
    assert (tmp_path / "split.onnx.data").stat().st_size > 100_000  # the weights live there
    assert os.path.getsize(split) < 50_000
    for path in (one, split):
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == ["pixels"]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
        np.testing.assert_allclose(onnx_run(path, x[:1])["logits"],
                                   module(__import__("torch").from_numpy(x[:1])).detach().numpy(), atol=1e-5)


DRIFTY = '''
import torch

class SignSwitch(torch.nn.Module):
    """Python control flow on a tensor value: an exporter keeps only the branch its example took."""
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x

def build():
    return SignSwitch()
'''


@needs("torch")
def test_drifting_conversion_is_refused_and_removed(tmp_path):
    (tmp_path / "drifty.py").write_text(DRIFTY)
    x = np.ones((8, 4), np.float32)
    x[2:] = -5  # the export example (first rows) sums > 0; the whole batch does not
    np.save(tmp_path / "signs.npy", x)
    out = tmp_path / "drift.onnx"
    proc = run_cli("drifty:build", "--pythonpath", tmp_path, "--sample", tmp_path / "signs.npy", "-o", out)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert "max abs error 15" in err and "max rel error 3" in err and "atol 0.0001" in err and "rtol 0.001" in err
    assert not out.exists() and not Path(str(out) + ".data").exists()

    with pytest.raises(ConversionDrift) as info:
        convert("drifty:build", tmp_path / "drift.pt", sample=tmp_path / "signs.npy", pythonpath=tmp_path)
    assert not info.value.verification.passed and info.value.verification.max_abs_error == pytest.approx(15)
    assert not (tmp_path / "drift.pt").exists()
    # the same module on inputs where both sides take one branch converts fine: the check is not just strict
    assert convert("drifty:build", tmp_path / "ok.onnx", input_shapes=[(1, 4)], pythonpath=tmp_path).verification.passed


# --- Keras / TensorFlow -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="needs tensorflow (pip install 'modelserve[tensorflow]')")
    pytest.importorskip("tf2onnx", reason="needs tf2onnx (pip install 'modelserve[tensorflow]')")
    sys.path.insert(0, str(EXAMPLES))
    import digits_keras

    folder = tmp_path_factory.mktemp("keras")
    model = digits_keras.train()
    model.save(folder / "cnn.keras")
    model.save(folder / "cnn.h5")
    model.export(str(folder / "saved"), verbose=False)
    _, _, x_test, y_test = digits_keras.digits()
    np.savez(folder / "test.npz", x=x_test, labels=y_test)
    expected = model.predict(x_test, verbose=0)
    assert (expected.argmax(1) == y_test).mean() > 0.8
    return {"folder": folder, "x": x_test, "expected": expected, "model": model}


@pytest.mark.parametrize("name", ["cnn.keras", "cnn.h5", "saved"])
def test_keras_files_to_onnx(keras_files, name, tmp_path):
    folder = keras_files["folder"]
    out = tmp_path / "repo" / "kcnn" / "1" / "model.onnx"
    proc = run_cli(folder / name, "--sample", folder / "test.npz", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "keras -> onnx" in proc.stdout and "checked on 450 samples" in proc.stdout
    x, expected = keras_files["x"], keras_files["expected"]
    got = onnx_run(out, x)
    assert len(got) == 1
    np.testing.assert_allclose(next(iter(got.values())), expected, atol=1e-4, rtol=0)
    if name == "cnn.keras":  # servable as converted: dynamic batch, named input
        for reply in served(out, "kcnn", x, "image", "output", batches=(1, 7)):
            np.testing.assert_allclose(reply, expected[:len(reply)], atol=1e-4, rtol=0)


def test_keras_to_tflite_float16_is_smaller(keras_files, tmp_path):
    folder = keras_files["folder"]
    f32 = convert(folder / "cnn.keras", tmp_path / "cnn.tflite", sample=folder / "test.npz")
    f16 = convert(keras_files["model"], tmp_path / "cnn16.tflite", float16=True, atol=1e-2, rtol=1e-2)
    assert f32.target == f16.target == "tflite" and f32.verification.passed and f16.verification.passed
    assert f32.verification.max_abs_error < 1e-4 and f32.verification.samples == 450
    assert 0 < f16.verification.max_abs_error < 1e-2  # float16 weights: close, not equal
    assert os.path.getsize(tmp_path / "cnn16.tflite") < 0.7 * os.path.getsize(tmp_path / "cnn.tflite")
    with pytest.raises(ConversionError, match="onnx or tflite"):
        convert(folder / "cnn.keras", tmp_path / "cnn.pt")


# --- scikit-learn -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_pipeline(tmp_path_factory):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[:1300], y[:1300])
    folder = tmp_path_factory.mktemp("sk")
    with open(folder / "pipe.pkl", "wb") as f:
        pickle.dump(model, f)
    np.save(folder / "test.npy", x[1300:])
    return {"model": model, "pickle": folder / "pipe.pkl", "x": x[1300:], "sample": folder / "test.npy"}


def test_sklearn_pickle_needs_trust_then_converts_exactly(digits_pipeline, tmp_path):
    out = tmp_path / "pipe.onnx"
    refused = run_cli(digits_pipeline["pickle"], "-o", out)
    assert refused.returncode != 0 and not out.exists()
    err = " ".join(refused.stderr.split())
    assert "runs whatever code the file contains" in err and "--trust-pickle" in err

    proc = run_cli(digits_pipeline["pickle"], "--trust-pickle", "--sample", digits_pipeline["sample"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    model, x = digits_pipeline["model"], digits_pipeline["x"]
    got = onnx_run(out, x)
    assert list(got) == ["label", "probabilities"]
    np.testing.assert_array_equal(got["label"], model.predict(x))
    np.testing.assert_allclose(got["probabilities"], model.predict_proba(x), atol=1e-4)


def test_sklearn_in_memory_needs_no_flag(digits_pipeline, tmp_path):
    result = convert(digits_pipeline["model"], tmp_path / "m.onnx", input_names=["pixels"],
                     output_names=["digit", "probs"])
    assert result.framework == "sklearn" and result.verification.passed
    assert result.verification.outputs == ["digit", "probs"] and result.inputs[0].shape == (None, 64)
    got = onnx_run(tmp_path / "m.onnx", digits_pipeline["x"][:5])
    np.testing.assert_array_equal(got["digit"], digits_pipeline["model"].predict(digits_pipeline["x"][:5]))


# --- errors a person can act on ---------------------------------------------------------------------------------

@needs("torch")
@pytest.mark.parametrize("case", ["suffix", "no-module", "state-dict", "shape", "shape-text", "no-shape"])
def test_bad_inputs_give_clear_errors(case, digits_cnn, tmp_path):
    (tmp_path / "model.txt").write_text("not a model")
    cnn = [digits_cnn["factory"], "--weights", digits_cnn["weights"], "--pythonpath", digits_cnn["pythonpath"]]
    args, expected = {
        "suffix": ([tmp_path / "model.txt"], "unknown model file type '.txt'"),
        "no-module": (["nosuchpkg.nets:build", "--input-shape", "1,4"],
                      "cannot import 'nosuchpkg.nets' (from nosuchpkg.nets:build)"),
        "state-dict": ([digits_cnn["weights"]], "holds a state dict (weights only), not a model"),
        "shape": ([*cnn, "--input-shape", "1,3,8,8"], "expected input[8, 3, 8, 8] to have 1 channels"),
        "shape-text": ([*cnn, "--input-shape", "1,x,8"], "expected comma-separated sizes"),
        "no-shape": (cnn, "does not record its input shapes: pass --input-shape"),
    }[case]
    out = tmp_path / "out.onnx"
    proc = run_cli(*args, "-o", out, cwd=tmp_path)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert err.startswith("error:") and expected in err, err
    assert not out.exists()


def test_api_errors(tmp_path, digits_pipeline):
    with pytest.raises(ConversionError, match="name it .onnx, .tflite or .pt"):
        convert(digits_pipeline["model"], tmp_path / "m.bin")
    with pytest.raises(ConversionError, match="took|features"):
        convert(digits_pipeline["model"], tmp_path / "m.onnx", input_shapes=[(1, 10)])
    with pytest.raises(ConversionError, match="already ONNX"):
        (tmp_path / "x.onnx").write_bytes(b"")
        convert(tmp_path / "x.onnx", tmp_path / "y.onnx")
    with pytest.raises(ConversionError, match="float16 weights apply to TFLite"):
        convert(digits_pipeline["model"], tmp_path / "m.onnx", float16=True)
    assert isinstance(ConversionError("x"), ValueError)
