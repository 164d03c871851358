"""Images in versus tensors in: what the declared image preprocessing costs, measured in one run.

    .venv/bin/python benchmarks/vision_preprocess.py [--seconds 6] [--warmup 1] [--rounds 2]
                                                     [--concurrency 8 32] [--out benchmarks/results]

One `modelserve serve` process (`--no-payload-log`, so that only the image path is measured) serves
the demo repository (`modelserve.demo.build_demo_repository`): `digits` takes tensors (`pixels` FP32
[N, 64]) and `digits-image` is the same ONNX file with `preprocess:` (decode, grey, area-resize to
8x8, scale) and a top-3 `postprocess:` in its config. One asyncio client (aiohttp, one keep-alive
connection per concurrent worker, bodies built once up front) drives, for a fixed time each:

  tensor      POST /v2/models/digits/infer, V2 binary (tritonclient's own request encoder), FP32 [1, 64]
              already preprocessed by the client: the floor the image paths are compared with;
  predict     POST /models/digits-image/predict, the encoded image as the raw body;
  v2-bytes    POST /v2/models/digits-image/infer, V2 binary, the encoded image as a BYTES [1, 1] input.

for three images: the demo's 64x64 grey PNG samples, a 224x224 RGB JPEG and a 640x480 RGB JPEG (the
digits drawn on a textured, photo-like background; JPEG decode cost grows with the pixel count).
Every request carries one image, so images/s = requests/s; the ten digits rotate.

The machine is shared and noisy, so the figures are ratios within a run: each round runs every
(image, path) phase once, rounds alternate the order (A,B,...,B,A), and a path's throughput is
compared with the tensor phases of the same rounds. Where the time goes comes from the server's own
stage histograms (`GET /metrics`, `modelserve_request_duration_seconds{stage=...}`, deltas over each
phase): mean queue / preprocess / inference / postprocess / total per request, plus the server
process's CPU time per request (/proc/<pid>/stat) against the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import tritonclient.http as httpclient
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server  # noqa: E402 - the tests' server helper

from modelserve.demo import IMAGE_MODEL, LABELS, SAMPLE_ZOOM, build_demo_repository  # noqa: E402

SCALE = 16 / 255
STAGES = ("queue", "preprocess", "inference", "postprocess", "total")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- images and request bodies

def digit_images() -> list[np.ndarray]:
    """The ten 8x8 digits as 8-bit grey, exactly as the demo renders its samples."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    return [np.rint(images[d] * 255 / 16).astype(np.uint8) for d in range(10)]


def photo_like(grey8: np.ndarray, size: tuple[int, int], seed: int) -> Image.Image:
    """The digit drawn large on a faint, smooth colour background with some grain: an RGB picture that
    compresses like a photo (not like a flat synthetic image), the digit stretched over the frame (the
    model's exact 8x8 resize squeezes it back); the background is faint enough
    that the digits model still reads the digit (checked: the top-1 column)."""
    w, h = size
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    bg = np.asarray(low, dtype=np.float32) * 0.06
    digit = np.asarray(Image.fromarray(grey8, "L").resize((w, h), Image.BILINEAR), dtype=np.float32)
    bg += digit[..., None] * 0.9
    bg += rng.normal(0, 4, bg.shape)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    return img.filter(ImageFilter.GaussianBlur(0.6))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def v2_body(inputs, outputs: list[str]) -> tuple[bytes, dict]:
    """A V2 binary-extension request built by tritonclient itself (what its clients send)."""
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in outputs]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outs)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def tensor_request(grey8: np.ndarray) -> tuple[bytes, dict]:
    x = httpclient.InferInput("pixels", [1, 64], "FP32")
    x.set_data_from_numpy((grey8.reshape(1, 64).astype(np.float64) * SCALE).astype(np.float32), binary_data=True)
    return v2_body([x], ["label", "probabilities"])


def bytes_request(encoded: bytes) -> tuple[bytes, dict]:
    x = httpclient.InferInput("image", [1, 1], "BYTES")
    x.set_data_from_numpy(np.array([[encoded]], dtype=object), binary_data=True)
    return v2_body([x], ["labels", "scores", "classes"])


