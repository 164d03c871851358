"""Read one benchmark run (the lab's results.json + raw_ort.json) and check the serving-core targets.

    python benchmarks/targets.py .bench/results/<timestamp> [more runs ...]

Targets (ratios within one run; with several runs, the median ratio is the verdict):
  - ResNet-18, c=32: modelserve >= 95% of raw ONNX Runtime's best batched throughput, each protocol;
  - MLP, c=32: modelserve >= 1.5x the best peer (Triton, MLServer, KServe) of the same run, each protocol;
  - MLP, c=1: modelserve p50 <= 1 ms, each protocol.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PEERS = ("triton", "mlserver", "kserve")


def check(run: Path) -> list[tuple[str, float, float, str]]:
    """(target, measured, goal, detail) for one run, unpinned rows only."""
    rows = [r for r in json.loads((run / "results.json").read_text())["rows"] if not r.get("pin") and r.get("rc") == 0]
    raw_path = run / "raw_ort.json"
    raw = json.loads(raw_path.read_text())["rows"] if raw_path.exists() else []

    def ours(model, proto, conc):
        return next((r for r in rows if r["server"] == "modelserve" and r["model"] == model
                     and r["proto"] == proto and r["conc"] == conc), None)

    out = []
    raw_best = max((r["infer_per_s"] for r in raw if r["model"] == "resnet18"), default=None)
    for proto in ("http", "grpc"):
        r = ours("resnet18", proto, 32)
        if r and raw_best:
            out.append((f"resnet18 c=32 {proto} / raw ORT best", r["infer_per_s"] / raw_best, 0.95,
                        f"{r['infer_per_s']:.1f} vs {raw_best:.1f} inf/s"))
        r = ours("mlp", proto, 32)
        peers = [p for p in rows if p["server"] in PEERS and p["model"] == "mlp" and p["conc"] == 32]
        if r and peers:
            best = max(peers, key=lambda p: p["infer_per_s"])
            out.append((f"mlp c=32 {proto} / best peer", r["infer_per_s"] / best["infer_per_s"], 1.5,
                        f"{r['infer_per_s']:.0f} vs {best['server']} {best['proto']} {best['infer_per_s']:.0f} inf/s"))
        r = ours("mlp", proto, 1)
        if r:
            # lower is better: report goal / measured so that >= 1 means met
            out.append((f"mlp c=1 {proto} p50 <= 1 ms", 1.0 / r["p50_ms"], 1.0, f"p50 {r['p50_ms']:.2f} ms"))
    return out


def main(paths: list[str]) -> int:
    runs = [check(Path(p)) for p in paths]
    names = sorted({name for run in runs for name, *_ in run})
    failed = 0
    print(f"| target | {' | '.join(Path(p).name for p in paths)} | median | goal | met |")
    print(f"|---|{'---|' * len(paths)}---|---|---|")
    for name in names:
        cells, ratios, goal = [], [], None
        for run in runs:
            found = next((item for item in run if item[0] == name), None)
            if found:
                ratios.append(found[1])
                goal = found[2]
                cells.append(f"{found[1]:.2f} ({found[3]})")
            else:
                cells.append("-")
        median = statistics.median(ratios)
        met = median >= goal
        failed += not met
        print(f"| {name} | {' | '.join(cells)} | {median:.2f} | {goal} | {'yes' if met else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) if len(sys.argv) > 1 else (print(__doc__) or 2))
