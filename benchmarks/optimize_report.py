"""Before/after tables of `modelserve optimize` on a ResNet-18-shaped model and the digits CNN.

    .venv/bin/python benchmarks/optimize_report.py [--out benchmarks/results] [--models resnet18 cnn]

Each variant is produced by the same `modelserve.optimize.optimize` the CLI runs, with the speed gate
off so that slower results are shown rather than refused (the "gate" column says what the gate
would have done). All figures of one table come from one run on this machine. The ResNet-18 has
random weights (nothing is downloaded), so it reports output difference instead of accuracy; the
digits CNN is trained here and evaluated on held-out digits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def resnet18():
    """ResNet-18's layer layout (basic blocks 2-2-2-2, 64..512 channels, 1000 classes), random weights."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3, 1))
            self.skip = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    torch.manual_seed(0)
    return nn.Sequential(*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *layers,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)).eval()


def prepare(name: str, work: Path) -> tuple[Path, dict]:
    """The fp32 ONNX file of one model and the optimize arguments (calibration, evaluation data) that fit it."""
    from modelserve.convert.torch import export_onnx

    if name == "resnet18":
        rng = np.random.default_rng(0)
        np.savez(work / "calib.npz", x=rng.random((32, 3, 224, 224), dtype=np.float32))
        model = export_onnx(resnet18(), work / "resnet18.onnx", (np.zeros((1, 3, 224, 224), np.float32),),
                            input_names=["x"], output_names=["logits"])
        return model, {"calibration": work / "calib.npz", "calibration_size": 32}
    import digits_torch

    digits_torch.save_splits(str(work / "digits"))
    x_train, y_train, _, _ = digits_torch.digits()
    net = digits_torch.train(digits_torch.cnn(), x_train, y_train)
    model = export_onnx(net, work / "cnn.onnx", (x_train[:1],), input_names=["x"], output_names=["logits"])
    return model, {"calibration": work / "digits-train.npz", "eval_data": work / "digits-test.npz"}


VARIANTS = {
    "graph (ORT)": {},
    "int8 dynamic": {"quantize": "dynamic"},
    "int8 static": {"quantize": "static"},
    "int8 static per-channel": {"quantize": "static", "per_channel": True},
    "fp16": {"fp16": True},
    "pruned 50%": {"prune": 0.5},
}


def main() -> None:
    from modelserve.optimize import OptimizeSpec, optimize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=["cnn", "resnet18"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    lines = [f"# optimize report — {time.strftime('%Y-%m-%d %H:%M')}, this machine (CPU), one run", ""]
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model, data = prepare(name, work)
            lines += [f"## {name}", "",
                      "| variant | size | × smaller | params | sparsity | p50 b1 ms | p50 b32 ms | samples/s b32 | "
                      "× faster b32 | top-1 | Δ top-1 (pts) | agreement | max abs diff | gate |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for variant, options in VARIANTS.items():
                spec_data = {k: v for k, v in data.items() if k != "calibration" or options.get("quantize") == "static"}
                spec = OptimizeSpec(speed_gate=False, max_accuracy_drop=100.0, **spec_data, **options)
                report = optimize(str(model), work / f"{variant.replace(' ', '_')}.onnx", spec)
                lines.append(table_row(variant, report))
                print(lines[-1], flush=True)
            lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"optimize-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {path}")


def table_row(variant: str, report) -> str:
    d = report.to_dict()
    o, r = d["original"], d["result"]

    def fmt(v, spec=".3g"):
        return "–" if v is None else format(v, spec)

    drop = None if o.get("top1") is None or r.get("top1") is None else 100 * (o["top1"] - r["top1"])
    return (f"| {variant} | {r['size_bytes'] / 1e6:.2f} MB | {o['size_bytes'] / r['size_bytes']:.2f} | "
            f"{r['parameters']:,} | {fmt(r['sparsity'], '.2f')} | {fmt(r['latency_ms']['1']['p50'])} | "
            f"{fmt(r['latency_ms']['32']['p50'])} | {fmt(r['throughput'], '.0f')} | "
            f"{o['latency_ms']['32']['p50'] / r['latency_ms']['32']['p50']:.2f} | {fmt(r.get('top1'))} | "
            f"{fmt(drop, '.2f')} | {fmt(r.get('agreement'))} | {fmt(r.get('max_abs_diff'))} | "
            f"{'; '.join(d.get('gates', {}).get('notes', [])) or 'pass'} |")


if __name__ == "__main__":
    main()