def build_phases(repo: Path) -> tuple[list[dict], dict]:
    """(phases, image descriptions): each phase = name, image set, path, url, ten (body, headers)."""
    digits = digit_images()
    pngs = [(repo / IMAGE_MODEL / "samples" / f"digit-{d}.png").read_bytes() for d in range(10)]
    sets = {
        "png 64x64": ("image/png", pngs),
        "jpeg 224x224": ("image/jpeg", [encode(photo_like(g, (224, 224), d), "JPEG") for d, g in enumerate(digits)]),
        "jpeg 640x480": ("image/jpeg", [encode(photo_like(g, (640, 480), d), "JPEG") for d, g in enumerate(digits)]),
    }
    described = {name: f"{statistics.mean(len(b) for b in blobs) / 1024:.1f} KiB" for name, (_, blobs) in sets.items()}
    phases = [{"image": "tensor FP32 [1,64]", "path": "tensor", "model": "digits", "url": "/v2/models/digits/infer",
               "requests": [tensor_request(g) for g in digits], "expect": list(range(10))}]
    for name, (ctype, blobs) in sets.items():
        phases.append({"image": name, "path": "predict", "model": IMAGE_MODEL,
                       "url": f"/models/{IMAGE_MODEL}/predict",
                       "requests": [(b, {"Content-Type": ctype}) for b in blobs], "expect": list(range(10))})
        phases.append({"image": name, "path": "v2-bytes", "model": IMAGE_MODEL,
                       "url": f"/v2/models/{IMAGE_MODEL}/infer",
                       "requests": [bytes_request(b) for b in blobs], "expect": list(range(10))})
    return phases, described


