"""PyTorch-side optimization steps: pruning (unstructured / whole conv channels), fine-tuning, distillation.

Real training on the digits split; figures are printed (``pytest -s``) and recorded as test properties.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from conftest import needs

pytestmark = needs("torch", "onnxruntime")


@pytest.fixture(scope="module")
def split(digits_data):
    import digits_torch  # on sys.path via the digits_data fixture of conftest

    x_train, y_train, x_test, y_test = digits_torch.digits()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def train(split):
    from modelserve.data import Dataset

    return Dataset({"x": split["x_train"]}, split["y_train"])


@pytest.fixture
def teacher_module(digits_cnn):
    """A private copy of the trained CNN: the session fixture's module is never mutated."""
    return copy.deepcopy(digits_cnn["module"])


def accuracy(module, split) -> float:
    import digits_torch

    return digits_torch.accuracy(module, split["x_test"], split["y_test"])


def export(module, path, sample: np.ndarray):
    """ONNX export through modelserve.convert.torch when it exists, else the TorchScript exporter."""
    try:
        from modelserve.convert.torch import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        return export_onnx(module, path, {"x": sample}, input_names=["x"], output_names=["logits"])
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (torch.from_numpy(sample),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    return path


def ort_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def report(record_property, **figures):
    for key, value in figures.items():
        record_property(key, value)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


def conv_channels(module):
    from torch import nn

    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_unstructured_prune_hits_the_target_and_keeps_accuracy(teacher_module, digits_cnn, split, train,
                                                               record_property):
    from modelserve.optimize.torch_steps import prune_info, prune_module, sparsity

    original = {k: v.clone() for k, v in digits_cnn["module"].state_dict().items()}
    calls = []
    pruned = prune_module(teacher_module, 0.5, train=train, epochs=2, progress=lambda *a: calls.append(a))
    measured, acc = sparsity(pruned), accuracy(pruned, split)
    report(record_property, sparsity=measured, accuracy=acc, accuracy_before=digits_cnn["accuracy"])
    assert abs(measured - 0.5) <= 0.01
    assert acc > 0.9
    assert not pruned.training
    # permanent: plain weights holding real zeros, no mask buffers or hooks left
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in pruned.named_parameters())
    assert not any(name.endswith("_mask") for name, _ in pruned.named_buffers())
    assert prune_info(pruned).structured is False and abs(prune_info(pruned).sparsity - measured) < 1e-9
    # progress: one call per batch, counting up to the total
    assert calls and calls[-1][1] == calls[-1][2] and {c[0] for c in calls} == {"fine-tune"}
    assert [c[1] for c in calls] == list(range(1, len(calls) + 1))
    # the fixture's module is untouched (the test pruned a copy)
    assert all((v == original[k]).all() for k, v in digits_cnn["module"].state_dict().items())


def test_fine_tuning_recovers_a_heavily_pruned_model_and_keeps_its_sparsity(teacher_module, split, train,
                                                                            record_property):
    from modelserve.optimize.torch_steps import prune_module, sparsity

    plain = prune_module(copy.deepcopy(teacher_module), 0.9)
    tuned = prune_module(teacher_module, 0.9, train=train, epochs=3)
    acc_plain, acc_tuned = accuracy(plain, split), accuracy(tuned, split)
    report(record_property, accuracy_no_finetune=acc_plain, accuracy_finetuned=acc_tuned,
           sparsity_finetuned=sparsity(tuned))
    assert acc_tuned > max(acc_plain + 0.02, 0.9)
    assert abs(sparsity(tuned) - 0.9) <= 0.01
    assert abs(sparsity(plain) - 0.9) <= 0.01


