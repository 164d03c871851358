"""Images in versus tensors in: what the declared image preprocessing costs, measured in one run.

    .venv/bin/python benchmarks/vision_preprocess.py [--model small224|digits] [--seconds 6] [--warmup 1]
                                                     [--rounds 2] [--concurrency 8 32] [--no-fast]
                                                     [--out benchmarks/results]

``--model small224`` (default): a 224x224 RGB classifier built here without downloads (a MobileNet-like
CNN, random weights, torch seed 0, ``torch.onnx.export``: ``input`` FP32 [N, 3, 224, 224] -> ``logits``
[N, 1000]) in three model folders served by one ``modelserve serve`` (``--no-payload-log``):

  small224             tensors in (the client preprocessed them);
  small224-image       the same ONNX file with ``preprocess:`` (resize 256 shorter side, centre crop 224,
                       ImageNet mean/std, NCHW, FP32) and ``postprocess:`` (classification, softmax, top 5);
  small224-image-fast  the same with ``fast_decode: true`` (opt-in, not bit-exact; ``--no-fast`` drops it);

each ``max_batch_size 32``, dynamic batching (preferred 8/16, 2 ms queue delay) and ``instances: 2`` of one
ONNX Runtime thread each (one per core, as the serving-core benchmark found best on 2 cores). Images:
scikit-image's bundled photographs (astronaut, coffee, chelsea; nothing downloaded) as JPEG (quality 90)
at 500x375 and 224x224. Paths, one image per request:

  tensor      POST /v2/models/small224/infer, V2 binary, FP32 [1, 3, 224, 224]: the server's own
              preprocessing of the same JPEGs, done by the client (the floor the image paths are compared with);
  predict     POST /models/small224-image/predict, the JPEG as the raw body;
  v2-bytes    POST /v2/models/small224-image/infer, V2 binary, the JPEG as a BYTES [1, 1] input;
  ... fast    the same two paths to small224-image-fast.

The results file also times the preprocessing alone in this process (exact vs fast_decode, plus a
1024x768 JPEG where the draft applies) and reports how far apart the two outputs are.

``--model digits``: the demo's 8x8 digits classifier (``modelserve.demo.build_demo_repository``): `digits`
takes tensors (`pixels` FP32 [N, 64]) and `digits-image` is the same ONNX file with `preprocess:` (decode,
grey, area-resize to 8x8, scale) and a top-3 `postprocess:`; images: the demo's 64x64 grey PNG samples, a
224x224 and a 640x480 RGB JPEG (the digits drawn on a textured, photo-like background). Inference is
almost free there, so it measures per-request overhead more than preprocessing.

One asyncio client (aiohttp, one keep-alive connection per concurrent worker, bodies built once up
front, V2 binary bodies by tritonclient's own encoder) drives each phase for a fixed time. The machine
is shared and noisy, so the figures are ratios within a run: each round runs every (image, path) phase
once, rounds alternate the order (A,B,...,B,A), and a path's throughput is compared with the tensor
phases of the same rounds. Where the time goes comes from the server's own stage histograms
(`GET /metrics`, `modelserve_request_duration_seconds{stage=...}`, deltas over each phase): mean queue /
preprocess / inference / postprocess / total per request, plus the server process's CPU time per request
(/proc/<pid>/stat) against the client's. Output: results/vision-224-<stamp>.md (small224) or
results/vision-<stamp>.md (digits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def build_digits_phases(repo: Path) -> tuple[list[dict], dict]:
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
               "requests": [tensor_request(g) for g in digits], "expect": list(range(10)), "label": "label"}]
    for name, (ctype, blobs) in sets.items():
        phases.append({"image": name, "path": "predict", "model": IMAGE_MODEL,
                       "url": f"/models/{IMAGE_MODEL}/predict",
                       "requests": [(b, {"Content-Type": ctype}) for b in blobs], "expect": list(range(10))})
        phases.append({"image": name, "path": "v2-bytes", "model": IMAGE_MODEL,
                       "url": f"/v2/models/{IMAGE_MODEL}/infer",
                       "requests": [bytes_request(b) for b in blobs], "expect": list(range(10))})
    return phases, described



# ---------------------------------------------------------------- the 224x224 classifier

SMALL = "small224"
SMALL_IMAGE = "small224-image"
SMALL_FAST = "small224-image-fast"  # the same with ``fast_decode: true`` (opt-in, not bit-exact)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL_BATCHING = """max_batch_size: 32
dynamic_batching:
  preferred_batch_size: [8, 16]
  max_queue_delay_microseconds: 2000
