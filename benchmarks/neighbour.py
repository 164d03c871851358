"""How much work on the other core slows a modelserve with the payload log off: the machine's share in
the payload log's cost.

    .venv/bin/python benchmarks/neighbour.py [--concurrency 8] [--rounds 2] [--window-ms 3000] [--kinds KIND ...]

One server (`--no-payload-log`, the tiny MLP of `payload_log.py`) and perf_analyzer run on CPU 0; a process
that has nothing to do with modelserve runs on CPU 1, one kind per phase, phases alternated per round:

- `none`: CPU 1 idle;
- `pyloop`: a pure-Python busy loop (CPU only, no memory traffic);
- `sha256`: sha256 of a 3 KB buffer, again and again (what the writer does to each logged input);
- `numpy`: mean, sum of squares, min and max of each row of 2,000 x 784 float32 (6 MB, as the writer's row
  statistics of one cycle), again and again;
- each of those also as `…-bursts`: 35 ms of it every 250 ms, the writer's rhythm at ~8,000 requests/s;
- `wake-5ms`, `wake-20ms`: no work at all, only a sleep of 5 / 20 ms again and again (CPU 1 woken from idle
  200 / 50 times a second: what a writer polling its ring does).

`--kinds` picks some of them (`none` is always measured).

If the server's throughput, p99 or CPU per request move with the burner, the cores share something (caches,
memory bandwidth, a host core) and any payload-log writer pays it on top of its own CPU, wherever it runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from payload_log import PERF_ANALYZER, Server, build_repository, perf_analyzer, pin_process  # noqa: E402

_PIN = "import os, time; os.sched_setaffinity(0, {1})\n"
_STEP = {  # one step of each kind of work
    "pyloop": ("", "pass"),
    "sha256": ("import hashlib; b = os.urandom(3136)", "hashlib.sha256(b).digest()"),
    "numpy": ("import numpy as np; a = np.random.rand(2000, 784).astype('f4')",
              "a.mean(1); np.einsum('ij,ij->i', a, a); a.min(1); a.max(1)"),
}
#: flat out, or in the writer's rhythm: 35 ms of work every 250 ms (its cycle at ~8,000 requests/s)
BURNERS = {"none": None}
for _kind, (_setup, _step) in _STEP.items():
    BURNERS[_kind] = f"{_PIN}{_setup}\nwhile True: {_step}"
    BURNERS[f"{_kind}-bursts"] = (f"{_PIN}{_setup}\nwhile True:\n    t = time.perf_counter()\n"
                                  f"    while time.perf_counter() - t < 0.035: {_step}\n    time.sleep(0.215)")
for _ms in (5, 20):
    BURNERS[f"wake-{_ms}ms"] = f"{_PIN}while True: time.sleep({_ms / 1000})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--kinds", nargs="+", choices=list(BURNERS), default=list(BURNERS))
    args = ap.parse_args()
    kinds = ["none", *(k for k in args.kinds if k != "none")]
    if not Path(PERF_ANALYZER).is_file():
        sys.exit(f"perf_analyzer not found at {PERF_ANALYZER} (benchmarks/run.sh installs it)")
    results = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = build_repository(tmp / "repo")
        with Server(tmp / "repo", "--no-payload-log", env={"MODELSERVE_ORT_THREADS": "0"}) as srv:
            pin_process(srv.proc.pid, {0})
            for rnd in range(args.rounds):
                order = kinds if rnd % 2 == 0 else kinds[::-1]
                for name in order:
                    burner = subprocess.Popen([sys.executable, "-c", BURNERS[name]]) if BURNERS[name] else None
                    try:
                        time.sleep(0.3)
                        r = perf_analyzer(srv, data, args.concurrency, args.window_ms, tmp, pinned=True)
                    finally:
                        if burner is not None:
                            burner.kill()
                            burner.wait()
                    results[name].append(r)
                    print(f"round {rnd + 1} {name:>6}: {r['ips']:6.0f} inf/s p99 {r['p99']:.2f} ms "
                          f"{r['cpu_us']:.0f} server cpu-µs/req", file=sys.stderr)
    base = results["none"]
    mean = lambda rs, k: statistics.mean(r[k] for r in rs)  # noqa: E731
    print(f"| CPU 1 runs | inf/s | vs none | p99 ms | p99 vs none | server CPU µs/req |  (c={args.concurrency}, "
          f"{args.rounds} rounds)\n|---|---|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {mean(rs, 'ips'):.0f} | {mean(rs, 'ips') / mean(base, 'ips'):.2f} | {mean(rs, 'p99'):.2f} | "
              f"{mean(rs, 'p99') / mean(base, 'p99'):.2f} | {mean(rs, 'cpu_us'):.0f} |")


if __name__ == "__main__":
    main()