def test_structured_prune_removes_channels_for_real(teacher_module, digits_cnn, split, train, tmp_path,
                                                    record_property):
    import torch

    from modelserve.optimize.torch_steps import (
        parameter_count,
        prune_info,
        prune_module,
    )

    x = split["x_test"][:16]
    before_params, before_channels = parameter_count(teacher_module), conv_channels(teacher_module)
    full = export(copy.deepcopy(teacher_module).eval(), tmp_path / "full.onnx", x)

    pruned = prune_module(teacher_module, 0.5, structured=True, train=train, epochs=3)
    assert conv_channels(pruned) == [c // 2 for c in before_channels]
    assert pruned[2].in_channels == before_channels[0] // 2  # the consumer conv shrank too
    assert pruned[6].in_features == digits_cnn["module"][6].in_features // 2  # and the Linear after Flatten
    info = prune_info(pruned)
    assert info.removed == {"0": (32, 16), "2": (64, 32)} and not info.zeroed
    assert info.parameters_after == parameter_count(pruned) < before_params
    with torch.no_grad():
        logits = pruned(torch.from_numpy(x)).numpy()
    assert logits.shape == (16, 10)
    acc = accuracy(pruned, split)

    small = export(pruned, tmp_path / "pruned.onnx", x)
    onnx_logits = ort_session(small).run(None, {"x": x})[0]
    report(record_property, parameters_before=before_params, parameters_after=parameter_count(pruned),
           accuracy=acc, onnx_bytes_before=full.stat().st_size, onnx_bytes_after=small.stat().st_size)
    assert acc > 0.9
    assert small.stat().st_size < 0.6 * full.stat().st_size
    np.testing.assert_allclose(onnx_logits, logits, atol=1e-4, rtol=0)


def test_structured_prune_shrinks_batchnorm_and_skips_an_output_conv():
    import torch
    from torch import nn

    from modelserve.optimize.torch_steps import prune_info, prune_module

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 4, 1),  # a 1x1 "head": its channels are the model's output
    )
    model[0][1].running_mean.uniform_(-1, 1)
    model[0][1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    pruned = prune_module(model, 0.5, structured=True)
    info = prune_info(pruned)
    assert info.removed == {"0.0": (8, 4)} and "1" in info.skipped
    assert pruned[0][1].num_features == 4 and pruned[0][1].running_mean.shape == (4,)
    assert pruned[1].in_channels == 4 and pruned[1].out_channels == 4
    assert pruned(x).shape == (2, 4, 6, 6)


def test_structured_prune_zeroes_channels_when_the_consumer_is_unknown():
    import torch
    from torch import nn

    from modelserve.optimize.torch_steps import prune_info, prune_module

    class Net(nn.Module):  # not a Sequential: who reads conv's channels cannot be told
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    with pytest.warns(UserWarning, match="zeroed"):
        pruned = prune_module(net, 0.5, structured=True)
    assert prune_info(pruned).zeroed == {"conv": (8, 4)}
    assert pruned.conv.out_channels == 8  # kept, but half the channels are all zero, bias included
    dead = (pruned.conv.weight.detach().flatten(1) == 0).all(1)
    assert int(dead.sum()) == 4 and (pruned.conv.bias.detach()[dead] == 0).all()
    assert pruned(torch.randn(2, 1, 5, 5)).shape == (2, 3)


def test_pruning_is_repeatable(teacher_module, train):
    from modelserve.optimize.torch_steps import prune_module

    small = train.head(256)
    a = prune_module(copy.deepcopy(teacher_module), 0.5, train=small, epochs=1, seed=3).state_dict()
    b = prune_module(teacher_module, 0.5, train=small, epochs=1, seed=3).state_dict()
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_distill_a_small_student_from_an_onnx_teacher(teacher_module, digits_cnn, split, train, tmp_path,
                                                      record_property):
    import digits_torch

    from modelserve.optimize.torch_steps import distill, parameter_count

    session = ort_session(export(teacher_module.eval(), tmp_path / "teacher.onnx", split["x_test"][:4]))
    teacher_calls = []

    def teacher(batch: np.ndarray) -> np.ndarray:
        teacher_calls.append(len(batch))
        return session.run(None, {"x": batch})[0]

    steps = set()
    student = distill(teacher, digits_torch.small_cnn(), train, epochs=10,
                      progress=lambda step, done, total: steps.add(step))
    baseline = digits_torch.train(digits_torch.small_cnn(), split["x_train"], split["y_train"], epochs=10)
    acc_student, acc_labels = accuracy(student, split), accuracy(baseline, split)
    report(record_property, teacher_parameters=parameter_count(teacher_module),
           student_parameters=parameter_count(student), teacher_accuracy=digits_cnn["accuracy"],
           student_distilled_accuracy=acc_student, student_labels_only_accuracy=acc_labels)
    assert parameter_count(student) * 3 < parameter_count(teacher_module)
    assert not student.training
    assert acc_student > 0.85 and acc_labels > 0.85
    assert sum(teacher_calls) == len(train)  # the teacher ran once over the training set
    assert steps == {"teacher", "distill"}


def test_distill_without_labels_uses_the_teacher_alone(teacher_module, split, train):
    import digits_torch
    import torch

    from modelserve.data import Dataset
    from modelserve.optimize.torch_steps import distill

    def teacher(batch):
        with torch.no_grad():
            return teacher_module(torch.from_numpy(batch)).numpy()

    student = distill(teacher, digits_torch.small_cnn(), Dataset({"x": split["x_train"]}), epochs=5)
    assert accuracy(student, split) > 0.8


def test_bad_inputs_are_clear_value_errors(teacher_module, train):
    import digits_torch
    from torch import nn

    from modelserve.data import Dataset
    from modelserve.optimize.torch_steps import distill, prune_module

    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            prune_module(copy.deepcopy(teacher_module), bad)
    with pytest.raises(ValueError, match="needs labels"):
        prune_module(copy.deepcopy(teacher_module), 0.5, train=Dataset({"x": train.inputs["x"]}))
    with pytest.raises(ValueError, match="one-input"):
        prune_module(copy.deepcopy(teacher_module), 0.5, train=Dataset({"a": train.inputs["x"],
                                                                        "b": train.inputs["x"]}, train.labels))
    with pytest.raises(ValueError, match="no Conv or Linear"):
        prune_module(nn.Sequential(nn.ReLU()), 0.5)

    def five_logits(batch):
        return np.zeros((len(batch), 5), np.float32)

    with pytest.raises(ValueError, match="teacher gives 5 logits per sample, the student 10"):
        distill(five_logits, digits_torch.small_cnn(), train, epochs=1)
    with pytest.raises(ValueError, match="alpha"):
        distill(five_logits, digits_torch.small_cnn(), train, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill(five_logits, digits_torch.small_cnn(), train, temperature=0)