instances: 2                   # two single-threaded ONNX Runtime sessions: one per core (see benchmarks/README.md)
runtime:
  intra_op_threads: 1
"""
SMALL_PREPROCESS = """preprocess:
  input: image
  color: RGB
  resize: 256
  center_crop: [224, 224]
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  layout: NCHW
postprocess:
  kind: classification
  softmax: true
  top_k: 5
"""


def build_small224(path: Path) -> None:
    """A MobileNet-like CNN (3x3 stem, seven depthwise-separable blocks, five stride 2, global pool,
    linear to 1000 classes; ~0.4 M parameters... x2 width), random weights (torch seed 0), exported
    with torch.onnx.export: input FP32 [N, 3, 224, 224] -> logits [N, 1000]. Nothing downloaded."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                             nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        block(32, 64, 2), block(64, 128, 2), block(128, 128, 1), block(128, 256, 2), block(256, 256, 1),
        block(256, 512, 2), block(512, 512, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)).eval()
    for m in net.modules():  # random, non-trivial batch-norm statistics (else BN folds to identity)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)


def build_small_repository(repo: Path) -> Path:
    """``small224`` (tensors in, logits out) and ``small224-image`` (the same ONNX file; JPEG in, top-5
    out), both batched the same way."""
    onnx_file = repo / SMALL / "1" / "model.onnx"
    build_small224(onnx_file)
    (repo / SMALL / "config.yaml").write_text(f"name: {SMALL}\n" + SMALL_BATCHING)
    (repo / SMALL_IMAGE / "1").mkdir(parents=True)
    (repo / SMALL_IMAGE / "1" / "model.onnx").write_bytes(onnx_file.read_bytes())
    (repo / SMALL_IMAGE / "config.yaml").write_text(f"name: {SMALL_IMAGE}\n" + SMALL_BATCHING + SMALL_PREPROCESS)
    (repo / SMALL_FAST / "1").mkdir(parents=True)
    (repo / SMALL_FAST / "1" / "model.onnx").write_bytes(onnx_file.read_bytes())
    (repo / SMALL_FAST / "config.yaml").write_text(
        f"name: {SMALL_FAST}\n" + SMALL_BATCHING + SMALL_PREPROCESS.replace("  layout: NCHW\n", "  layout: NCHW\n  fast_decode: true\n"))
    return onnx_file


def photos(size: tuple[int, int]) -> list[Image.Image]:
    """scikit-image's bundled photographs (astronaut, coffee, chelsea: in the package, nothing downloaded),
    centre-cropped to the aspect of ``size`` (w, h) and resized to it with Lanczos."""
    import skimage.data as sk

    out = []
    for pixels in (sk.astronaut(), sk.coffee(), sk.chelsea()):
        img = Image.fromarray(pixels)
        w, h = img.size
        tw, th = size
        if w * th > h * tw:
            cw = h * tw // th
            img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        else:
            ch = w * th // tw
            img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
        out.append(img.resize(size, Image.LANCZOS))
    return out


