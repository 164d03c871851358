"""What a model costs and how well it does, measured on this machine: ``Profile``; before vs after: ``Report``.

``measure`` runs an ONNX model with ONNX Runtime (CPU): file size, parameter count, weight sparsity,
latency p50/p95 at batch 1 and 32 (a short warm-up, then runs until a small time budget or a run count is
spent, so a model takes a few seconds at most), throughput at batch 32, and with labeled data top-1/top-5
accuracy of the first output shaped [N, classes]. Given the original's outputs it adds agreement (fraction
of equal top-1 predictions) and the largest absolute output difference.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from modelserve.data import Dataset, InputSpec, onnx_input_specs, random_inputs

BATCHES = (1, 32)
WARMUP = 3
MAX_RUNS = {1: 300, 32: 60}
BUDGET_S = {1: 0.4, 32: 0.8}
EVAL_BATCH = 64
Progress = Callable[[str, int, int], None] | None


@dataclass
class Profile:
    path: str
    size_bytes: int
    parameters: int
    sparsity: float
    latency_ms: dict[str, dict[str, float] | None] = field(default_factory=dict)  # "1"/"32" -> p50, p95, runs
    throughput: float | None = None  # samples/s at batch 32
    samples: int | None = None  # evaluated samples
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None

    def p50(self, batch: int) -> float | None:
        lat = self.latency_ms.get(str(batch))
        return lat["p50"] if lat else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    original: Profile
    result: Profile
    steps: list[dict] = field(default_factory=list)
    gates: dict = field(default_factory=lambda: {"notes": []})
    refused: str | None = None
    output: str | None = None

    def to_dict(self) -> dict:
        return {"original": self.original.to_dict(), "result": self.result.to_dict(), "steps": self.steps,
                "gates": self.gates, "refused": self.refused, "accepted": self.refused is None,
                "output": self.output, "summary": summary(self)}

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path


def summary(report: Report) -> dict:
    """Ratios and differences, result vs original (None where a figure is missing)."""
    o, r = report.original, report.result

    def ratio(a, b):
        return a / b if a and b else None

    drop = 100 * (o.top1 - r.top1) if o.top1 is not None and r.top1 is not None else None
    return {"size_ratio": ratio(o.size_bytes, r.size_bytes), "speedup_b1": ratio(o.p50(1), r.p50(1)),
            "speedup_b32": ratio(o.p50(32), r.p50(32)), "top1_drop_points": drop}


# --- measuring -------------------------------------------------------------------------------------------------


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_stats(path: Path) -> tuple[int, int, float]:
    """(file size in bytes incl. external data, parameter count, weight sparsity)."""
    from modelserve.optimize.prune import sparsity

    model = onnx.load(str(path))
    size = path.stat().st_size + sum((path.parent / e.value).stat().st_size for t in model.graph.initializer
                                     for e in t.external_data if e.key == "location")
    params = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.STRING, onnx.TensorProto.BOOL):
            continue  # shapes, indices
        if t.name.endswith(("_scale", "_zero_point")):
            continue  # quantization parameters
        params += int(np.prod(t.dims, dtype=np.int64))
    return size, params, sparsity(model)


def run_all(sess, data: dict[str, np.ndarray], batch: int = EVAL_BATCH, progress: Progress = None) -> list[np.ndarray]:
    """All outputs of ``sess`` over ``data``, batch by batch, concatenated."""
    n = len(next(iter(data.values())))
    parts: list[list[np.ndarray]] = []
    for i, start in enumerate(range(0, n, batch)):
        parts.append(sess.run(None, {k: v[start:start + batch] for k, v in data.items()}))
        if progress:
            progress("evaluating", i + 1, -(-n // batch))
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def classifier_output(outputs: list[np.ndarray], n: int) -> np.ndarray | None:
    """The first output shaped [N, classes] (classes > 1), as float32."""
    for out in outputs:
        if out.ndim == 2 and out.shape[0] == n and out.shape[1] > 1 and out.dtype.kind == "f":
            return out.astype(np.float32)
    return None


def latency(sess, specs: list[InputSpec], pool: dict[str, np.ndarray] | None) -> dict[str, dict | None]:
    """p50/p95 milliseconds per batch size; None for a batch size the model's fixed batch axis does not take."""
    out: dict[str, dict | None] = {}
    for batch in BATCHES:
        if any(s.shape and s.shape[0] not in (None, batch) for s in specs):
            out[str(batch)] = None
            continue
        feed = _batch_of(specs, pool, batch)
        for _ in range(WARMUP):
            sess.run(None, feed)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < MAX_RUNS[batch] and (len(times) < 5 or time.perf_counter() - start < BUDGET_S[batch]):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1e3
        out[str(batch)] = {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "runs": len(ms)}
    return out