def top1(phase: dict, status: int, headers, body: bytes) -> int | None:
    """The predicted class of one answer (to check that the phase really classifies)."""
    if status != 200:
        return None
    if phase["path"] == "predict":
        return json.loads(body)["predictions"][0]["classes"][0]
    size = headers.get("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=int(size) if size else None)
    if phase["path"] == "tensor":
        return int(result.as_numpy("label").reshape(-1)[0])
    return int(result.as_numpy("classes").reshape(-1)[0])


# ---------------------------------------------------------------- server-side measurements

def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


_METRIC = re.compile(r'^modelserve_request_duration_seconds_(sum|count)\{(.*)\} (\S+)$')


async def stage_totals(session: aiohttp.ClientSession, model: str) -> dict:
    async with session.get("/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model") == model:
            out[(labels["stage"], m.group(1))] = float(m.group(3))
    return out


# ---------------------------------------------------------------- load

async def run_phase(base: str, pid: int, phase: dict, conc: int, seconds: float, warmup: float) -> dict:
    requests = phase["requests"]
    connector = aiohttp.TCPConnector(limit=conc + 1, force_close=False)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        lat: list[float] = []
        failures, checked = 0, []
        start = time.perf_counter()
        t0, t1 = start + warmup, start + warmup + seconds
        marks = {}

        async def worker(i: int) -> None:
            nonlocal failures
            n = i
            while True:
                now = time.perf_counter()
                if now >= t1:
                    return
                body, headers = requests[n % len(requests)]
                async with session.post(phase["url"], data=body, headers=headers) as r:
                    data = await r.read()
                    status = r.status
                done = time.perf_counter()
                if status != 200:
                    failures += 1
                if len(checked) < 10 and now >= t0:
                    checked.append((n % len(requests), top1(phase, status, r.headers, data)))
                if now >= t0:
                    lat.append(done - now)
                n += conc

        async def marker() -> None:
            await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            marks["cpu0"], marks["me0"] = proc_cpu_s(pid), sum(os.times()[:2])
            marks["stages0"] = await stage_totals(session, phase["model"])

        await asyncio.gather(marker(), *(worker(i) for i in range(conc)))
        elapsed = time.perf_counter() - t0
        cpu1, me1 = proc_cpu_s(pid), sum(os.times()[:2])
        stages1 = await stage_totals(session, phase["model"])
    lat.sort()
    n = len(lat)
    d = {k: stages1.get(k, 0.0) - marks["stages0"].get(k, 0.0) for k in stages1}
    stage_ms = {s: 1e3 * d[(s, "sum")] / d[(s, "count")] if d.get((s, "count")) else 0.0 for s in STAGES}
    return {"n": n, "seconds": elapsed, "rps": n / elapsed, "lat": lat, "failures": failures,
            "server_cpu_ms": 1e3 * (cpu1 - marks["cpu0"]) / max(n, 1),
            "client_cpu_ms": 1e3 * (me1 - marks["me0"]) / max(n, 1),
            "server_cores": (cpu1 - marks["cpu0"]) / elapsed, "stage_ms": stage_ms,
            "correct": sum(exp == got for exp, got in checked), "checked": len(checked)}


def pct(sorted_values: list[float], q: float) -> float:
    return 1e3 * sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def merge(runs: list[dict]) -> dict:
    lat = sorted(x for r in runs for x in r["lat"])
    n, secs = sum(r["n"] for r in runs), sum(r["seconds"] for r in runs)
    w = [r["n"] for r in runs]

    def wavg(key, sub=None):
        vals = [r[key][sub] if sub else r[key] for r in runs]
        return sum(v * k for v, k in zip(vals, w)) / max(sum(w), 1)

    return {"n": n, "rps": n / secs, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "failures": sum(r["failures"] for r in runs), "server_cpu_ms": wavg("server_cpu_ms"),
            "client_cpu_ms": wavg("client_cpu_ms"), "server_cores": statistics.mean(r["server_cores"] for r in runs),
            "stage_ms": {s: wavg("stage_ms", s) for s in STAGES},
            "correct": sum(r["correct"] for r in runs), "checked": sum(r["checked"] for r in runs),
            "per_round": [r["rps"] for r in runs]}


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; even rounds run the phases in reverse order")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repository(repo)
        phases, described = build_phases(repo)
        with Server(repo, "--no-payload-log") as srv:
            base = f"http://{srv.http_url}"
            config = httpx.get(f"{base}/v2/models/{IMAGE_MODEL}/config").json()
            batching = (f"max_batch_size {config.get('max_batch_size')}, dynamic_batching "
                        f"{json.dumps(config.get('dynamic_batching'))}")
            results: dict[tuple[int, int], list[dict]] = {}
            for conc in args.concurrency:
                for rnd in range(args.rounds):
                    order = list(range(len(phases)))
                    if rnd % 2:
                        order.reverse()
                    for i in order:
                        p = phases[i]
                        r = asyncio.run(run_phase(base, srv.proc.pid, p, conc, args.seconds, args.warmup))
                        results.setdefault((conc, i), []).append(r)
                        print(f"c={conc} round {rnd + 1} {p['image']:>18} {p['path']:>8}: {r['rps']:7.0f}/s "
                              f"p50 {pct(r['lat'], .5):6.2f} ms p99 {pct(r['lat'], .99):6.2f} ms "
                              f"server {r['server_cpu_ms']:.3f} cpu-ms/img, failed {r['failures']}", file=sys.stderr)

    lines = [f"# Images vs tensors: `{IMAGE_MODEL}` preprocessing cost "
             f"({datetime.now().strftime('%Y-%m-%d %H:%M')})", "",
             f"`benchmarks/vision_preprocess.py --seconds {args.seconds:g} --warmup {args.warmup:g} "
             f"--rounds {args.rounds} --concurrency {' '.join(map(str, args.concurrency))}` — {os.cpu_count()} cores "
             f"(shared), one server (`--no-payload-log`), one aiohttp client process; one image per request; "
             f"{args.rounds} interleaved rounds of {args.seconds:g} s per phase, pooled.", "",
             f"Images: " + ", ".join(f"{k} ≈ {v}" for k, v in described.items()) + f" (mean encoded size). "
             f"`{IMAGE_MODEL}` batching: {batching}.", ""]
    for conc in args.concurrency:
        merged = [merge(results[(conc, i)]) for i in range(len(phases))]
        tensor = merged[0]
        lines += [f"## Concurrency {conc}", "",
                  "| image | path | images/s | vs tensor | p50 ms | p99 ms | failed | top-1 ok | "
                  "server cpu-ms/img | client cpu-ms/img | server cores busy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p, m in zip(phases, merged):
            ratio = statistics.mean(a / b for a, b in zip(m["per_round"], tensor["per_round"]))
            lines.append(f"| {p['image']} | {p['path']} | {m['rps']:.0f} | {ratio:.2f} | {m['p50']:.2f} | "
                         f"{m['p99']:.2f} | {m['failures']} | {m['correct']}/{m['checked']} | "
                         f"{m['server_cpu_ms']:.3f} | {m['client_cpu_ms']:.3f} | {m['server_cores']:.2f} |")
        lines += ["", "Where the time goes (server stage histograms, mean ms per request over the measured "
                  "windows; `total` = the server's end-to-end time for the request, the rest of the client's "
                  "latency is HTTP, the event loop and the client; `rest` = total minus the four stages: waiting for the event "
                  "loop and the thread hops between stages):", "",
                  "| image | path | queue | preprocess | inference (batch) | postprocess | rest (loop, hops) | "
                  "server total | client mean | preprocess share of server total |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p, m, rs in zip(phases, merged, (results[(conc, i)] for i in range(len(phases)))):
            s = m["stage_ms"]
            client_mean = 1e3 * statistics.mean(x for r in rs for x in r["lat"])
            share = s["preprocess"] / s["total"] if s["total"] else 0.0
            lines.append(f"| {p['image']} | {p['path']} | {s['queue']:.3f} | {s['preprocess']:.3f} | "
                         f"{s['inference']:.3f} | {s['postprocess']:.3f} | "
                         f"{s['total'] - s['queue'] - s['preprocess'] - s['inference'] - s['postprocess']:.3f} | "
                         f"{s['total']:.3f} | {client_mean:.3f} | "
                         f"{100 * share:.0f} % |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vision-{datetime.now().strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(table + "\n")
    print(f"\nwritten to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
