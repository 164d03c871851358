"""Input drift per model version: statistics of the logged requests' inputs against a reference.

Where the numbers come from. The payload log's writer thread (never the request path) hands every
*logged* successful request to ``DriftTracker.observe``. So drift sees exactly what the payload log
keeps: a model with ``monitoring.payload_log: false`` has no drift, and with ``sample_rate`` < 1 only
the sampled requests count (the statistics stay unbiased, they just fill more slowly). A server
started without the payload log has no drift either.

Features, one number per input row (a row = one sample of the batch):

- tabular ``[N, F]``: one feature per column, ``x[0]`` … ``x[F-1]``; past ``MAX_COLUMNS`` columns the
  row is summarized instead: ``x.mean``, ``x.std``, ``x.min``, ``x.max``; ``[N]``: one feature ``x``;
- rank >= 3 (images, NCHW or NHWC): per channel ``x.c0.mean``, ``x.c0.std`` … (channel axis 1 when
  ``shape[1]`` is 1, 3 or 4, else the last) and the embedding-free summary ``x.brightness`` (mean of
  every value of the sample) and ``x.contrast`` (their std);
- BYTES holding encoded images (the ``preprocess.input`` of a vision model): each image is decoded
  here, shrunk to at most ``THUMBNAIL`` px (JPEG decodes at reduced size), and summarized on its
  0..255 pixels the same way, channels named ``R``/``G``/``B`` or ``L``: ``image.R.mean``, … Note: a
  vision stage that replaces the image bytes by the model tensor in the request's input dict makes
  the model tensor what is seen here (then ``pixels.c0.mean`` …, in the model's normalized units);
- other BYTES, strings and scalars: skipped. Non-finite values are dropped.

A non-batching model (``max_batch_size: 0``) sends one sample per request unless the input's first
dim is -1 or 1, which is then read as the batch axis.

The reference: ``monitoring.drift.reference``, a ``.npy`` (a model with one input) or ``.npz`` (keys =
input names) in the version folder or the model folder, rows first (``[N, ...]``), loaded once in the
writer thread at the version's first logged request and subsampled to ``reference_size`` rows; for a
vision model it holds decoded pixels (uint8, ``[N, H, W, C]`` or ``[N, C, H, W]``) under the image
input's name. Without a file, the first ``reference_size`` logged rows become the reference (a feature
seen in under a tenth of them, an optional input, is then not tracked); later rows fill the sliding
``window`` of the last ``window`` rows. ``reset`` starts a new reference from
the next requests (whatever the config says).

Scores (computed lazily at ``snapshot``, cached until new rows arrive): per feature the population
stability index over ``bins`` bins cut at the reference's quantiles (a feature with at most ``bins``
distinct reference values gets one bin per value plus one for anything else; empty bins count as
``EPS``) and the two-sample Kolmogorov-Smirnov statistic; nothing before the window holds
``min_samples`` rows. The version's score is the largest PSI; ``alert`` = score > ``threshold``.

Memory: per version at most ``MAX_FEATURES`` features x (``reference_size`` + ``window``) floats, at
most ``MAX_VERSIONS`` versions (the least recently seen is forgotten). One lock guards the state,
held for copies and ring writes only; feature extraction and scoring run outside it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from modelserve.errors import ModelNotReady
from modelserve.monitor.encode import row_stats

log = logging.getLogger(__name__)

#: a tabular input wider than this is summarized per row (mean, std, min, max) instead of per column
MAX_COLUMNS = 64
#: features tracked per model version at most (the first ones seen)
MAX_FEATURES = 256
#: channels named one by one at most; an image tensor with more is summarized as a whole
MAX_CHANNELS = 16
#: (model, version) pairs tracked at most
MAX_VERSIONS = 512
#: encoded images are decoded to at most this many pixels a side
THUMBNAIL = 64
#: the share an empty bin counts as (PSI's log must not see 0)
EPS = 1e-4


# -- the scores -------------------------------------------------------------------------------

class Reference:
    """One feature's reference: sorted values, its bins and their shares."""

    __slots__ = ("sorted", "mean", "values", "edges", "expected")

    def __init__(self, values: np.ndarray, bins: int = 10):
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if not len(v):
            raise ValueError("a reference needs at least one finite value")
        self.sorted = np.sort(v)
        self.mean = float(v.mean())
        distinct = np.unique(v)
        if len(distinct) <= bins:  # discrete: one bin per value seen, one for everything else
            self.values, self.edges = distinct, None
        else:
            self.values = None
            self.edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
        self.expected = self.shares(v)

    def shares(self, x: np.ndarray) -> np.ndarray:
        if self.values is not None:
            at = np.minimum(np.searchsorted(self.values, x), len(self.values) - 1)
            hit = self.values[at] == x
            counts = np.bincount(at[hit], minlength=len(self.values) + 1)
            counts[-1] = len(x) - int(hit.sum())
        else:
            counts = np.bincount(np.searchsorted(self.edges, x, side="right"), minlength=len(self.edges) + 1)
        return np.maximum(counts / max(len(x), 1), EPS)

    def psi(self, current: np.ndarray) -> float:
        q, p = self.shares(current), self.expected
        return float(np.sum((q - p) * np.log(q / p)))

    def ks(self, current: np.ndarray) -> float:
        return ks_statistic(self.sorted, np.sort(current), presorted=True)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference`` (bins at the reference's quantiles)."""
    current = np.asarray(current, dtype=np.float64).ravel()
    return Reference(reference, bins).psi(current[np.isfinite(current)])


def ks_statistic(a: np.ndarray, b: np.ndarray, presorted: bool = False) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if not presorted:
        a, b = np.sort(np.asarray(a, dtype=np.float64).ravel()), np.sort(np.asarray(b, dtype=np.float64).ravel())
    if not len(a) or not len(b):
        return 0.0
    at = np.concatenate([a, b])
    gap = np.searchsorted(a, at, side="right") / len(a) - np.searchsorted(b, at, side="right") / len(b)
    return float(np.abs(gap).max())


# -- features ---------------------------------------------------------------------------------

def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values if np.isfinite(values).all() else values[np.isfinite(values)]


def image_features(name: str, pixels: np.ndarray, channels: list[str]) -> dict[str, np.ndarray]:
    """``pixels`` [N, C, P] -> per channel mean and std, and brightness / contrast over all of a sample."""
    out = {}
    if len(channels) == pixels.shape[1]:
        means, stds = pixels.mean(axis=2, dtype=np.float64), pixels.std(axis=2, dtype=np.float64)
        for c, ch in enumerate(channels):
            out[f"{name}.{ch}.mean"] = _finite(means[:, c])
            out[f"{name}.{ch}.std"] = _finite(stds[:, c])
    flat = pixels.reshape(len(pixels), -1)
    out[f"{name}.brightness"] = _finite(flat.mean(axis=1, dtype=np.float64))
    out[f"{name}.contrast"] = _finite(flat.std(axis=1, dtype=np.float64))
    return out


def _channels_first(arr: np.ndarray) -> np.ndarray:
    """Rows-first [N, ...] of rank >= 3 -> [N, C, P]: channel axis 1 when shape[1] is 1, 3 or 4, else the
    last one (rank 3 with neither: one channel)."""
    if arr.shape[1] in (1, 3, 4):
        return arr.reshape(arr.shape[0], arr.shape[1], -1)
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        return arr.reshape(arr.shape[0], 1, -1)
    return np.moveaxis(arr, -1, 1).reshape(arr.shape[0], arr.shape[-1], -1)


def _channel_names(count: int, named: bool) -> list[str]:
    if named and count in (1, 3, 4):
        return ["L"] if count == 1 else ["R", "G", "B", "A"][:count]
    return [f"c{c}" for c in range(count)] if count <= MAX_CHANNELS else []


def tensor_features(name: str, arr: np.ndarray, pixels: bool = False) -> dict[str, np.ndarray]:
    """Rows-first numeric tensor -> {feature: one value per row}. ``pixels``: decoded images of a BYTES
    image input (channels named R, G, B / L)."""
    if arr.dtype.kind not in "biuf" or arr.ndim == 0 or not arr.shape[0]:
        return {}
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.ndim == 1:
        return {name: _finite(arr)}
    if arr.ndim == 2 and not pixels:
        if arr.shape[1] <= MAX_COLUMNS:
            return {f"{name}[{j}]": _finite(arr[:, j]) for j in range(arr.shape[1])}
        mean, std, low, high = row_stats(arr)
        return {f"{name}.mean": _finite(mean), f"{name}.std": _finite(std),
                f"{name}.min": _finite(low), f"{name}.max": _finite(high)}
    if arr.ndim == 2:  # grey pixels flattened per image
        arr = arr[:, None, :]
    flat = _channels_first(arr)
    return image_features(name, flat, _channel_names(flat.shape[1], pixels))


def decoded_features(name: str, images: np.ndarray, spec) -> dict[str, np.ndarray]:
    """Encoded images (a BYTES tensor) -> per-channel mean/std of their 0..255 pixels, at thumbnail size.
    Images that do not decode are skipped."""
    from modelserve.vision.decode import ensure_bomb_guard, open_image, to_mode

    grey = spec.color == "L"
    stats: list[np.ndarray] = []
    ensure_bomb_guard(spec.max_pixels)
    for data in images.reshape(-1):
        try:
            opened = open_image(data, spec)
            image = opened.image
            image.thumbnail((THUMBNAIL, THUMBNAIL))  # JPEG: draft mode decodes at 1/2..1/8 size
            image = to_mode(image, "L" if grey else "RGB", opened.format)
            px = np.asarray(image, dtype=np.float32)
        except Exception:  # noqa: BLE001 - a model took it, so this is rare; the image is left out
            continue
        stats.append(px.reshape(1, -1) if grey else px.reshape(-1, 3).T)
    if not stats:
        return {}
    channels = ["L"] if grey else ["R", "G", "B"]
    out: dict[str, list] = {}
    for px in stats:  # images of different sizes: one at a time
        for feature, value in image_features(name, px[None], channels).items():
            out.setdefault(feature, []).append(value)
    return {feature: np.concatenate(values) for feature, values in out.items()}


def _rows_first(arr: np.ndarray, name: str, config) -> np.ndarray:
    if config.max_batch_size:
        return arr
    spec = next((t for t in config.inputs if t.name == name), None)
    if spec is None:  # a tensor a stage made: one sample, with its batch dim when it has one
        return arr if arr.ndim >= 2 and arr.shape[0] == 1 else arr[None]
    if arr.ndim >= 1 and len(spec.dims) == arr.ndim and spec.dims[0] in (-1, 1):
        return arr
    return arr[None]


def features(inputs: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """One request's inputs -> {feature: values, one per row}."""
    image_input = config.preprocess.input if config.preprocess is not None else None
    out: dict[str, np.ndarray] = {}
    for name, arr in inputs.items():
        if not isinstance(arr, np.ndarray):
            continue
        if arr.dtype.kind in "OSU":
            if name == image_input and arr.dtype.kind == "O":
                out.update(decoded_features(name, arr, config.preprocess))
            continue
        out.update(tensor_features(name, _rows_first(arr, name, config), pixels=name == image_input))
    return out


def file_features(path: Path, config) -> dict[str, np.ndarray]:
    """A reference file (.npy: the model's only input; .npz: keys = input names), rows first."""
    names = [t.name for t in config.inputs]
    image_input = config.preprocess.input if config.preprocess is not None else None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        unknown = sorted(set(arrays) - set(names) - {image_input})
        if unknown:
            raise ValueError(f"keys {unknown} are not inputs of the model (inputs: {names})")
    else:
        if len(names) != 1:
            raise ValueError(f"a .npy reference is for a model with one input; this one has {names} (use .npz)")
        arrays = {names[0]: np.load(path, allow_pickle=False)}
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        out.update(tensor_features(name, arr, pixels=name == image_input))
    if not out:
        raise ValueError("no numeric rows in it")
    return out


# -- the tracker ------------------------------------------------------------------------------

class _Ring:
    __slots__ = ("data", "pos", "n")

    def __init__(self, capacity: int):
        self.data = np.empty(capacity, dtype=np.float64)
        self.pos = self.n = 0

    def extend(self, values: np.ndarray) -> None:
        cap = len(self.data)
        values = values[-cap:]
        k = len(values)
        end = self.pos + k
        if end <= cap:
            self.data[self.pos:end] = values
        else:
            first = cap - self.pos
            self.data[self.pos:] = values[:first]
            self.data[:k - first] = values[first:]
        self.pos = end % cap
        self.n = min(cap, self.n + k)

    def values(self) -> np.ndarray:
        return self.data[:self.n].copy() if self.n < len(self.data) else self.data.copy()


class _Version:
    """One model version's reference (building or frozen), window and cached scores."""

    def __init__(self, cfg, source: str):
        self.cfg = cfg
        self.source = source
        self.error: str | None = None
        self.building: dict[str, list[np.ndarray]] = {}
        self.counts: dict[str, int] = {}
        self.ref: dict[str, Reference] | None = None
        self.ref_samples = 0
        self.window: dict[str, _Ring] = {}
        self.seen = 0  # requests observed (the cache key)
        self.cached: tuple[int, dict] | None = None

    def freeze(self, columns: dict[str, np.ndarray]) -> None:
        refs = {}
        for name, values in list(columns.items())[:MAX_FEATURES]:
            try:
                refs[name] = Reference(values, self.cfg.bins)
            except ValueError:  # no finite value: nothing to compare against
                continue
        self.ref = refs
        self.ref_samples = max((len(v) for v in columns.values()), default=0)
        self.building = {}

    def add(self, feats: dict[str, np.ndarray]) -> None:
        self.seen += 1
        if self.ref is None:
            if self.error is not None:
                return
            feats = dict(feats)
            for name, values in feats.items():
                if name not in self.counts and len(self.counts) >= MAX_FEATURES:
                    continue
                need = self.cfg.reference_size - self.counts.get(name, 0)
                if need > 0:
                    taken = values[:need]
                    self.building.setdefault(name, []).append(taken)
                    self.counts[name] = self.counts.get(name, 0) + len(taken)
                feats[name] = values[max(need, 0):]
            if self.counts and max(self.counts.values()) >= self.cfg.reference_size:
                # full; a feature seen in few of those rows (an optional input) is not tracked
                least = max(10, self.cfg.reference_size // 10)
                self.freeze({n: np.concatenate(parts) for n, parts in self.building.items()
                             if self.counts[n] >= least})
            else:
                return
        for name, values in feats.items():
            if name in self.ref and len(values):
                ring = self.window.get(name)
                if ring is None:
                    ring = self.window[name] = _Ring(self.cfg.window)
                ring.extend(values)

    def reference_samples(self) -> int:
        if self.ref is not None:
            return self.ref_samples
        return max(self.counts.values(), default=0)


class DriftTracker:
    def __init__(self, repository: Path | None = None):
        self.repository = Path(repository) if repository is not None else None
        self._lock = threading.Lock()
        self._versions: OrderedDict[tuple[str, str], _Version] = OrderedDict()
        self._restart: set[tuple[str, str]] = set()  # reset: the next reference comes from requests
        self._warned: set[tuple[str, str]] = set()

    def attach(self, repository: Path) -> "DriftTracker":
        """Where the model folders (and their reference files) are; returns self."""
        self.repository = Path(repository)
        return self

    # -- the payload log's writer thread ------------------------------------------------------

    def observe(self, items: list[tuple[str, str | None, dict, object]]) -> None:
        """(model, version, inputs, config) of logged successful requests."""
        for model, version, inputs, config in items:
            if config is None or not inputs or not config.monitoring.drift.enabled:
                continue
            key = (model, version or "")
            try:
                state = self._state(key, config)
                feats = features(inputs, config)
                if feats:
                    with self._lock:
                        state.add(feats)
            except Exception as exc:  # noqa: BLE001 - drift must never cost the payload log a row
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("drift of model '%s' version %s: %s", model, version, exc)

    def _state(self, key: tuple[str, str], config) -> _Version:
        cfg = config.monitoring.drift
        with self._lock:
            state = self._versions.get(key)
            if state is not None and state.cfg == cfg:
                self._versions.move_to_end(key)
                return state
            restart = key in self._restart
            self._restart.discard(key)
        if cfg.reference and not restart:
            state = _Version(cfg, f"file:{cfg.reference}")
            try:  # the first logged request of the version: read off the request path, here, once
                state.freeze(self._load(key, cfg, config))
            except Exception as exc:  # noqa: BLE001 - reported in the snapshot, no score without it
                state.error = f"cannot use reference '{cfg.reference}': {exc}"
                log.warning("drift of model '%s' version %s: %s", key[0], key[1], state.error)
        else:
            state = _Version(cfg, "first_requests")
        with self._lock:
            self._versions[key] = state
            self._versions.move_to_end(key)
            while len(self._versions) > MAX_VERSIONS:
                self._versions.popitem(last=False)
        return state

    def _load(self, key: tuple[str, str], cfg, config) -> dict[str, np.ndarray]:
        if self.repository is None:
            raise ValueError("the server did not say where the model folders are")
        model_dir = (self.repository / key[0]).resolve()
        candidates = [model_dir / key[1] / cfg.reference, model_dir / cfg.reference] if key[1] else \
            [model_dir / cfg.reference]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ValueError(f"no such file in the version or model folder ({model_dir})")
        if not path.resolve().is_relative_to(model_dir):
            raise ValueError("the file is outside the model folder")
        columns = file_features(path, config)

        def subsample(v: np.ndarray) -> np.ndarray:  # even, and the same rows for features of one length
            if len(v) <= cfg.reference_size:
                return v
            return v[np.sort(np.random.default_rng(0).choice(len(v), cfg.reference_size, replace=False))]

        return {n: subsample(v) for n, v in columns.items()}

    # -- readers (metrics thread, API threads) --------------------------------------------------

    def reset(self, model: str, version: str | None = None) -> list[str]:
        """Forget the reference and window of the model's versions (or one): the next ``reference_size``
        logged rows become the new reference. Returns the versions reset."""
        with self._lock:
            keys = [k for k in self._versions if k[0] == model and (version is None or k[1] == version)]
            for key in keys:
                state = self._versions[key]
                self._versions[key] = _Version(state.cfg, "first_requests")
            if version is not None and not keys:
                self._restart.add((model, version))
        return [k[1] for k in keys]

    def snapshot(self, model: str | None = None) -> dict:
        """{model: {version: drift}} (JSON-ready): reference, window size, score, alert, per-feature PSI/KS."""
        with self._lock:
            work = []
            for key, state in self._versions.items():
                if model is not None and key[0] != model:
                    continue
                if state.cached is not None and state.cached[0] == state.seen:
                    work.append((key, state, None, state.cached[1]))
                else:
                    windows = {n: r.values() for n, r in state.window.items()}
                    work.append((key, state, (state.seen, state.ref, windows, state.reference_samples()), None))
        out: dict = {}
        for (name, version), state, todo, done in work:
            if done is None:
                done = self._score(state, *todo)
                with self._lock:
                    if state.seen == todo[0]:
                        state.cached = (todo[0], done)
            out.setdefault(name, {})[version] = done
        return out

    @staticmethod
    def _score(state: _Version, seen: int, refs, windows: dict, ref_samples: int) -> dict:
        cfg = state.cfg
        n = max((len(w) for w in windows.values()), default=0)
        feats = {}
        for feature, ref in (refs or {}).items():
            window = windows.get(feature)
            entry = {"psi": None, "ks": None, "reference_mean": ref.mean,
                     "window_mean": float(window.mean()) if window is not None and len(window) else None}
            if window is not None and len(window) >= cfg.min_samples:
                entry["psi"], entry["ks"] = ref.psi(window), ref.ks(window)
            feats[feature] = entry
        scored = [f["psi"] for f in feats.values() if f["psi"] is not None]
        score = max(scored) if scored else None
        reference = {"source": state.source, "samples": ref_samples, "complete": refs is not None}
        if state.error:
            reference["error"] = state.error
        return {"reference": reference, "window": n, "score": score,
                "alert": bool(score is not None and score > cfg.threshold), "threshold": cfg.threshold,
                "min_samples": cfg.min_samples, "features": feats}


class DriftCollector:
    """Prometheus collector over ``DriftTracker.snapshot()``: modelserve_drift_psi / _ks {model, version,
    feature}, modelserve_drift_score / _alert {model, version}, modelserve_drift_samples {model, version, set}."""

    def __init__(self, tracker: DriftTracker):
        self.tracker = tracker

    def describe(self):
        return []  # values appear with traffic: no fixed description

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        labels = ["model", "version"]
        psi_ = GaugeMetricFamily("modelserve_drift_psi", "Population stability index of an input feature, "
                                 "the sliding window against the reference", labels=[*labels, "feature"])
        ks_ = GaugeMetricFamily("modelserve_drift_ks", "Two-sample Kolmogorov-Smirnov statistic of an input "
                                "feature, the sliding window against the reference", labels=[*labels, "feature"])
        score = GaugeMetricFamily("modelserve_drift_score", "Input drift of a model version: the largest "
                                  "feature PSI", labels=labels)
        alert = GaugeMetricFamily("modelserve_drift_alert", "1 when the drift score is over the configured "
                                  "threshold", labels=labels)
        samples = GaugeMetricFamily("modelserve_drift_samples", "Rows in the drift reference and in the "
                                    "sliding window", labels=[*labels, "set"])
        try:
            snapshot = self.tracker.snapshot()
        except ModelNotReady:  # the payload log's writer process is restarting: no values this scrape
            snapshot = {}
        for model, versions in snapshot.items():
            for version, d in versions.items():
                samples.add_metric([model, version, "reference"], d["reference"]["samples"])
                samples.add_metric([model, version, "window"], d["window"])
                alert.add_metric([model, version], 1.0 if d["alert"] else 0.0)
                if d["score"] is not None:
                    score.add_metric([model, version], d["score"])
                for feature, f in d["features"].items():
                    if f["psi"] is not None:
                        psi_.add_metric([model, version, feature], f["psi"])
                        ks_.add_metric([model, version, feature], f["ks"])
        yield from (psi_, ks_, score, alert, samples)
