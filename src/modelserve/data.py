"""Datasets for conversion checks, calibration, evaluation and training: named input arrays plus labels.

Accepted sources (the same for every command that takes ``--data``-like flags):

* ``.npy``: one array, the model's only (or first) input; no labels.
* ``.npz``: arrays named after the model's inputs, or a single array (or one named ``x``) for a
  one-input model; an array named ``labels`` or ``y`` holds the labels.
* a folder of images: ``DIR/<class>/*.png|jpg|...`` gives labels (class folders in sorted order,
  0, 1, 2, ...), or images directly in ``DIR`` for unlabeled data (calibration). Each image is
  resized to the input's height and width, made gray or RGB to match its channels, scaled to 0..1,
  normalized with ``mean``/``std`` and laid out NCHW or NHWC as the input's shape says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
LABEL_KEYS = ("labels", "y")


class DataError(ValueError):
    """A dataset that cannot be read or does not fit the model; the message names the file and the mismatch."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (None = any size, e.g. the batch axis) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


def onnx_input_specs(model: str | Path | bytes) -> list[InputSpec]:
    """The inputs of an ONNX model as ONNX Runtime sees them (symbolic dims become None)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model,
                                   providers=["CPUExecutionProvider"])
    return [InputSpec(i.name, tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape),
                      _ort_dtype(i.type)) for i in session.get_inputs()]


def _ort_dtype(ort_type: str) -> np.dtype:
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64", "float16": "float16", "string": "object",
                     "bool": "bool"}.get(name, name))


@dataclass
class Dataset:
    """Samples along axis 0 of every input array; ``labels`` (one per sample) when the source had them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {k: v[start:start + size] for k, v in self.inputs.items()}

    def head(self, n: int) -> Dataset:
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[:n])


def load_dataset(path: str | Path, specs: Sequence[InputSpec], *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, limit: int | None = None) -> Dataset:
    """Read ``path`` (see the module doc) as inputs for a model with ``specs``; arrays are cast to each input's dtype."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        data = _load_images(path, specs, mean, std)
    elif path.suffix == ".npy":
        data = Dataset({specs[0].name: np.load(path, allow_pickle=False)})
    elif path.suffix == ".npz":
        data = _load_npz(path, specs)
    else:
        raise DataError(f"{path}: expected a .npy or .npz file or a folder of images")
    data = _fit(data, specs, path)
    return data.head(limit) if limit else data


def _load_npz(path: Path, specs: Sequence[InputSpec]) -> Dataset:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    names = [s.name for s in specs]
    if all(n in arrays for n in names):
        return Dataset({n: arrays[n] for n in names}, labels)
    if len(specs) == 1 and ("x" in arrays or len(arrays) == 1):
        return Dataset({names[0]: arrays.get("x", next(iter(arrays.values())))}, labels)
    raise DataError(f"{path}: holds arrays {sorted(arrays)}; the model's inputs are {names} "
                    f"(name the arrays after the inputs, plus 'labels' for labels)")


def _image_layout(spec: InputSpec) -> tuple[bool, int, int, int]:
    """(channels_first, channels, height, width) of a 4-D image input."""
    if len(spec.shape) != 4:
        raise DataError(f"input '{spec.name}' has shape {spec.shape}; images need a 4-D input (NCHW or NHWC)")
    _, a, b, c = spec.shape
    channels_first = a in (1, 3) and c not in (1, 3)
    channels, height, width = (a, b, c) if channels_first else (c, a, b)
    if channels not in (1, 3) or not height or not width:
        raise DataError(f"input '{spec.name}' has shape {spec.shape}: cannot tell the image size and channels")
    return channels_first, channels, height, width


def _load_images(folder: Path, specs: Sequence[InputSpec], mean, std) -> Dataset:
    from PIL import Image, ImageOps

    if len(specs) != 1:
        raise DataError(f"{folder}: a folder of images feeds one-input models; this one has {len(specs)} inputs")
    channels_first, channels, height, width = _image_layout(specs[0])
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or in class sub-folders")
    images = []
    for file, _ in files:
        try:
            with Image.open(file) as img:
                img = ImageOps.exif_transpose(img).convert("L" if channels == 1 else "RGB")
                img = img.resize((width, height), Image.Resampling.BILINEAR)
                images.append(np.asarray(img, dtype=np.float32).reshape(height, width, channels) / 255.0)
        except OSError as exc:
            raise DataError(f"{file}: not a readable image ({exc})") from exc
    x = np.stack(images)
    if mean is not None:
        x = x - np.asarray(mean, np.float32)
    if std is not None:
        x = x / np.asarray(std, np.float32)
    if channels_first:
        x = x.transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], np.int64) if classes else None
    return Dataset({specs[0].name: np.ascontiguousarray(x)}, labels)


def _fit(data: Dataset, specs: Sequence[InputSpec], path: Path) -> Dataset:
    """Cast to the inputs' dtypes and check the per-sample shapes against the declared ones."""
    inputs = {}
    for spec in specs:
        x = data.inputs[spec.name]
        if x.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape[1:], x.shape[1:])):
            raise DataError(f"{path}: input '{spec.name}' has shape {list(x.shape)}, the model expects "
                            f"{['N' if d is None else d for d in spec.shape]} (samples along the first axis)")
        inputs[spec.name] = np.ascontiguousarray(x.astype(spec.dtype, copy=False))
    if data.labels is not None and len(data.labels) != len(next(iter(inputs.values()))):
        raise DataError(f"{path}: {len(data.labels)} labels for {len(next(iter(inputs.values())))} samples")
    return Dataset(inputs, data.labels)


def random_inputs(specs: Sequence[InputSpec], batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Sample inputs generated from declared shapes (unknown dims: ``batch`` for the first axis, else 1).

    Floats are uniform in [0, 1), integers in [0, 10), booleans random; enough to compare two
    implementations of the same model, not to measure accuracy.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = tuple(d if d else (batch if i == 0 else 1) for i, d in enumerate(spec.shape))
        if spec.dtype.kind == "f":
            out[spec.name] = rng.random(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            out[spec.name] = rng.random(shape) < 0.5
        else:
            raise DataError(f"input '{spec.name}': cannot generate {spec.dtype} samples; give a sample file")
    return out
