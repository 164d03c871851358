"""The overload proof (issue 7): a load generator at 3x capacity for a while; admitted requests keep a
bounded latency, the rest are refused (429 / 503) quickly, memory stays bounded, and throughput is back
to normal right after.

Sized for a 2-core CI machine: the model costs a fixed 20 ms of sleep a request (the GIL is free, so
the load generator and the server's event loop keep the cores), two instances, no batching: capacity
is ~100 requests/s whatever the machine, and 3x that is cheap to generate. The model's in-flight cap
(``limits: {max_inflight: 8}``) is what turns the excess into fast 429s.

Phases (one server, ~35 s in all):
1. capacity: closed loop, 6 concurrent clients, 5 s -> C requests/s;
2. overload: open loop (fixed arrival rate, each request sent at its scheduled time whether or not the
   earlier ones have answered) at 3 C for 20 s; latency is measured from the scheduled time, so a
   generator that falls behind shows up as latency rather than hiding it;
3. recovery: the closed loop again, at once, 5 s.

Bounds, and why:
- admitted p99 < 1 s: with the cap, at most 8 requests are in the server for 2 instances, so an admitted
  request waits at most ~3 services (60 ms) before its own 20 ms; 1 s leaves room for a noisy machine
  while a server that queued the excess (Little's law at 3x) would be far past it within seconds;
- refused p99 < 100 ms: a refusal is decided before the body is parsed, in well under a millisecond;
- no other status and no client error or time-out;
- the server's RSS grows < 100 MB from before the overload to its peak;
- goodput during the overload >= 80 % of C (the excess does not crowd out the admitted work) and
  recovery throughput >= 80 % of C.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Server

MODEL = '''
import time

import numpy as np
from modelserve import PythonModel


class Work(PythonModel):
    """A fixed cost: 20 ms a request."""

    def predict(self, batch):
        time.sleep(0.02)
        return {"y": batch["x"] * 2}
'''

BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
HEADERS = {"Content-Type": "application/json"}
CAPACITY_S, OVERLOAD_S, RECOVERY_S = 5.0, 20.0, 5.0
CLIENTS = 6


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class RssWatcher(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        while not self.stop.wait(0.25):
            self.peak = max(self.peak, rss_mb(self.pid))


class Pool:
    """A lean keep-alive HTTP/1.1 client on asyncio streams (httpx spends milliseconds of CPU a request at
    a few hundred requests/s, which on 2 cores would measure the client, not the server). One request at a
    time per connection; a new connection when none is idle."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list = []
        self.request = (f"POST /v2/models/work/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY

    async def post(self) -> int:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        self.idle.append((reader, writer))
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def closed_loop(pool: Pool, seconds: float, clients: int) -> tuple[float, dict]:
    """``clients`` clients, each sending its next request when the last one answers -> (ok/s, status counts)."""
    statuses: dict = {}
    ok = 0
    end = time.monotonic() + seconds

    async def one_client():
        nonlocal ok
        while time.monotonic() < end:
            status = await pool.post()
            statuses[status] = statuses.get(status, 0) + 1
            ok += status == 200
            if status != 200:
                await asyncio.sleep(0.01)

    t0 = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return ok / (time.monotonic() - t0), statuses


async def open_loop(pool: Pool, rate: float, seconds: float) -> list[tuple[int | str, float, float]]:
    """Requests at a fixed rate -> [(status or error name, latency from the scheduled time, lag of the send)]."""
    results: list = []
    tasks = set()
    loop = asyncio.get_running_loop()

    async def one(scheduled: float):
        sent = loop.time()
        try:
            status = await pool.post()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, StopIteration) as exc:
            status = type(exc).__name__
        results.append((status, loop.time() - scheduled, sent - scheduled))

    t0 = loop.time()
    n = int(rate * seconds)
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return results


