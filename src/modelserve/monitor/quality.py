"""Feedback and quality: ground truth joined with logged predictions, scored per model version.

The payload log's writer (in its writer process, ``writer.py``) hands every logged prediction to
``QualityTracker.remember`` (a bounded LRU keyed by request id), so feedback for a recent request is
joined in memory (the server's ``PayloadLog.quality`` is a proxy calling into that process); older ones
are looked up in the database by the API. Each model version keeps a sliding window of its last
``window`` scored rows: classification gives accuracy, per-class precision/recall/F1 and the
confusion matrix; regression gives MAE and RMSE. ``snapshot()`` returns plain dicts for the API and
the metrics exporter; ``QualityCollector`` turns them into Prometheus gauges.

One lock guards the tracker's state; it is held for dict/deque operations only, never across an
await and never on the inference path (the writer thread and feedback requests take it).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from operator import itemgetter

import orjson

from modelserve.errors import Conflict, InvalidInput, ModelNotReady


def _key(value) -> str:
    """Classes compare as text: 3, "3" and 3.0 are one class; labels are their own text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def score(prediction: dict, truth) -> dict:
    """Ground truth against one request's prediction -> the feedback row's scores and the (pred, truth)
    pairs for the window. ``truth``: one value, or a list with one per batch row."""
    values = prediction.get("values") or []
    truths = truth if isinstance(truth, list) else [truth]
    if len(truths) != len(values):
        raise InvalidInput(f"ground truth has {len(truths)} values; the request predicted {len(values)} rows")
    if prediction["kind"] == "value":
        try:
            pairs = [(float(p), float(t)) for p, t in zip(values, truths)]
        except (TypeError, ValueError):
            raise InvalidInput("regression ground truth must be numbers") from None
        errors = [p - t for p, t in pairs]
        return {"samples": len(pairs), "correct": None, "abs_error": sum(abs(e) for e in errors),
                "sq_error": sum(e * e for e in errors), "pairs": pairs}
    labels = prediction.get("labels")
    pairs = []
    for i, t in enumerate(truths):
        if isinstance(t, dict | list) or t is None:
            raise InvalidInput("classification ground truth must be a class (int) or label (str) per row")
        predicted = labels[i] if isinstance(t, str) and labels is not None else values[i]
        pairs.append((_key(predicted), _key(t)))
    return {"samples": len(pairs), "correct": sum(p == t for p, t in pairs), "abs_error": None,
            "sq_error": None, "pairs": pairs}


def _class_order(c: str):
    try:
        return (0, int(c), "")
    except ValueError:
        return (1, 0, c)


def classification_metrics(pairs) -> dict:
    classes = sorted({c for pair in pairs for c in pair}, key=_class_order)
    confusion = {t: {p: 0 for p in classes} for t in classes}  # confusion[truth][predicted]
    for p, t in pairs:
        confusion[t][p] += 1
    per_class = {}
    for c in classes:
        tp = confusion[c][c]
        fp = sum(confusion[t][c] for t in classes) - tp
        fn = sum(confusion[c].values()) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    n = len(pairs)
    return {"kind": "classification", "samples": n,
            "accuracy": sum(p == t for p, t in pairs) / n if n else None,
            "macro_f1": sum(v["f1"] for v in per_class.values()) / len(per_class) if per_class else None,
            "per_class": per_class, "classes": classes, "confusion": confusion}


def regression_metrics(pairs) -> dict:
    n = len(pairs)
    errors = [p - t for p, t in pairs]
    return {"kind": "regression", "samples": n,
            "mae": sum(abs(e) for e in errors) / n if n else None,
            "rmse": math.sqrt(sum(e * e for e in errors) / n) if n else None,
            "bias": sum(errors) / n if n else None}


