"""A small PyTorch CNN for scikit-learn's bundled 8x8 digits: the model the README walk-through converts.

    python examples/digits_torch.py digits_cnn.pt         # trains in seconds on a CPU, saves a state dict
    modelserve convert examples.digits_torch:cnn --weights digits_cnn.pt --input-shape 1,1,8,8 -o cnn.onnx

Nothing is downloaded: the digits ship inside scikit-learn.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn


def cnn() -> nn.Module:
    """The teacher-sized network: two conv layers and a classifier head (about 52k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def small_cnn() -> nn.Module:
    """A student about a tenth of ``cnn``'s size, for distillation."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images as float32 [N, 1, 8, 8] in 0..1, labels int64; a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) * 3 // 4
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Plain cross-entropy training with Adam; a few seconds on a CPU."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def save_splits(path: str) -> None:
    """Write the split as .npz files the CLI reads: <path>-train.npz and <path>-test.npz (arrays x and labels)."""
    x_train, y_train, x_test, y_test = digits()
    np.savez(f"{path}-train.npz", x=x_train, labels=y_train)
    np.savez(f"{path}-test.npz", x=x_test, labels=y_test)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "digits_cnn.pt"
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    model = train(cnn(), x_train, y_train)
    torch.save(model.state_dict(), out)
    save_splits("digits")
    print(f"saved {out}; held-out accuracy {accuracy(model, x_test, y_test):.3f}; data in digits-train.npz, digits-test.npz")
