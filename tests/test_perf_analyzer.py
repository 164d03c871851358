"""Triton's own load generator, perf_analyzer, runs against modelserve unchanged.

The real binary needs glibc 2.38 (see benchmarks/README.md: `benchmarks/run.sh` installs it under
.bench/). When it is absent these tests skip; tests/test_perf_analyzer_emulation.py replays the
same calls so CI checks the protocol either way.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [os.environ.get("MODELSERVE_PERF_ANALYZER", ""), str(ROOT / ".bench" / "tools" / "pa" / "perf_analyzer")]
PERF_ANALYZER = next((p for p in CANDIDATES if p and Path(p).is_file()), None)

pytestmark = pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer binary not installed (benchmarks/run.sh)")


@pytest.mark.parametrize("mode", ["http-binary", "http-json", "grpc", "grpc-streaming", "http-async"])
def test_perf_analyzer_runs(server, tmp_path, mode):
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"x": [0.25 * (i % 7) for i in range(16)]}]}))
    url = server.grpc_url if mode.startswith("grpc") else server.http_url
    cmd = [PERF_ANALYZER, "-m", "mlp", "-u", url, "-i", "grpc" if mode.startswith("grpc") else "http",
           "-b", "2", "--concurrency-range", "4:4", "--measurement-interval", "1000",
           "--stability-percentage", "1000", "--max-trials", "3", "--input-data", str(data),
           "-f", str(tmp_path / "out.csv")]
    if mode == "http-json":
        cmd += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
    if mode == "grpc-streaming":
        cmd += ["--streaming"]
    if mode == "http-async":
        cmd += ["--async"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert rows and float(rows[0]["Inferences/Second"]) > 0
    # server-side statistics were read (we advertise the extension): its section is in the report
    assert "Server:" in proc.stdout