def p(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    repo = root / "repo"
    (repo / "work" / "1").mkdir(parents=True)
    (repo / "work" / "1" / "model.py").write_text(MODEL)
    (repo / "work" / "config.yaml").write_text(textwrap.dedent("""
        backend: python
        max_batch_size: 1
        instances: 2
        inputs: [{name: x, datatype: FP32, dims: [4]}]
        outputs: [{name: y, datatype: FP32, dims: [4]}]
        limits: {max_inflight: 8}
    """))
    srv = Server(repo, "--monitor-db", f"sqlite:///{root}/monitor.db",
                 "--monitor-spill", str(root / "spill.jsonl"))
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def measure(server) -> dict:
    """The three phases on ``server`` -> the figures (and the raw results under ``_results``)."""
    pid = server.proc.pid
    cpu: dict = {}

    async def run():
        client = Pool("127.0.0.1", server.http_port)
        try:
            await closed_loop(client, 1.0, CLIENTS)  # warm-up: connections, first calls
            capacity, capacity_statuses = await closed_loop(client, CAPACITY_S, CLIENTS)
            rss_before = rss_mb(pid)
            watcher = RssWatcher(pid)
            watcher.start()
            t0, server_cpu, own_cpu = time.monotonic(), cpu_s(pid), time.process_time()
            results = await open_loop(client, 3 * capacity, OVERLOAD_S)
            overload_s = time.monotonic() - t0
            cpu["server"] = (cpu_s(pid) - server_cpu) / overload_s
            cpu["generator"] = (time.process_time() - own_cpu) / overload_s
            recovery, recovery_statuses = await closed_loop(client, RECOVERY_S, CLIENTS)
            watcher.stop.set()
            watcher.join()
            return capacity, capacity_statuses, rss_before, watcher.peak, results, overload_s, recovery, recovery_statuses
        finally:
            client.close()

    capacity, capacity_statuses, rss_before, rss_peak, results, overload_s, recovery, recovery_statuses = asyncio.run(run())
    admitted = [lat for status, lat, _ in results if status == 200]
    refused = [lat for status, lat, _ in results if status in (429, 503)]
    other = [(status, lat) for status, lat, _ in results if status not in (200, 429, 503)]
    lag = [lag for _, _, lag in results]
    return {
        "capacity_rps": round(capacity, 1), "offered_rps": round(3 * capacity, 1), "sent": len(results),
        "overload_s": round(overload_s, 1),
        "admitted": len(admitted), "goodput_rps": round(len(admitted) / overload_s, 1),
        "refused_429_503": len(refused), "other": len(other), "other_first": other[:10],
        "admitted_p50_ms": round(p(admitted, 50) * 1e3, 1), "admitted_p99_ms": round(p(admitted, 99) * 1e3, 1),
        "admitted_max_ms": round(max(admitted, default=0) * 1e3, 1),
        "refused_p50_ms": round(p(refused, 50) * 1e3, 1), "refused_p99_ms": round(p(refused, 99) * 1e3, 1),
        "send_lag_p99_ms": round(p(lag, 99) * 1e3, 1),
        "rss_before_mb": round(rss_before, 1), "rss_peak_mb": round(rss_peak, 1),
        "recovery_rps": round(recovery, 1), "capacity_statuses": capacity_statuses,
        "recovery_statuses": recovery_statuses,
        "server_cpu_cores": round(cpu["server"], 2), "generator_cpu_cores": round(cpu["generator"], 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


#: the generator's own schedule slipped this much (p99): the machine was busy with other work, and the run
#: measured that, not the server
STARVED_LAG_S = 0.05


def test_overload_at_three_times_capacity(server):
    for attempt in (1, 2):
        s = measure(server)
        print(f"\noverload (attempt {attempt}):", json.dumps(s))
        if s["send_lag_p99_ms"] / 1e3 < STARVED_LAG_S:
            break
    if os.environ.get("MODELSERVE_OVERLOAD_REPORT"):
        Path(os.environ["MODELSERVE_OVERLOAD_REPORT"]).write_text(json.dumps(s, indent=2))
    assert s["send_lag_p99_ms"] / 1e3 < STARVED_LAG_S, f"the load generator could not keep its schedule twice: {s}"

    capacity = s["capacity_rps"]
    assert capacity > 30, s  # the model allows ~100/s; far less means the machine is starved
    assert 429 not in s["capacity_statuses"] and 429 not in s["recovery_statuses"], s  # 6 clients < the cap of 8
    assert s["other"] == 0, s  # no 5xx beside 503, no client error or time-out
    assert s["sent"] >= 0.95 * 3 * capacity * OVERLOAD_S, s
    assert s["refused_429_503"] >= 0.4 * s["sent"], s  # it was overloaded, and the excess was refused
    assert s["admitted_p99_ms"] < 1000, s
    assert s["refused_p99_ms"] < 100, s
    assert s["goodput_rps"] >= 0.8 * capacity, s
    assert s["rss_peak_mb"] - s["rss_before_mb"] < 100, s
    assert s["recovery_rps"] >= 0.8 * capacity, s
