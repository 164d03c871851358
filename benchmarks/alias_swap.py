"""Serving through alias moves: throughput, latency and failures while the production alias flips.

    .venv/bin/python benchmarks/alias_swap.py [--seconds 10] [--clients 8] [--every 1.0]

One `modelserve serve --registry` process follows a SQLite registry holding two versions of an MLP
(same shape, other weights). Clients (HTTP, keep-alive, one thread each) send requests for
``--seconds`` with the alias still, then as long again while this script moves the alias every
``--every`` seconds. It prints both phases side by side from the same run: requests/s, p50/p99,
failed requests, and which versions answered. A swap loads and warms the new version beside the old
one, so the figure to watch is p99 during moves against p99 at rest, and failures (must be 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server, mlp_model  # noqa: E402 - the tests' builders and server helper

from modelserve.registry import Registry  # noqa: E402


def phase(srv: Server, seconds: float, clients: int, mover=None) -> dict:
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures, versions = [0] * clients, [dict() for _ in range(clients)]

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post("/v2/models/mlp/infer", json=body)
                latencies[i].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures[i] += 1
                else:
                    v = r.json()["model_version"]
                    versions[i][v] = versions[i].get(v, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    started = time.monotonic()
    moves = 0
    while time.monotonic() - started < seconds:
        time.sleep(0.05)
        if mover is not None:
            moves += mover()
    stop.set()
    for t in threads:
        t.join()
    all_lat = sorted(x for lat in latencies for x in lat)
    answered: dict[str, int] = {}
    for v in versions:
        for k, n in v.items():
            answered[k] = answered.get(k, 0) + n
    return {"requests": len(all_lat), "rps": len(all_lat) / seconds, "p50_ms": 1e3 * statistics.median(all_lat),
            "p99_ms": 1e3 * all_lat[int(0.99 * (len(all_lat) - 1))], "failed": sum(failures), "moves": moves,
            "versions": answered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between alias moves in the second phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root}/registry.db"
        reg = Registry(url, root / "artifacts", actor="benchmark")
        for seed in (0, 1):
            reg.register(mlp_model(root / f"mlp{seed}.onnx", features=64, hidden=256, classes=10, seed=seed), "mlp")
        reg.set_alias("mlp", "production", 1)
        with Server(root / "unused", "--registry", url, "--registry-poll", "0.2",
                    "--registry-cache", str(root / "cache")) as srv:
            still = phase(srv, args.seconds, args.clients)
            state = {"next": 2, "at": time.monotonic() + args.every}

            def mover() -> int:
                if time.monotonic() < state["at"]:
                    return 0
                reg.set_alias("mlp", "production", state["next"], reason="benchmark")
                state["next"], state["at"] = 3 - state["next"], time.monotonic() + args.every
                return 1

            moving = phase(srv, args.seconds, args.clients, mover)
        reg.close()
    print(f"| phase | requests/s | p50 ms | p99 ms | failed | alias moves | answered by version |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("alias still", still), (f"alias moved every {args.every:g}s", moving)):
        print(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['failed']} | {r['moves']} "
              f"| {r['versions']} |")
    print(f"\nthroughput while moving: {moving['rps'] / still['rps']:.2f}x of still; "
          f"p99 {moving['p99_ms'] / still['p99_ms']:.2f}x")


if __name__ == "__main__":
    main()
