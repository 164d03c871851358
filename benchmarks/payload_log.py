"""What the payload log costs: throughput and p99 with every request logged versus the log off, one run.

    .venv/bin/python benchmarks/payload_log.py [--concurrency 1 8 32] [--window-ms 3000] [--rounds 2]
                                               [--verify 2000] [--profile 10] [--out benchmarks/results]
                                               [--control] [--pin] [--stopped]

The model is the serving-core benchmark's tiny MLP (`benchmarks/run.sh`, the lab's `make_models.py`:
784 -> 128 -> ReLU -> 10, `input` FP32 [B, 784] -> `output` [B, 10], torch's Linear init, seed 0),
rebuilt here with onnx.helper (Gemm nodes, as torch exports them; no torch needed), served with the same
`config.pbtxt` run.sh writes (max_batch_size 32, preferred 8/16/32, 2 ms queue delay, one instance,
intra_op_thread_count 1, `MODELSERVE_ORT_THREADS=0`).

Two `modelserve serve` processes run side by side: ON logs every request (the default, 100 %
sampling: `--monitor-db sqlite:///TMP/monitor.db --monitor-spill TMP/spill.jsonl`), OFF has
`--no-payload-log`. The load is NVIDIA's perf_analyzer (`.bench/tools/pa/perf_analyzer`, the C++ client
of the serving-core benchmark, with its settings: V2 HTTP binary, batch 1, sync, `--concurrency-range
C:C`, three `--window-ms` windows, `--stability-percentage 1000 --max-trials 3`, warm-up max(8, 2C)).
Phases alternate ON, OFF / OFF, ON ... per concurrency (rounds), so machine drift cancels; after each
ON phase the log is flushed (`POST /v2/logs/flush`) and the time that took is reported (a writer that
falls behind would show there). Reported per concurrency: inferences/s and p50/p99 of each, the cost
`1 - ON/OFF` throughput, the p99 ratio, and server CPU per request (/proc/<pid>/stat over the phase,
divided by the server's own success count).

Then the log is checked: a last phase sends exactly `--verify` requests (httpx, 8 threads) to ON, and
the rows counted in the SQLite file (`payload_log` table) must equal ON's successful inferences
(`/v2/models/mlp/stats`), and grow by exactly `--verify` in that phase; `GET /v2/logs/status` must show
nothing dropped, spilled or buffered. `--profile S` adds py-spy records (S seconds each, all samples
and GIL-holding samples, ON and OFF server in turn under perf_analyzer c=32; the ON server's writer
process is recorded alongside) and prints CPU µs per request by thread and function (py-spy from
`$PY_SPY`, PATH, .venv/bin, or /tmp/pyspy/bin/py-spy). The writer process's CPU per request is also
measured per ON phase (/proc, from the phase's start to the end of its flush: all the work of that
phase's records), and the 1-minute load average is printed: other work on the machine shows there.

`--control` is the A/A calibration: the ON server runs with the log off as well, so the same table then
shows what two identical servers measure apart (the noise floor of the ratios on this machine).
`--pin` gives the writer process a core of its own (as on a machine with cores to spare): both servers
and perf_analyzer on CPU 0, the ON server's writer process on CPU 1. `--stopped` adds a third phase per
round: the ON server with its writer process stopped (SIGSTOP; SIGCONT and a flush after), the request
path's share of the cost apart from the running writer's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server  # noqa: E402 - the tests' server helper

PERF_ANALYZER = os.environ.get("MODELSERVE_PERF_ANALYZER") or str(ROOT / ".bench" / "tools" / "pa" / "perf_analyzer")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIG = """name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "input" data_type: TYPE_FP32 dims: [ 784 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching {
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
}
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def build_repository(repo: Path) -> Path:
    """The lab's MLP 784-128-10 (Gemm, transB=1, as torch.onnx exports nn.Linear) and run.sh's config."""
    rng = np.random.default_rng(0)
    inits = []
    for name, fan_in, fan_out in (("fc1", 784, 128), ("fc2", 128, 10)):
        bound = 1 / np.sqrt(fan_in)  # torch's default Linear init range
        inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32),
                                             f"{name}.weight"))
        inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, fan_out).astype(np.float32), f"{name}.bias"))
    nodes = [helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["output"], transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (repo / "mlp" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "mlp" / "1" / "model.onnx"))
    (repo / "mlp" / "config.pbtxt").write_text(CONFIG)
    data = repo.parent / "pa_input.json"  # a real-valued sample, as the lab's pa_input.json
    data.write_text(json.dumps({"data": [{"input": np.random.default_rng(1).random(784).round(4).tolist()}]}))
    return data


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def writer_pids(srv: Server) -> list[int]:
    """The server's payload-log writer process(es): its children running ``modelserve.monitor.writer``."""
    pids = []
    for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if b"modelserve.monitor.writer" in Path(f"/proc/{child}/cmdline").read_bytes():
                    pids.append(child)
            except OSError:
                continue
    return pids


