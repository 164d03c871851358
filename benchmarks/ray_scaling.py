"""Ray Serve's cost and scaling: ResNet-18 through `serve --ray` with 1 and 2 replicas versus the
single-process server, one run.

    .venv/bin/python benchmarks/ray_scaling.py [--concurrency 8] [--window-ms 5000] [--rounds 2]
                                               [--out benchmarks/results]

The model is the lab's ResNet-18 (`../shared/bench/make_models.py`: torchvision layout, random weights,
seed 0, exported here with the lab's script; needs the torch extra) with the lab's perf_analyzer input.
Every server gets the same config: max_batch_size 32, dynamic batching (preferred 8/16/32, 2 ms), one
ONNX Runtime session of one thread per process (per replica). Served as:

- `single`: `modelserve serve` (one process, one session);
- `single-2x`: the same with `instance_group count 2` (the best one process does on two cores);
- `ray-1`, `ray-2`: `modelserve serve --ray` (a local Ray started by it), the model deployed with
  `scaling: {min_replicas: N, max_replicas: N, num_cpus: 0.5}`: the request goes through Ray Serve's
  HTTP proxy to a replica.

All without the payload log (it is measured by `payload_log.py`). The load is NVIDIA's perf_analyzer
(V2 HTTP binary, batch 1, sync, `--concurrency-range C:C`, three windows, stability check off), phases
alternating per round. Reported: inferences/s, p50/p99, and the ratios `ray-1 / single` (the proxy's
cost) and `ray-2 / ray-1` (the scaling factor). On this 2-core machine perf_analyzer, Ray's proxy and
the replicas share two cores, so the scaling factor is bounded by cores, not by modelserve.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server  # noqa: E402 - the tests' server helper

PERF_ANALYZER = os.environ.get("MODELSERVE_PERF_ANALYZER") or str(ROOT / ".bench" / "tools" / "pa" / "perf_analyzer")
LAB = Path(os.environ.get("BENCH_SRC", ROOT.parent / "shared" / "bench"))
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "output" data_type: TYPE_FP32 dims: [ 1000 ] }} ]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
}}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
parameters {{ key: "scaling.min_replicas" value: {{ string_value: "{replicas}" }} }}
parameters {{ key: "scaling.max_replicas" value: {{ string_value: "{replicas}" }} }}
parameters {{ key: "scaling.num_cpus" value: {{ string_value: "0.5" }} }}
"""
#: phase -> (server, model name)
PHASES = {"single": ("single", "resnet18"), "single-2x": ("single", "resnet18-2x"),
          "ray-1": ("ray", "resnet18"), "ray-2": ("ray", "resnet18-2x")}


def build_repositories(tmp: Path) -> tuple[Path, Path, Path]:
    """The lab's ResNet-18 as models ``resnet18`` and ``resnet18-2x``: in the single-process repository the
    latter has 2 instances, in the Ray one 2 replicas of 1 instance. Returns (single, ray, perf input)."""
    models = tmp / "lab-models"
    subprocess.run([sys.executable, str(LAB / "make_models.py"), "--out", str(models), "resnet18"], check=True,
                   capture_output=True)
    repos = {"single": tmp / "single", "ray": tmp / "ray"}
    for kind, repo in repos.items():
        for name, count in (("resnet18", 1), ("resnet18-2x", 2)):
            (repo / name / "1").mkdir(parents=True)
            os.link(models / "resnet18" / "model.onnx", repo / name / "1" / "model.onnx")
            instances, replicas = (count, 1) if kind == "single" else (1, count)
            (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, instances=instances, replicas=replicas))
    return repos["single"], repos["ray"], models / "resnet18" / "pa_input.json"