def build_small_phases(repo: Path, fast: bool = True) -> tuple[list[dict], dict]:
    import onnxruntime as ort

    from modelserve.vision import ImagePreprocess, Preprocessor

    onnx_file = build_small_repository(repo)
    pre = Preprocessor(ImagePreprocess(resize=256, center_crop=(224, 224), mean=MEAN, std=STD))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    sets = {"jpeg 500x375": [encode(p, "JPEG") for p in photos((500, 375))],
            "jpeg 224x224": [encode(p, "JPEG") for p in photos((224, 224))]}
    described = {name: f"{statistics.mean(len(b) for b in blobs) / 1024:.1f} KiB" for name, blobs in sets.items()}
    tensors, expect = [], []
    for blobs in sets.values():
        for b in blobs:  # the client preprocesses exactly as the server would: same tensor, same top-1
            array = pre(b)[0][None]
            tensors.append(array)
            expect.append(int(session.run(None, {"input": array})[0].argmax()))
    phases = [{"image": "tensor FP32 [1,3,224,224]", "path": "tensor", "model": SMALL,
               "url": f"/v2/models/{SMALL}/infer", "requests": [small_tensor_request(t) for t in tensors],
               "expect": expect, "label": None}]
    k = 0
    for name, blobs in sets.items():
        want = expect[k:k + len(blobs)]
        k += len(blobs)
        for model, suffix in ((SMALL_IMAGE, ""), (SMALL_FAST, " fast")) if fast else ((SMALL_IMAGE, ""),):
            phases.append({"image": name, "path": "predict" + suffix, "model": model,
                           "url": f"/models/{model}/predict",
                           "requests": [(b, {"Content-Type": "image/jpeg"}) for b in blobs], "expect": want})
            phases.append({"image": name, "path": "v2-bytes" + suffix, "model": model,
                           "url": f"/v2/models/{model}/infer",
                           "requests": [bytes_request(b) for b in blobs], "expect": want})
    return phases, described, dict(sets, **{"jpeg 1024x768": [encode(p, "JPEG") for p in photos((1024, 768))]})


def preprocess_alone(sets: dict[str, list[bytes]], seconds: float = 1.0) -> list[str]:
    """The preprocessing by itself, in this process, one thread: exact (default) vs ``fast_decode``,
    and how far apart their outputs are (in 0..255 pixel levels)."""
    from modelserve.vision import ImagePreprocess, Preprocessor

    spec = dict(resize=256, center_crop=(224, 224), mean=MEAN, std=STD)
    exact, fast = Preprocessor(ImagePreprocess(**spec)), Preprocessor(ImagePreprocess(**spec, fast_decode=True))
    levels = np.array(STD, np.float64)[:, None, None] * 255

    def per_image_ms(pre, blobs) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pre(blobs[n % len(blobs)])
            n += 1
        return 1e3 * (time.perf_counter() - t0) / n

    rows = ["| image | exact ms/img | fast_decode ms/img | fast / exact | max abs diff (levels of 255) | mean abs diff |",
            "|---|---|---|---|---|---|"]
    for name, blobs in sets.items():
        diffs = [np.abs(exact(b)[0].astype(np.float64) - fast(b)[0]) * levels for b in blobs]
        a, b = [], []
        for _ in range(3):  # alternate, keep the best of each: the machine is shared
            a.append(per_image_ms(exact, blobs))
            b.append(per_image_ms(fast, blobs))
        rows.append(f"| {name} | {min(a):.3f} | {min(b):.3f} | {min(b) / min(a):.2f} | "
                    f"{max(d.max() for d in diffs):.2f} | {statistics.mean(d.mean() for d in diffs):.3f} |")
    return rows


def small_tensor_request(array: np.ndarray) -> tuple[bytes, dict]:
    x = httpclient.InferInput("input", list(array.shape), "FP32")
    x.set_data_from_numpy(array, binary_data=True)
    return v2_body([x], ["logits"])


