"""PyTorch-side optimization steps: magnitude pruning (unstructured or whole conv channels) with optional
fine-tuning, and knowledge distillation from any teacher that maps a batch to logits (e.g. an ONNX Runtime
session). The pipeline in ``modelserve.optimize`` calls these and exports the result to ONNX.

Both steps modify and return the module they are given (deep-copy first to keep the original), return it in
eval mode, and are repeatable: each call seeds torch with ``seed``.

Structured pruning removes channels for real where it can tell who reads them: inside ``nn.Sequential``
containers (nested ones are walked) a Conv2d's output channels are dropped, and so are the matching
BatchNorm2d features and the input channels of the next Conv2d, or -- after Flatten -- the matching input
columns of the next Linear. Channel-preserving layers (activations, dropout, pooling) may sit in between.
Where the reader is unknown (a conv outside a Sequential, a grouped conv, an unknown layer) the channels are
zeroed instead (weights and bias), with a warning. A conv whose output is the model's output is not pruned:
its channels are the model's outputs. ``prune_info(module)`` tells what was done.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from modelserve.data import Dataset

Progress = Callable[[str, int, int], None] | None

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Layers that keep the channel axis as it is: they may sit between a conv and the layer that reads its channels
# (ELEMENTWISE ones also after a Flatten).
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
               nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout)
CHANNEL_PRESERVING = (*ELEMENTWISE, nn.PReLU, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                      nn.AdaptiveMaxPool2d)


@dataclass
class PruneInfo:
    """What ``prune_module`` did: ``removed``/``zeroed`` map conv names to (channels before, channels pruned)."""

    structured: bool
    target: float
    sparsity: float = 0.0
    parameters_before: int = 0
    parameters_after: int = 0
    removed: dict[str, tuple[int, int]] = field(default_factory=dict)
    zeroed: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros among the weights of Conv/Linear layers (what pruning targets)."""
    weights = [m.weight.detach() for m in module.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else 0.0


sparsity = weight_sparsity  # the public name; prune_module's argument shadows it there


def prune_info(module: nn.Module) -> PruneInfo | None:
    """The ``PruneInfo`` of the last ``prune_module`` call on ``module``; None if it was not pruned."""
    return getattr(module, "_modelserve_prune_info", None)


def prune_module(module: nn.Module, sparsity: float, *, structured: bool = False, train: Dataset | None = None,
                 epochs: int = 3, progress: Progress = None, batch_size: int = 64, lr: float = 1e-3,
                 seed: int = 0) -> nn.Module:
    """Prune ``module`` to ``sparsity`` (0 <= s < 1) in place and return it (eval mode).

    unstructured: global L1 magnitude over Conv/Linear weights; structured: per Conv2d, the fraction ``sparsity``
    of output channels with the smallest L2 norm (see the module doc). With ``train`` (one input plus labels),
    fine-tunes ``epochs`` epochs with Adam + cross-entropy while the pruned weights stay at zero.
    ``progress(step, done, total)`` is called per batch.
    """
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    x, y = _training_arrays(train, "pruning fine-tuning") if train is not None else (None, None)
    if train is not None and y is None:
        raise ValueError("fine-tuning after pruning needs labels; the training data has none")
    torch.manual_seed(seed)
    info = PruneInfo(structured=structured, target=float(sparsity), parameters_before=parameter_count(module))
    masked: list[tuple[nn.Module, str]] = []
    if structured:
        masked = _prune_channels(module, float(sparsity), info)
    else:
        params = [(m, "weight") for m in module.modules() if isinstance(m, PRUNABLE)]
        if not params:
            raise ValueError("nothing to prune: the module has no Conv or Linear layers")
        if sparsity > 0:
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(sparsity))
            masked = params
    if train is not None and epochs > 0:
        _fit(module, x, lambda out, idx: F.cross_entropy(out, y[idx].to(out.device)), epochs=epochs, batch_size=batch_size,
             lr=lr, seed=seed, progress=progress, step="fine-tune")
    for m, name in masked:  # bake the masks in: the weights hold real zeros, the hooks are gone
        prune.remove(m, name)
    module.eval()
    info.sparsity = weight_sparsity(module)
    info.parameters_after = parameter_count(module)
    object.__setattr__(module, "_modelserve_prune_info", info)
    return module