def perf_analyzer(url: str, model: str, data: Path, conc: int, window_ms: int, out: Path) -> dict:
    csv_path = out / f"pa-{model}-{conc}-{time.monotonic_ns()}.csv"
    cmd = [PERF_ANALYZER, "-m", model, "-u", url, "-i", "http", "-b", "1",
           "--concurrency-range", f"{conc}:{conc}", "--measurement-interval", str(window_ms),
           "--stability-percentage", "1000", "--max-trials", "3", "--warmup-request-count", str(max(8, 2 * conc)),
           "--input-data", str(data), "-f", str(csv_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    row = next(csv.DictReader(csv_path.open()))
    return {"ips": float(row["Inferences/Second"]), "p50": float(row["p50 latency"]) / 1e3,
            "p99": float(row["p99 latency"]) / 1e3}


def renice_ray() -> int:
    """Ray's actors (proxy, controller, replicas) to niceness 0: Ray starts them at 15, which on one shared
    machine measures the scheduler's preference for perf_analyzer, not Ray."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::"):
                    os.setpriority(os.PRIO_PROCESS, int(entry.name), 0)
                    count += 1
            except OSError:
                continue
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8])
    ap.add_argument("--window-ms", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--renice", action="store_true",
                    help="run Ray's processes at niceness 0 like the other servers (Ray starts them at 15; root only)")
    args = ap.parse_args()
    if not Path(PERF_ANALYZER).is_file():
        sys.exit(f"perf_analyzer not found at {PERF_ANALYZER} (benchmarks/run.sh installs it)")
    env = {"MODELSERVE_ORT_THREADS": "1"}
    results: dict[tuple[str, int], list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        single_repo, ray_repo, data = build_repositories(tmp)
        started = time.monotonic()
        with Server(single_repo, "--no-payload-log", env=env) as single, \
                Server(ray_repo, "--ray", "--no-payload-log", env=env, start_timeout=300) as ray:
            print(f"servers up in {time.monotonic() - started:.0f} s", file=sys.stderr)
            if args.renice:
                print(f"reniced {renice_ray()} Ray processes to 0", file=sys.stderr)
            servers = {"single": single, "ray": ray}
            for conc in args.concurrency:
                for rnd in range(args.rounds):
                    order = list(PHASES) if rnd % 2 == 0 else list(reversed(PHASES))
                    for phase in order:
                        server, model = PHASES[phase]
                        r = perf_analyzer(servers[server].http_url, model, data, conc, args.window_ms, tmp)
                        results[(phase, conc)].append(r)
                        print(f"c={conc} round {rnd + 1} {phase:10s} {r['ips']:7.1f} inf/s  p50 {r['p50']:6.1f} ms"
                              f"  p99 {r['p99']:6.1f} ms", file=sys.stderr)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    lines = [f"# Ray Serve scaling: ResNet-18, {stamp}", "",
             f"`benchmarks/ray_scaling.py --concurrency {' '.join(map(str, args.concurrency))} --window-ms "
             f"{args.window_ms} --rounds {args.rounds}{' --renice' if args.renice else ''}`; Ray's processes at "
             f"niceness {0 if args.renice else 15} (the single-process server at 0); {os.cpu_count()} cores shared by perf_analyzer, Ray "
             "(GCS, raylet, HTTP proxy, controller) and the servers; perf_analyzer V2 HTTP binary, batch 1, sync; "
             "figures: median over rounds of perf_analyzer's last window.", "",
             "| concurrency | phase | inf/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    med = {}
    for (phase, conc), runs in sorted(results.items(), key=lambda kv: (kv[0][1], list(PHASES).index(kv[0][0]))):
        med[(phase, conc)] = {k: statistics.median(r[k] for r in runs) for k in ("ips", "p50", "p99")}
        m = med[(phase, conc)]
        lines.append(f"| {conc} | {phase} | {m['ips']:.1f} | {m['p50']:.1f} | {m['p99']:.1f} |")
    lines += ["", "| concurrency | ray-1 / single (proxy cost) | ray-2 / ray-1 (scaling) | ray-2 / single-2x |",
              "|---|---|---|---|"]
    for conc in args.concurrency:
        g = {p: med[(p, conc)]["ips"] for p in PHASES}
        lines.append(f"| {conc} | {g['ray-1'] / g['single']:.2f} | {g['ray-2'] / g['ray-1']:.2f} | "
                     f"{g['ray-2'] / g['single-2x']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ray-scaling-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