def writer_cpu_s(srv: Server) -> float:
    total = 0.0
    for pid in writer_pids(srv):
        try:
            total += proc_cpu_s(pid)
        except OSError:
            pass
    return total


def successes(srv: Server) -> int:
    stats = httpx.get(f"http://{srv.http_url}/v2/models/mlp/stats", timeout=30).json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (threads and children made later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def pin(on: Server, off: Server) -> None:
    """``--pin``: both servers on CPU 0, the ON server's writer process on CPU 1."""
    for srv in (on, off):
        pin_process(srv.proc.pid, {0})
    for pid in writer_pids(on):
        pin_process(pid, {1})


def check_complete(on: Server, db: Path, n: int) -> dict:
    """Every answered request in the log: rows equal successes, and grow by exactly ``n`` for ``n`` sent."""
    flush(on)
    rows0, answered0 = db_rows(db), successes(on)
    sent_ok = send_exactly(on, n)
    _, status = flush(on)
    verify = {"rows_before": rows0, "answered_before": answered0, "sent": n, "sent_ok": sent_ok,
              "rows_after": db_rows(db), "answered_after": successes(on), "status": status}
    print(f"verify: {json.dumps(verify)}", file=sys.stderr)
    return verify


def perf_analyzer(srv: Server, data: Path, conc: int, window_ms: int, out: Path, pinned: bool = False) -> dict:
    csv_path = out / f"pa-{srv.http_port}-{conc}-{time.monotonic_ns()}.csv"
    cmd = [PERF_ANALYZER, "-m", "mlp", "-u", srv.http_url, "-i", "http", "-b", "1",
           "--concurrency-range", f"{conc}:{conc}", "--measurement-interval", str(window_ms),
           "--stability-percentage", "1000", "--max-trials", "3", "--warmup-request-count", str(max(8, 2 * conc)),
           "--input-data", str(data), "-f", str(csv_path)]
    n0, cpu0, t0 = successes(srv), proc_cpu_s(srv.proc.pid), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pinned else None)
    n1, cpu1, t1 = successes(srv), proc_cpu_s(srv.proc.pid), time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    row = next(csv.DictReader(csv_path.open()))
    return {"ips": float(row["Inferences/Second"]), "p50": float(row["p50 latency"]) / 1e3,
            "p99": float(row["p99 latency"]) / 1e3, "requests": n1 - n0,
            "cpu_us": 1e6 * (cpu1 - cpu0) / max(n1 - n0, 1), "cores": (cpu1 - cpu0) / (t1 - t0),
            "load": os.getloadavg()[0]}


def flush(srv: Server) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(f"http://{srv.http_url}/v2/logs/flush", params={"timeout_s": 60}, timeout=90)
    return time.perf_counter() - t0, r.json()


def db_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return con.execute("SELECT COUNT(*) FROM payload_log").fetchone()[0]