def top1(phase: dict, status: int, headers, body: bytes) -> int | None:
    """The predicted class of one answer (to check that the phase really classifies)."""
    if status != 200:
        return None
    if phase["path"].startswith("predict"):
        return json.loads(body)["predictions"][0]["classes"][0]
    size = headers.get("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=int(size) if size else None)
    if phase["path"] == "tensor":
        if phase.get("label") is None:  # logits: the top-1 is their argmax
            return int(result.as_numpy("logits").reshape(-1).argmax())
        return int(result.as_numpy(phase["label"]).reshape(-1)[0])
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
                    checked.append((phase["expect"][n % len(requests)], top1(phase, status, r.headers, data)))
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
    ap.add_argument("--model", choices=["small224", "digits"], default="small224",
                    help="small224: a 224x224 RGB classifier (JPEG 500x375 / 224x224); digits: the demo's 8x8 model")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; even rounds run the phases in reverse order")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--no-fast", dest="fast", action="store_false",
                    help="small224: leave out the fast_decode model (small224-image-fast) and its phases")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    variants = {"current": {}}  # one server; the fast_decode variant is a second model folder on it
    alone: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        repo = Path(tmp) / "repo"
        if args.model == "digits":
            build_demo_repository(repo)
            phases, described = build_digits_phases(repo)
            image_model = IMAGE_MODEL
        else:
            phases, described, sets = build_small_phases(repo, args.fast)
            image_model = SMALL_IMAGE
            if args.fast:
                alone = preprocess_alone(sets)
                print("\n".join(alone), file=sys.stderr)
        servers = {}
        for name, env in variants.items():
            servers[name] = stack.enter_context(Server(repo, "--no-payload-log", env=env))
        base0 = f"http://{servers['current'].http_url}"
        config = httpx.get(f"{base0}/v2/models/{image_model}/config").json()
        batching = (f"max_batch_size {config.get('max_batch_size')}, dynamic_batching "
                    f"{json.dumps(config.get('dynamic_batching'))}, instances "
                    f"{sum(g.get('count', 1) for g in config.get('instance_group', []))}")
        # every (variant, phase) pair, interleaved: round 1 in order, round 2 reversed
        plan = [(v, i) for i in range(len(phases)) for v in variants]
        results: dict[tuple[str, int, int], list[dict]] = {}
        for conc in args.concurrency:
            for rnd in range(args.rounds):
                order = plan if rnd % 2 == 0 else plan[::-1]
                for v, i in order:
                    p, srv = phases[i], servers[v]
                    r = asyncio.run(run_phase(f"http://{srv.http_url}", srv.proc.pid, p, conc, args.seconds,
                                              args.warmup))
                    results.setdefault((v, conc, i), []).append(r)
                    print(f"c={conc} round {rnd + 1} {v:>7} {p['image']:>26} {p['path']:>8}: {r['rps']:7.0f}/s "
                          f"p50 {pct(r['lat'], .5):6.2f} ms p99 {pct(r['lat'], .99):6.2f} ms "
                          f"server {r['server_cpu_ms']:.3f} cpu-ms/img, failed {r['failures']}", file=sys.stderr)

    flags = f"--model {args.model} " + ("" if args.fast else "--no-fast ")
    lines = [f"# Images vs tensors: `{image_model}` preprocessing cost "
             f"({datetime.now().strftime('%Y-%m-%d %H:%M')})", "",
             f"`benchmarks/vision_preprocess.py {flags}--seconds {args.seconds:g} --warmup {args.warmup:g} "
             f"--rounds {args.rounds} --concurrency {' '.join(map(str, args.concurrency))}` — {os.cpu_count()} cores "
             f"(shared), {len(variants)} server(s) (`--no-payload-log`), one aiohttp client process; one image per "
             f"request; {args.rounds} interleaved rounds of {args.seconds:g} s per phase, pooled.", "",
             f"Images: " + ", ".join(f"{k} ≈ {v}" for k, v in described.items()) + f" (mean encoded size). "
             f"`{image_model}` batching: {batching}.", ""]
    if args.model == "small224":
        lines += ["Model: `small224`, a MobileNet-like CNN built by the script (random weights, torch seed 0), "
                  "FP32 [N,3,224,224] -> logits [N,1000]; `small224-image` is the same ONNX file with "
                  "`preprocess:` (resize 256 shorter side, centre crop 224, ImageNet mean/std, NCHW) and a top-5 "
                  "softmax `postprocess:`. `top-1 ok`: the answer's class equals the argmax of the model run "
                  "locally on the client's own preprocessed tensor of the same image.", ""]
    for conc in args.concurrency:
        for v in variants:
            merged = [merge(results[(v, conc, i)]) for i in range(len(phases))]
            tensor = merged[0]
            title = f"## Concurrency {conc}" + (f" — {v} image path" if len(variants) > 1 else "")
            lines += [title, "",
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
                      "latency is HTTP, the event loop and the client; `rest` = total minus the four stages: waiting "
                      "for the event loop and the thread hops between stages):", "",
                      "| image | path | queue | preprocess | inference (batch) | postprocess | rest (loop, hops) | "
                      "server total | client mean | preprocess share of server total |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for i, (p, m) in enumerate(zip(phases, merged)):
                s = m["stage_ms"]
                client_mean = 1e3 * statistics.mean(x for r in results[(v, conc, i)] for x in r["lat"])
                share = s["preprocess"] / s["total"] if s["total"] else 0.0
                lines.append(f"| {p['image']} | {p['path']} | {s['queue']:.3f} | {s['preprocess']:.3f} | "
                             f"{s['inference']:.3f} | {s['postprocess']:.3f} | "
                             f"{s['total'] - s['queue'] - s['preprocess'] - s['inference'] - s['postprocess']:.3f} | "
                             f"{s['total']:.3f} | {client_mean:.3f} | {100 * share:.0f} % |")
            lines.append("")
        fast = [(i, next(j for j, q in enumerate(phases) if q["image"] == p["image"] and q["path"] == p["path"] + " fast"))
                for i, p in enumerate(phases) if p.get("model") == SMALL_IMAGE and
                any(q["path"] == p["path"] + " fast" for q in phases)]
        if fast:
            lines += [f"### Concurrency {conc}: exact (default) vs `fast_decode: true`, same rounds", "",
                      "| image | path | exact images/s | fast images/s | fast / exact (per-round mean) | "
                      "exact vs tensor | fast vs tensor | server cpu-ms/img exact → fast | preprocess ms exact → fast | "
                      "p99 ms exact → fast |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            t = merge(results[("current", conc, 0)])
            for i, j in fast:
                e, f = merge(results[("current", conc, i)]), merge(results[("current", conc, j)])
                gain = statistics.mean(a / b for a, b in zip(f["per_round"], e["per_round"]))
                re_ = statistics.mean(a / b for a, b in zip(e["per_round"], t["per_round"]))
                rf = statistics.mean(a / b for a, b in zip(f["per_round"], t["per_round"]))
                lines.append(f"| {phases[i]['image']} | {phases[i]['path']} | {e['rps']:.0f} | {f['rps']:.0f} | "
                             f"{gain:.2f} | {re_:.2f} | {rf:.2f} | {e['server_cpu_ms']:.3f} → {f['server_cpu_ms']:.3f} | "
                             f"{e['stage_ms']['preprocess']:.2f} → {f['stage_ms']['preprocess']:.2f} | "
                             f"{e['p99']:.1f} → {f['p99']:.1f} |")
            lines.append("")
    if alone:
        lines += ["## Preprocessing alone (this process, one thread, best of 3 × 1 s each)", "",
                  "Exact (default) vs `fast_decode: true` (JPEG DCT draft down to the resize target, and only the "
                  "centre crop resized), and how far apart their outputs are in 0..255 pixel levels "
                  "(1024x768 is not served above: it shows the draft, which the two served sizes are too small for).",
                  "", *alone, ""]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "vision-224" if args.model == "small224" else "vision"
    path = args.out / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(table + "\n")
    print(f"\nwritten to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