def distill(teacher: Callable[[np.ndarray], np.ndarray], student: nn.Module, train: Dataset, *, epochs: int = 10,
            temperature: float = 4.0, alpha: float = 0.5, progress: Progress = None, batch_size: int = 64,
            lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Train ``student`` (in place; returned in eval mode) to match ``teacher``'s logits on ``train``.

    loss = alpha * KL(p_teacher || p_student) * T^2 + (1 - alpha) * cross-entropy(labels), with p = softmax(z / T);
    without labels alpha is 1. The teacher runs once over the training set (batches of ``batch_size``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x, y = _training_arrays(train, "distillation")
    if y is None:
        alpha = 1.0
    torch.manual_seed(seed)
    student.eval()
    with torch.no_grad():
        student_out = student(x[:2].to(next(student.parameters()).device))
    if student_out.ndim != 2:
        raise ValueError(f"the student must output logits [batch, classes]; it gives shape {list(student_out.shape)}")
    chunks, n = [], len(x)
    total = (n + batch_size - 1) // batch_size
    for i, start in enumerate(range(0, n, batch_size)):
        out = teacher(x[start:start + batch_size].cpu().numpy())
        out = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
        if out.ndim != 2 or out.shape[0] != min(batch_size, n - start):
            raise ValueError(f"the teacher must return logits [batch, classes]; for a batch of "
                             f"{min(batch_size, n - start)} it gave shape {list(out.shape)}")
        if out.shape[1] != student_out.shape[1]:
            raise ValueError(f"the teacher gives {out.shape[1]} logits per sample, the student "
                             f"{student_out.shape[1]}: they must predict the same classes")
        chunks.append(out)
        if progress:
            progress("teacher", i + 1, total)
    soft = F.softmax(torch.from_numpy(np.concatenate(chunks)).float() / temperature, dim=1)

    def loss(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        kd = F.kl_div(F.log_softmax(out / temperature, dim=1), soft[idx].to(out.device), reduction="batchmean") * temperature ** 2
        return kd if y is None or alpha == 1.0 else alpha * kd + (1 - alpha) * F.cross_entropy(out, y[idx].to(out.device))

    _fit(student, x, loss, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, step="distill")
    return student.eval()


# --- training -------------------------------------------------------------------------------------------------------

def _training_arrays(data: Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(data, Dataset):
        raise TypeError(f"{what} needs a modelserve.data.Dataset, got {type(data).__name__}")
    if len(data.inputs) != 1:
        raise ValueError(f"{what} supports one-input models; the data has inputs {sorted(data.inputs)}")
    x = np.asarray(next(iter(data.inputs.values())))
    if len(x) == 0:
        raise ValueError(f"{what}: the training data is empty")
    xt = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32) if x.dtype.kind == "f" else x))
    yt = None if data.labels is None else torch.from_numpy(np.asarray(data.labels).astype(np.int64))
    return xt, yt


def _fit(module: nn.Module, x: torch.Tensor, loss_fn, *, epochs: int, batch_size: int, lr: float, seed: int,
         progress: Progress, step: str) -> None:
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    per_epoch = (len(x) + batch_size - 1) // batch_size
    module.train()
    for epoch in range(epochs):
        for i, idx in enumerate(torch.randperm(len(x), generator=generator).split(batch_size)):
            opt.zero_grad()
            loss_fn(module(x[idx].to(device)), idx).backward()  # idx indexes the CPU-side arrays
            opt.step()
            if progress:
                progress(step, epoch * per_epoch + i + 1, epochs * per_epoch)
    module.eval()


# --- structured pruning ---------------------------------------------------------------------------------------------

def _slots(module: nn.Module, prefix: str = "") -> list[tuple[nn.Sequential, str, str]]:
    """(container, child name, qualified name) of the leaf layers of (nested) Sequentials, in execution order."""
    out = []
    for name, child in module.named_children():
        qual = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out += _slots(child, qual + ".")
        else:
            out.append((module, name, qual))
    return out


def _prune_channels(module: nn.Module, amount: float, info: PruneInfo) -> list[tuple[nn.Module, str]]:
    """Remove (or, failing that, zero) the weakest output channels of every Conv2d; returns the masked params."""
    handled: set[int] = set()
    if isinstance(module, nn.Sequential):
        slots = _slots(module)
        for i, (parent, name, qual) in enumerate(slots):
            conv = getattr(parent, name)
            if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
                continue
            n_cut = min(round(amount * conv.out_channels), conv.out_channels - 1)
            readers, reason = _readers(slots, i + 1, conv.out_channels)
            if reason == "output":
                info.skipped[qual] = "its channels are the model's output"
                handled.add(id(conv))
                continue
            if reason:
                continue  # left for zeroing below
            handled.add(id(conv))
            if n_cut == 0:
                continue
            keep = _strongest(conv, conv.out_channels - n_cut)
            new = _conv_like(conv, out_keep=keep)
            setattr(parent, name, new)
            handled.add(id(new))
            for r_parent, r_name, kind in readers:
                layer = getattr(r_parent, r_name)
                setattr(r_parent, r_name, _shrink_reader(layer, kind, keep, conv.out_channels))
            info.removed[qual] = (conv.out_channels, n_cut)
    masked = []
    for qual, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d) and id(conv) not in handled:
            n_cut = min(round(amount * conv.out_channels), conv.out_channels - 1)
            if n_cut == 0:
                continue
            mask = torch.zeros(conv.out_channels, dtype=torch.bool, device=conv.weight.device)
            mask[_strongest(conv, conv.out_channels - n_cut)] = True
            prune.custom_from_mask(conv, "weight", mask.view(-1, 1, 1, 1).expand_as(conv.weight).float())
            masked.append((conv, "weight"))
            if conv.bias is not None:
                prune.custom_from_mask(conv, "bias", mask.float())
                masked.append((conv, "bias"))
            info.zeroed[qual or "(root)"] = (conv.out_channels, n_cut)
    if info.zeroed:
        msg = (f"structured pruning zeroed (did not remove) the channels of {', '.join(info.zeroed)}: the layer "
               "that reads them is unknown, so the exported model keeps its size (zeros compress, though)")
        info.notes.append(msg)
        warnings.warn(msg, stacklevel=3)
    if not info.removed and not info.zeroed:
        info.notes.append("no Conv2d channels pruned (no Conv2d layers, or none that may be pruned)")
    return masked