class QualityTracker:
    def __init__(self, window: int = 1000, remember: int = 100_000):
        self.window = window
        self.capacity = remember
        self._lock = threading.Lock()
        #: request id -> (request id, model, version, prediction)
        self._predictions: OrderedDict[str, tuple[str, str, str | None, dict | str]] = OrderedDict()
        self._given: OrderedDict[str, None] = OrderedDict()  # request ids with feedback, newest last
        self._windows: dict[tuple[str, str | None], deque] = {}
        self._kinds: dict[tuple[str, str | None], str] = {}
        self._feedback_count: dict[tuple[str, str | None], int] = {}

    def remember(self, items: list[tuple[str, str, str | None, dict | str]]) -> None:
        """(request_id, model, version, prediction) of logged requests, the prediction as a dict or as its JSON
        text (the writer keeps the text it stores: decoded only when feedback comes); the oldest fall out
        past capacity."""
        if not items:
            return
        with self._lock:  # one C-level update per cycle; a request id logged twice keeps its first place
            self._predictions.update(zip(map(itemgetter(0), items), items))  # the item itself: no tuple per row
            while len(self._predictions) > self.capacity:
                self._predictions.popitem(last=False)

    def lookup(self, request_id: str) -> tuple[str, str | None, dict] | None:
        with self._lock:
            found = self._predictions.get(request_id)
        if found is None:
            return None
        _, model, version, prediction = found
        return model, version, orjson.loads(prediction) if isinstance(prediction, str) else prediction

    def given(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._given

    def add(self, request_id: str, model: str, version: str | None, prediction: dict, truth) -> dict:
        """Score ``truth`` and put it in the version's window; Conflict when this request has feedback."""
        scored = score(prediction, truth)
        key = (model, version)
        with self._lock:
            if request_id in self._given:
                raise Conflict(f"request '{request_id}' has feedback already")
            self._given[request_id] = None
            while len(self._given) > self.capacity:
                self._given.popitem(last=False)
            self._add_pairs(key, "classification" if prediction["kind"] == "class" else "regression",
                            scored["pairs"])
        return scored

    def _add_pairs(self, key, kind: str, pairs) -> None:
        if self._kinds.get(key) != kind:  # a version is scored one way; a change of task starts over
            self._windows[key] = deque(maxlen=self.window)
            self._kinds[key] = kind
        self._windows[key].extend(pairs)
        self._feedback_count[key] = self._feedback_count.get(key, 0) + 1

    def restore(self, rows: list[tuple[str, str, str | None, dict, object]]) -> None:
        """Refill the windows at start from stored feedback: (request_id, model, version, prediction, truth),
        oldest first."""
        with self._lock:
            for request_id, model, version, prediction, truth in rows:
                try:
                    scored = score(prediction, truth)
                except (InvalidInput, KeyError, TypeError):
                    continue
                self._given[request_id] = None
                kind = "classification" if prediction.get("kind") == "class" else "regression"
                self._add_pairs((model, version), kind, scored["pairs"])

    def snapshot(self, model: str | None = None) -> dict:
        """{model: {version: metrics}} over each version's window, as plain dicts (JSON-ready)."""
        with self._lock:
            items = [(k, self._kinds[k], list(w), self._feedback_count.get(k, 0))
                     for k, w in self._windows.items() if model is None or k[0] == model]
        out: dict = {}
        for (name, version), kind, pairs, count in items:
            metrics = classification_metrics(pairs) if kind == "classification" else regression_metrics(pairs)
            metrics["feedback"] = count
            metrics["window"] = self.window
            out.setdefault(name, {})[version or ""] = metrics
        return out


class QualityCollector:
    """Prometheus collector over ``QualityTracker.snapshot()`` (the server adds it to ``Metrics.collectors``). Gauges: modelserve_accuracy,
    modelserve_macro_f1, modelserve_class_precision/recall/f1{class}, modelserve_mae, modelserve_rmse,
    modelserve_feedback_samples, all labelled {model, version}."""

    def __init__(self, tracker: QualityTracker):
        self.tracker = tracker

    def describe(self):
        return []  # values appear and vanish with feedback: no fixed description

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        labels = ["model", "version"]
        families = {name: GaugeMetricFamily(f"modelserve_{name}", text, labels=labels) for name, text in (
            ("accuracy", "Share of feedback rows predicted right, over the sliding window"),
            ("macro_f1", "Mean F1 over classes, over the sliding window"),
            ("mae", "Mean absolute error against feedback, over the sliding window"),
            ("rmse", "Root mean squared error against feedback, over the sliding window"),
            ("feedback_samples", "Feedback rows in the sliding window"))}
        per_class = {name: GaugeMetricFamily(f"modelserve_class_{name}", f"Per-class {name} over the window",
                                             labels=[*labels, "class"]) for name in ("precision", "recall", "f1")}
        try:
            snapshot = self.tracker.snapshot()
        except ModelNotReady:  # the payload log's writer process is restarting: no values this scrape
            snapshot = {}
        for model, versions in snapshot.items():
            for version, m in versions.items():
                families["feedback_samples"].add_metric([model, version], m["samples"])
                for name in ("accuracy", "macro_f1", "mae", "rmse"):
                    if m.get(name) is not None:
                        families[name].add_metric([model, version], m[name])
                for cls, values in m.get("per_class", {}).items():
                    for name, family in per_class.items():
                        family.add_metric([model, version, cls], values[name])
        yield from families.values()
        yield from per_class.values()