def send_exactly(srv: Server, n: int, threads: int = 8) -> int:
    """``n`` V2 binary requests (what tritonclient.http sends), split over ``threads`` keep-alive clients."""
    import tritonclient.http as httpclient

    x = httpclient.InferInput("input", [1, 784], "FP32")
    x.set_data_from_numpy(np.random.default_rng(2).random((1, 784), np.float32), binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [x], outputs=[httpclient.InferRequestedOutput("output", binary_data=True)])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    ok = [0] * threads

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as c:
            for _ in range(n // threads + (i < n % threads)):
                ok[i] += c.post("/v2/models/mlp/infer", content=body, headers=headers).status_code == 200

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(ok)


def py_spy() -> str | None:
    for candidate in (os.environ.get("PY_SPY"), shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy"),
                      "/tmp/pyspy/bin/py-spy"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def profile(srv: Server, data: Path, seconds: int, out: Path, gil: bool, rate: int = 200) -> dict:
    """py-spy record (collapsed stacks, per thread) of one server, and of its payload-log writer process
    when it has one, while perf_analyzer holds c=32 on it; the server's successful inferences over the
    recording turn samples into CPU µs per request."""
    raw = out / f"pyspy-{srv.http_port}-{'gil' if gil else 'all'}.txt"
    pa = subprocess.Popen([PERF_ANALYZER, "-m", "mlp", "-u", srv.http_url, "-i", "http", "-b", "1",
                           "--concurrency-range", "32:32", "--measurement-interval", str(1000 * (seconds + 30)),
                           "--stability-percentage", "1000", "--max-trials", "3", "--input-data", str(data)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # past perf_analyzer's start and warm-up

    def record(pid: int, path: Path) -> subprocess.Popen:
        return subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
                                 str(rate), "--format", "raw", "--threads", "--full-filenames", "--nonblocking",
                                 "--output", str(path)] + (["--gil"] if gil else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    n0 = successes(srv)
    writers = writer_pids(srv)
    spies = [record(srv.proc.pid, raw)]
    if writers:
        spies.append(record(writers[0], raw.with_name(raw.stem + "-writer.txt")))
    for spy in spies:
        spy.wait(seconds + 60)
    n1 = successes(srv)
    pa.kill()
    pa.wait()
    summary = summarize(raw)
    summary["us_per_sample_per_req"] = 1e6 / rate / max(n1 - n0, 1)
    summary["ips"] = (n1 - n0) / seconds
    if writers and raw.with_name(raw.stem + "-writer.txt").exists():
        summary["writer"] = summarize(raw.with_name(raw.stem + "-writer.txt"))
    return summary


def py_spy_version() -> str:
    out = subprocess.run([py_spy(), "--version"], capture_output=True, text=True).stdout.split()
    return out[-1] if out else "?"


def summarize(raw: Path) -> dict:
    """Per thread (by name; pools' ``_N`` suffixes merged): its share of the samples, the functions with
    the most self samples, and the frames (anywhere on the stack) holding the most samples."""
    by_thread: Counter = Counter()
    self_fn: dict[str, Counter] = defaultdict(Counter)
    incl_fn: dict[str, Counter] = defaultdict(Counter)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.startswith("thread ("):
            continue
        frames = stack.split(";")
        # "thread (TID): NAME" -> NAME
        thread = re.sub(r"_\d+$", "_N", frames[0].split(": ", 1)[-1])
        frames, n = frames[1:], int(count)
        total += n
        by_thread[thread] += n
        if frames:
            self_fn[thread][short(frames[-1])] += n
        for f in {short(f) for f in frames}:
            incl_fn[thread][f] += n
    return {"total": total, "threads": by_thread, "self": self_fn, "incl": incl_fn}


def short(frame: str) -> str:
    """ "fn (/long/path/site-packages/pkg/mod.py:123)" -> "fn (pkg/mod.py)" (line numbers merged)."""
    fn, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{fn} ({path})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window (3 per phase)")
    ap.add_argument("--rounds", type=int, default=2, help="ON,OFF then OFF,ON ... per concurrency")
    ap.add_argument("--verify", type=int, default=2000, help="requests of the exact-count check")
    ap.add_argument("--profile", type=int, default=0, help="seconds of py-spy on the ON server at c=32 (0 = none)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--control", action="store_true",
                    help="A/A run: the ON server has the log off too, so the table shows the measurement's own noise")
    ap.add_argument("--pin", action="store_true", help="servers and perf_analyzer on CPU 0, the writer process on "
                    "CPU 1 (the writer with a core of its own, as on a machine with cores to spare)")
    ap.add_argument("--stopped", action="store_true", help="a third phase per round: the ON server with its "
                    "writer process stopped (SIGSTOP, then SIGCONT and a flush): the request path's share alone")
    args = ap.parse_args()
    if args.stopped and args.control:
        ap.error("--stopped needs a writer process: not with --control")
    if not Path(PERF_ANALYZER).is_file():
        sys.exit(f"perf_analyzer not found at {PERF_ANALYZER} (benchmarks/run.sh installs it; or set "
                 "MODELSERVE_PERF_ANALYZER)")
    env = {"MODELSERVE_ORT_THREADS": "0"}
    results: dict[tuple[str, int], list[dict]] = defaultdict(list)
    flushes: list[tuple[int, float]] = []
    report: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = build_repository(tmp / "repo")
        db = tmp / "monitor.db"
        logging = ["--no-payload-log"] if args.control else [
            "--monitor-db", f"sqlite:///{db}", "--monitor-spill", str(tmp / "spill.jsonl")]
        with Server(tmp / "repo", *logging, env=env) as on, Server(tmp / "repo", "--no-payload-log", env=env) as off:
            servers = {"on": on, "off": off}
            if args.pin:
                pin(on, off)
            for conc in args.concurrency:
                for rnd in range(args.rounds):
                    phases = ("on", "stopped", "off") if args.stopped else ("on", "off")
                    for name in (phases if rnd % 2 == 0 else phases[::-1]):
                        w0 = writer_cpu_s(on)
                        writers = writer_pids(on) if name == "stopped" else []
                        for pid in writers:
                            os.kill(pid, signal.SIGSTOP)
                        try:
                            r = perf_analyzer(servers.get(name, on), data, conc, args.window_ms, tmp, args.pin)
                        finally:
                            for pid in writers:
                                os.kill(pid, signal.SIGCONT)
                        results[(name, conc)].append(r)
                        extra = ""
                        if name == "stopped":
                            flush(on)  # the phase's records, stored before the next phase
                        elif name == "on" and not args.control:
                            took, _ = flush(on)
                            flushes.append((conc, took))
                            r["writer_us"] = 1e6 * (writer_cpu_s(on) - w0) / max(r["requests"], 1)
                            extra = f", flush after {1e3 * took:.0f} ms, writer process {r['writer_us']:.0f} cpu-µs/req"
                        print(f"c={conc} round {rnd + 1} log {name:>3}: {r['ips']:8.0f} inf/s p50 {r['p50']:.2f} ms "
                              f"p99 {r['p99']:.2f} ms, {r['cpu_us']:.0f} server cpu-µs/req{extra}", file=sys.stderr)

            # -- is every request in the log?
            verify = None if args.control else check_complete(on, db, args.verify)

            prof = {}
            if args.profile:
                if py_spy() is None:
                    print("py-spy not found: no profile", file=sys.stderr)
                else:
                    for gil in (False, True):
                        for name in ("on", "off"):
                            prof[(name, gil)] = profile(servers[name], data, args.profile, tmp, gil)
                            print(f"profiled log {name} gil={gil}: {prof[(name, gil)]['ips']:.0f} inf/s while "
                                  "sampled", file=sys.stderr)
                        if not args.control:
                            flush(on)

    stamp = datetime.now()
    flags = "".join(f" --{f}" for f in ("control", "pin", "stopped") if getattr(args, f))
    servers_said = ("two servers, both `--no-payload-log` (`--control`: an A/A run, ON is a second OFF; the "
                    "differences are the measurement's own noise)" if args.control else
                    "two servers (log ON: SQLite + spill file; log OFF: `--no-payload-log`)")
    if args.pin:
        servers_said += "; `--pin`: servers and perf_analyzer on CPU 0, the writer process on CPU 1"
    report += [f"# Payload log at 100 % sampling vs off ({stamp.strftime('%Y-%m-%d %H:%M')})", "",
               f"`benchmarks/payload_log.py --concurrency {' '.join(map(str, args.concurrency))} --window-ms "
               f"{args.window_ms} --rounds {args.rounds} --verify {args.verify}"
               f"{f' --profile {args.profile}' if args.profile else ''}{flags}` — {os.cpu_count()} cores (shared "
               f"with other work), tiny MLP 784-128-10 (run.sh's config), perf_analyzer V2 HTTP binary, batch 1, "
               f"sync; {servers_said}; phases alternated ON,OFF / OFF,ON; figures pooled over {args.rounds} rounds "
               "(perf_analyzer's last window each).", "",
               "| concurrency | OFF inf/s | ON inf/s | cost 1-ON/OFF | OFF p50 ms | ON p50 ms | OFF p99 ms | ON p99 ms "
               "| p99 ON/OFF | server cpu-µs/req OFF | ON | writer process cpu-µs/req | per-round ON/OFF "
               "| per-round p99 ON/OFF | flush after ON phase (max) | load avg (1 min) |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = worst_p99 = 0.0
    mean = lambda rs, k: statistics.mean(r.get(k, 0.0) for r in rs)  # noqa: E731
    for conc in args.concurrency:
        on_r, off_r = results[("on", conc)], results[("off", conc)]
        cost = 1 - mean(on_r, "ips") / mean(off_r, "ips")
        p99 = mean(on_r, "p99") / mean(off_r, "p99")
        worst, worst_p99 = max(worst, cost), max(worst_p99, p99)
        per_round = ", ".join(f"{a['ips'] / b['ips']:.2f}" for a, b in zip(on_r, off_r))
        per_round_p99 = ", ".join(f"{a['p99'] / b['p99']:.2f}" for a, b in zip(on_r, off_r))
        fl = max((t for c, t in flushes if c == conc), default=None)
        report.append(f"| {conc} | {mean(off_r, 'ips'):.0f} | {mean(on_r, 'ips'):.0f} | **{100 * cost:.1f} %** | "
                      f"{mean(off_r, 'p50'):.2f} | {mean(on_r, 'p50'):.2f} | {mean(off_r, 'p99'):.2f} | "
                      f"{mean(on_r, 'p99'):.2f} | **{p99:.2f}** | "
                      f"{mean(off_r, 'cpu_us'):.0f} | {mean(on_r, 'cpu_us'):.0f} | {mean(on_r, 'writer_us'):.0f} | "
                      f"{per_round} | {per_round_p99} | {'–' if fl is None else f'{1e3 * fl:.0f} ms'} | "
                      f"{min(r['load'] for r in on_r + off_r):.1f}-{max(r['load'] for r in on_r + off_r):.1f} |")
    if args.stopped:
        report += ["", "The request path's share: the ON server with its writer process stopped (SIGSTOP) for the phase.",
                   "", "| concurrency | OFF inf/s | writer stopped inf/s | cost 1-stopped/OFF | p99 stopped/OFF | "
                   "server cpu-µs/req OFF → stopped → ON |", "|---|---|---|---|---|---|"]
        for conc in args.concurrency:
            st_r, on_r, off_r = (results[(n, conc)] for n in ("stopped", "on", "off"))
            report.append(f"| {conc} | {mean(off_r, 'ips'):.0f} | {mean(st_r, 'ips'):.0f} | "
                          f"{100 * (1 - mean(st_r, 'ips') / mean(off_r, 'ips')):.1f} % | "
                          f"{mean(st_r, 'p99') / mean(off_r, 'p99'):.2f} | {mean(off_r, 'cpu_us'):.0f} → "
                          f"{mean(st_r, 'cpu_us'):.0f} → {mean(on_r, 'cpu_us'):.0f} |")
    met = worst < 0.10 and worst_p99 < 1.10
    report += ["", f"Target: cost < 10 % at 100 % sampling, throughput and p99 — worst throughput cost "
               f"{100 * worst:.1f} %, worst p99 ratio {worst_p99:.2f}: **{'met' if met else 'NOT met'}**"
               f"{' (an A/A run: no log, so these are noise)' if args.control else ''}.", ""]
    if verify is not None:
        st = verify["status"]
        logged = verify["rows_after"] - verify["rows_before"]
        complete = verify["rows_after"] == verify["answered_after"] and logged == verify["sent"] == verify["sent_ok"]
        report += ["Log completeness (ON server, after `POST /v2/logs/flush`): "
                   f"rows in `payload_log` = {verify['rows_after']}, successful inferences by `/v2/models/mlp/stats` = "
                   f"{verify['answered_after']}; exact-count phase: sent {verify['sent']} ({verify['sent_ok']} answered "
                   f"200), rows grew by {logged} → **{'complete' if complete else 'MISMATCH'}**. `/v2/logs/status`: "
                   f"written {st.get('written')}, dropped {st.get('dropped')}, spilled {st.get('spilled')}, buffered "
                   f"{st.get('buffered')}, database_error {st.get('database_error')}.", ""]
    if prof:
        report += [f"## Where the time goes (py-spy {py_spy_version()} record --nonblocking, {args.profile} s per "
                   "profile, perf_analyzer c=32 on each server in turn)", "",
                   "CPU µs per request = samples × sampling interval / requests answered while sampled. `all` = "
                   "non-idle samples of a thread (running, GIL held or not); `GIL` = samples where that thread "
                   "holds the GIL (`--gil`) — the GIL is what the event loop waits for when another thread works.",
                   "", "| thread | ON all µs/req | ON GIL µs/req | OFF all µs/req | OFF GIL µs/req |",
                   "|---|---|---|---|---|"]
        threads = Counter()
        for p in prof.values():
            threads.update(p["threads"])

        def us(key, thread, fn=None, table="threads"):
            p = prof[key]
            n = p["threads"][thread] if fn is None else p[table][thread][fn]
            return n * p["us_per_sample_per_req"]

        for thread, _ in threads.most_common(8):
            report.append(f"| {thread} | {us(('on', False), thread):.0f} | {us(('on', True), thread):.0f} | "
                          f"{us(('off', False), thread):.0f} | {us(('off', True), thread):.0f} |")
        report.append(f"| **inf/s while sampled** | {prof[('on', False)]['ips']:.0f} | {prof[('on', True)]['ips']:.0f} "
                      f"| {prof[('off', False)]['ips']:.0f} | {prof[('off', True)]['ips']:.0f} |")
        report += ["", "Functions, ON server, by self time (the frame on top of the stack), µs per request:", "",
                   "| thread | function (self) | all µs/req | GIL µs/req |", "|---|---|---|---|"]
        for thread in ("payload-log", "payload-db_N"):
            for fn, _ in prof[("on", False)]["self"][thread].most_common(12):
                report.append(f"| {thread} | {fn} | {us(('on', False), thread, fn, 'self'):.1f} | "
                              f"{us(('on', True), thread, fn, 'self'):.1f} |")
        report += ["", "The same, inclusive (anywhere on the stack), payload-log and monitor frames:", "",
                   "| thread | function (inclusive) | all µs/req | GIL µs/req |", "|---|---|---|---|"]
        for thread in ("payload-log", "payload-db_N"):
            picked = [fn for fn, _ in prof[("on", False)]["incl"][thread].most_common(300)
                      if "modelserve/" in fn and "_bootstrap" not in fn][:12]
            for fn in picked:
                report.append(f"| {thread} | {fn} | {us(('on', False), thread, fn, 'incl'):.1f} | "
                              f"{us(('on', True), thread, fn, 'incl'):.1f} |")
        if "writer" in prof[("on", False)]:
            report += ["", "Writer process (`modelserve.monitor.writer`, nice +10), sampled alongside the ON server, "
                       "µs per request of the server:", "", "| thread | all µs/req | GIL µs/req |", "|---|---|---|"]

            def wus(gil_, thread, fn=None, table="threads"):
                p = prof[("on", gil_)]
                w = p.get("writer")
                if w is None:
                    return 0.0
                n = w["threads"][thread] if fn is None else w[table][thread][fn]
                return n * p["us_per_sample_per_req"]

            wthreads = prof[("on", False)]["writer"]["threads"]
            for thread, _ in wthreads.most_common(6):
                report.append(f"| {thread} | {wus(False, thread):.1f} | {wus(True, thread):.1f} |")
            report.append(f"| **all threads** | {sum(wus(False, t) for t in wthreads):.1f} | "
                          f"{sum(wus(True, t) for t in prof[('on', True)].get('writer', {}).get('threads', {})):.1f} |")
            report += ["", "Writer process functions by self time, µs per request:", "",
                       "| thread | function (self) | all µs/req |", "|---|---|---|"]
            for thread, _ in wthreads.most_common(3):
                for fn, _ in prof[("on", False)]["writer"]["self"][thread].most_common(10):
                    report.append(f"| {thread} | {fn} | {wus(False, thread, fn, 'self'):.1f} |")
        report += ["", "Event loop (MainThread): self time per request, ON minus OFF, the largest differences "
                   "(positive = ON spends more):", "",
                   "| function (self) | ON all µs/req | OFF all µs/req | ON − OFF | ON GIL | OFF GIL |",
                   "|---|---|---|---|---|---|"]
        fns = set(prof[("on", False)]["self"]["MainThread"]) | set(prof[("off", False)]["self"]["MainThread"])
        diffs = sorted(fns, key=lambda f: -abs(us(("on", False), "MainThread", f, "self")
                                                - us(("off", False), "MainThread", f, "self")))
        for fn in diffs[:14]:
            a, b = us(("on", False), "MainThread", fn, "self"), us(("off", False), "MainThread", fn, "self")
            report.append(f"| {fn} | {a:.1f} | {b:.1f} | {a - b:+.1f} | "
                          f"{us(('on', True), 'MainThread', fn, 'self'):.1f} | "
                          f"{us(('off', True), 'MainThread', fn, 'self'):.1f} |")
        report.append("")
    table = "\n".join(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"payload-log-{stamp.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(table + "\n")
    print(f"\nwritten to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