def _readers(slots, start: int, channels: int) -> tuple[list[tuple[nn.Module, str, str]], str]:
    """Layers after slot ``start - 1`` that must shrink with its channels, and '' -- or why they cannot be known."""
    readers: list[tuple[nn.Module, str, str]] = []
    flattened = False
    for parent, name, qual in slots[start:]:
        layer = getattr(parent, name)
        if flattened:
            if isinstance(layer, nn.Linear):
                if layer.in_features % channels:
                    return [], f"{qual} has {layer.in_features} inputs, not a multiple of {channels} channels"
                return readers + [(parent, name, "linear")], ""
            if not isinstance(layer, ELEMENTWISE):
                return [], f"unknown layer {qual} ({type(layer).__name__}) after Flatten"
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                return [], f"grouped conv {qual}"
            return readers + [(parent, name, "conv")], ""
        elif isinstance(layer, nn.BatchNorm2d):
            readers.append((parent, name, "bn"))
        elif isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            flattened = True
        elif isinstance(layer, nn.PReLU) and layer.num_parameters != 1:
            return [], f"per-channel PReLU {qual}"
        elif not isinstance(layer, CHANNEL_PRESERVING):
            return [], f"unknown layer {qual} ({type(layer).__name__})"
    return [], "output"


def _strongest(conv: nn.Conv2d, n_keep: int) -> torch.Tensor:
    norms = conv.weight.detach().flatten(1).norm(p=2, dim=1)
    return torch.sort(torch.topk(norms, n_keep).indices).values


def _conv_like(conv: nn.Conv2d, out_keep=None, in_keep=None) -> nn.Conv2d:
    w = conv.weight.detach()
    w = w[out_keep] if out_keep is not None else w
    w = w[:, in_keep] if in_keep is not None else w
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out_keep] if out_keep is not None else conv.bias.detach())
    return new.train(conv.training)


def _shrink_reader(layer: nn.Module, kind: str, keep: torch.Tensor, channels: int) -> nn.Module:
    if kind == "conv":
        return _conv_like(layer, in_keep=keep)
    if kind == "bn":
        new = copy.deepcopy(layer)
        new.num_features = len(keep)
        for attr in ("weight", "bias"):
            if getattr(layer, attr) is not None:
                setattr(new, attr, nn.Parameter(getattr(layer, attr).detach()[keep].clone()))
        for attr in ("running_mean", "running_var"):
            if getattr(layer, attr) is not None:
                setattr(new, attr, getattr(layer, attr)[keep].clone())
        return new
    # Linear after Flatten: each channel owns `per` consecutive input columns (its spatial positions)
    per = layer.in_features // channels  # divisible: _readers checked
    cols = (keep.view(-1, 1) * per + torch.arange(per, device=keep.device)).flatten()
    new = nn.Linear(len(cols), layer.out_features, bias=layer.bias is not None, device=layer.weight.device,
                    dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight.detach()[:, cols])
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
    return new.train(layer.training)