def _batch_of(specs: list[InputSpec], pool: dict[str, np.ndarray] | None, batch: int) -> dict[str, np.ndarray]:
    if pool is None:
        return random_inputs(specs, batch)
    n = len(next(iter(pool.values())))
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in pool.items()}


def measure(path: Path, data: Dataset | None = None, reference: list[np.ndarray] | None = None,
            progress: Progress = None) -> tuple[Profile, list[np.ndarray] | None]:
    """Profile ``path``; ``data`` feeds the latency runs and, with labels, the accuracy; ``reference`` (the
    original's outputs on ``data``) gives agreement and max output difference. Returns the profile and the
    outputs on ``data`` (None without data)."""
    path = Path(path)
    size, params, sparse = model_stats(path)
    sess = session(path)
    specs = onnx_input_specs(path)
    profile = Profile(str(path), size, params, sparse)
    outputs = None
    if data is not None:
        outputs = run_all(sess, data.inputs, progress=progress)
        profile.samples = len(data)
        logits = classifier_output(outputs, len(data))
        if logits is not None and data.labels is not None:
            labels = data.labels.astype(np.int64)
            top = np.argsort(-logits, axis=1)[:, :5]
            profile.top1 = float((top[:, 0] == labels).mean())
            if logits.shape[1] >= 5:
                profile.top5 = float((top == labels[:, None]).any(axis=1).mean())
        if reference is not None:
            ref_logits = classifier_output(reference, len(data))
            if logits is not None and ref_logits is not None:
                profile.agreement = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
            diffs = [np.abs(a.astype(np.float64) - b.astype(np.float64)).max() for a, b in zip(outputs, reference)
                     if a.shape == b.shape and a.dtype.kind == "f" and b.dtype.kind == "f" and a.size]
            profile.max_abs_diff = float(max(diffs)) if diffs else None
    profile.latency_ms = latency(sess, specs, None if data is None else data.inputs)
    if profile.latency_ms.get("32"):
        profile.throughput = 32 / (profile.latency_ms["32"]["p50"] / 1e3)
    return profile, outputs


def remeasure_latency(profile: Profile, path: Path, data: Dataset | None) -> None:
    """Measure the latencies of ``profile`` (the model at ``path``) again, in place."""
    profile.latency_ms = latency(session(path), onnx_input_specs(path), None if data is None else data.inputs)
    if profile.latency_ms.get("32"):
        profile.throughput = 32 / (profile.latency_ms["32"]["p50"] / 1e3)


# --- progress and printing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(enabled: bool | None = None) -> Iterator[Progress]:
    """A ``progress(description, done, total)`` callback drawing rich bars on a terminal; None when not a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as Bars

    tasks: dict[str, int] = {}
    with Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              transient=True, console=Console(file=sys.stderr)) as bars:  # bound now: steps run under logs.quiet
        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bars.add_task(description, total=total)
            bars.update(tasks[description], completed=done, total=total)

        yield update


def _fmt(value, spec: str = ".3g", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _rows(p: Profile) -> list[tuple[str, str]]:
    lat = {b: p.latency_ms.get(str(b)) or {} for b in BATCHES}
    return [
        ("file size", f"{p.size_bytes / 1e6:.3f} MB"), ("parameters", f"{p.parameters:,}"),
        ("sparsity", _fmt(p.sparsity, ".1%")),
        *[(f"latency b{b} p50 / p95", f"{_fmt(lat[b].get('p50'))} / {_fmt(lat[b].get('p95'))} ms") for b in BATCHES],
        ("throughput b32", f"{_fmt(p.throughput, ',.0f')} samples/s"),
        ("top-1", _fmt(p.top1, ".2%")), ("top-5", _fmt(p.top5, ".2%")),
        ("agreement", _fmt(p.agreement, ".2%")), ("max abs diff", _fmt(p.max_abs_diff, ".3g")),
    ]


def print_profile(profile: Profile) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=profile.path)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in _rows(profile):
        table.add_row(name, value)
    Console().print(table)


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="optimize: " + (" → ".join(s.get("step", "?") for s in report.steps) or "no steps"))
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("result", justify="right")
    for (name, before), (_, after) in zip(_rows(report.original), _rows(report.result)):
        table.add_row(name, before, after)
    console = Console()
    console.print(table)
    s = summary(report)
    console.print(f"{_fmt(s['size_ratio'], '.2f')}× smaller, {_fmt(s['speedup_b1'], '.2f')}× / "
                  f"{_fmt(s['speedup_b32'], '.2f')}× faster at batch 1 / 32, top-1 drop "
                  f"{_fmt(s['top1_drop_points'], '.2f')} points", highlight=False)
    for note in report.gates.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    if report.refused:
        console.print(f"[bold red]refused:[/] {report.refused}", highlight=False)
    elif report.output:
        console.print(f"written: {report.output}", highlight=False)
