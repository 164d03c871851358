"""Rate limits, per-model concurrency caps and request deadlines, checked at the protocol edge.

- **Rate** (``--rate-limit RATE[:BURST]``): a token bucket per caller, refilled at RATE inference
  requests a second and holding at most BURST. The caller is the credential's name (API key name, JWT
  ``sub``) when authentication is on; with authentication off, each client address (IP, without the
  port) has its own bucket. Past it: ``RateLimited`` (HTTP 429 with ``Retry-After``, gRPC
  ``RESOURCE_EXHAUSTED`` with ``retry-after`` trailing metadata), where ``Retry-After`` is the whole
  seconds until the bucket holds a token again (at least 1).
- **Concurrency** (``limits: {max_inflight: N}`` in a model's config, else ``--max-inflight-per-model``):
  the requests a model (all its versions together) holds at once, from the model lookup to the answer
  sent. Past it: ``RateLimited`` (429, ``Retry-After: 1``). Acquired before the body is read, so slow
  bodies count too (``--body-timeout-s`` bounds them), and released in a ``finally``, so errors,
  time-outs and client cancellations give the slot back.
- **Deadlines**: the body must arrive within ``--body-timeout-s`` (else 408), and the answer within
  ``--request-timeout-s`` after it (else 504, gRPC ``DEADLINE_EXCEEDED``; gRPC also honours the client's
  own deadline, whichever is sooner). The waiting task is cancelled: the batcher drops a cancelled
  request it has not started.

Only inference is limited (V2 REST and gRPC, the gRPC stream per message, TF Serving / KServe V1 and image
uploads); health, metadata and management calls are not. Rate checks run after authentication (a 401
spends nobody's tokens) and before the model is looked up; refusals write no payload-log row (a flood
must not turn into database writes) and are counted in ``modelserve_rate_limited_total``.

Everything here runs on the event-loop thread: plain dicts and floats, O(1) a request, no lock. The
metrics thread reads copies (``LimitsCollector``).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Iterable

from modelserve.errors import InvalidInput, RateLimited

#: anonymous callers (authentication off) appear under this name in metrics, whatever their address
ANONYMOUS = "anonymous"
#: the bucket table is pruned past this many callers (buckets that have refilled are dropped: losslessly)
MAX_BUCKETS = 10_000
#: inference paths other than V2's ``/v2/models/{m}/infer`` (which ``InferRoute`` handles itself): the model name
OTHER_INFER_PATH = re.compile(r"^/v1/models/([^/:]+)[/:]|^/models/([^/]+)(?:/versions/[^/]+)?/predict$")


def parse_rate(text: str | None) -> tuple[float, int]:
    """``"RATE[:BURST]"`` (``RATE`` may end in ``/s``) -> (rate per second, burst); None or "" or "0" -> (0, 0): off.
    The burst defaults to one second's worth (at least 1)."""
    if not text or text.strip() in ("0", "off", "none"):
        return 0.0, 0
    rate_part, _, burst_part = text.strip().partition(":")
    try:
        rate = float(rate_part.removesuffix("/s"))
        burst = int(burst_part) if burst_part else max(1, math.ceil(rate))
    except ValueError:
        raise InvalidInput(f"rate limit {text!r}: expected RATE[:BURST], e.g. 50 or 50:100 (requests a second, burst)") from None
    if not (rate > 0 and math.isfinite(rate)) or burst < 1:
        raise InvalidInput(f"rate limit {text!r}: the rate must be > 0 and the burst >= 1")
    return rate, burst


class Limits:
    """One per server, shared by every adapter. ``clock``: seconds, monotonic (tests give their own)."""

    def __init__(self, rate: float = 0.0, burst: int = 0, max_inflight: int = 0,
                 request_timeout_s: float = 0.0, body_timeout_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS):
        self.rate = float(rate)
        self.burst = int(burst) if burst else (max(1, math.ceil(rate)) if rate else 0)
        #: the cap of a model whose config does not say (0: none)
        self.default_max_inflight = max_inflight
        #: None: no deadline
        self.request_timeout_s = request_timeout_s or None
        self.body_timeout_s = body_timeout_s or None
        self.clock = clock
        self.max_buckets = max_buckets
        #: caller -> [tokens, time of the last update]
        self._buckets: dict[str, list[float]] = {}
        #: model -> requests holding a slot now (only models with a cap are counted)
        self.inflight: dict[str, int] = {}
        #: model -> its cap when last applied (the gauge)
        self.caps: dict[str, int] = {}
        #: (reason, key, model) -> refusals; key and model are "" where they do not apply
        self.refused: dict[tuple[str, str, str], int] = {}
        #: the deadlines of the requests in flight, swept every ``tick_s`` while there are any
        self._deadlines: set[Deadline] = set()
        shortest = min([t for t in (self.request_timeout_s, self.body_timeout_s) if t] or [1.0])
        self.tick_s = min(1.0, max(0.05, shortest / 20))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None

    # -- deadlines -----------------------------------------------------------------------------------

    def deadline(self, seconds: float | None) -> Deadline:
        """A deadline ``seconds`` from now for the running task (None: none yet; ``move`` sets one)."""
        if self._sweep_handle is None:
            self._loop = asyncio.get_running_loop()
            self._sweep_handle = self._loop.call_later(self.tick_s, self._sweep)
        deadline = Deadline(self, seconds)
        self._deadlines.add(deadline)
        return deadline

    def _sweep(self) -> None:
        now = self._loop.time()
        for deadline in [d for d in self._deadlines if d.at is not None and d.at <= now]:
            self._deadlines.discard(deadline)
            deadline.expired = True
            deadline.task.cancel()
        # re-armed only while requests are in flight: an idle server has no timer
        self._sweep_handle = self._loop.call_later(self.tick_s, self._sweep) if self._deadlines else None

    # -- rate ----------------------------------------------------------------------------------------

    def check_rate(self, name: str | None, host: str | None = None) -> None:
        """Take one token from the caller's bucket, or raise ``RateLimited``. ``name``: the principal's
        name, None when anonymous (the bucket is then ``host``'s)."""
        if not self.rate:
            return
        key = name if name is not None else "\0" + (host or "")
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._prune(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return
        bucket[0] = tokens
        label = name if name is not None else ANONYMOUS
        counter = ("rate", label, "")
        self.refused[counter] = self.refused.get(counter, 0) + 1
        wait = max(1, math.ceil((1.0 - tokens) / self.rate))
        raise RateLimited(f"rate limit of {self.rate:g} requests/s (burst {self.burst}) reached for "
                          f"{'key ' + repr(name) if name is not None else 'this client'}; retry in {wait} s", wait)

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled (a full bucket and no bucket are the same); if that is not
        enough (a flood of addresses), the older half."""
        full = [k for k, (tokens, stamp) in self._buckets.items() if tokens + (now - stamp) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_buckets:
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]

    # -- concurrency ---------------------------------------------------------------------------------

    def cap_of(self, config) -> int:
        """A model's in-flight cap: its config's ``limits.max_inflight`` (0: none), else the server default."""
        own = config.limits.max_inflight if config is not None else None
        return self.default_max_inflight if own is None else own

    def acquire(self, model: str, config, who: str | None = None) -> bool:
        """Take one of ``model``'s in-flight slots, or raise ``RateLimited``. True when a slot was taken:
        the caller must then ``release(model)`` exactly once (in a ``finally``); False: no cap, nothing to give back."""
        cap = self.cap_of(config)
        if cap <= 0:
            return False
        current = self.inflight.get(model, 0)
        self.caps[model] = cap
        if current >= cap:
            counter = ("concurrency", who or ANONYMOUS, model)
            self.refused[counter] = self.refused.get(counter, 0) + 1
            raise RateLimited(f"model '{model}' is answering its maximum of {cap} concurrent requests; retry later", 1)
        self.inflight[model] = current + 1
        return True

    def release(self, model: str) -> None:
        self.inflight[model] -= 1

    # -- read by the metrics thread ------------------------------------------------------------------

    def snapshot(self) -> tuple[dict, dict, dict]:
        return dict(self.refused), dict(self.inflight), dict(self.caps)


class Deadline:
    """A request's deadline on the hot path, checked by its ``Limits``' periodic sweep (a timer per request,
    ``asyncio.timeout`` or ``loop.call_at``, measured ~10 µs a request on uvloop; this costs a set insert and
    removal). At the deadline the sweep cancels the task; ``expired`` tells that cancellation from any other:
    the caller catches ``CancelledError`` and, when ``expired``, calls ``uncancel()`` and answers 408/504.
    ``stop()`` must follow the guarded awaits with no await in between, so it cannot fire outside them."""

    __slots__ = ("owner", "task", "at", "expired")

    def __init__(self, owner: Limits, seconds: float | None):
        self.owner = owner
        self.task = asyncio.current_task()
        self.expired = False
        self.at = owner._loop.time() + seconds if seconds else None

    def move(self, seconds: float | None) -> None:
        """A new deadline, ``seconds`` from now (None: none)."""
        self.at = self.owner._loop.time() + seconds if seconds else None

    def stop(self) -> None:
        self.owner._deadlines.discard(self)

    def uncancel(self) -> None:
        self.task.uncancel()


def client_host(peer: str | None) -> str | None:
    """The address part of a peer: ``"127.0.0.1"`` from ``"127.0.0.1:5000"`` or gRPC's ``"ipv4:127.0.0.1:5000"``."""
    if not peer:
        return None
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer[5:]
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else peer


class LimitsCollector:
    """``modelserve_rate_limited_total``, ``modelserve_model_inflight`` / ``_limit`` and the server's rate
    settings, for ``Metrics.collectors`` (read in the metrics thread, from copies)."""

    def __init__(self, limits: Limits):
        self.limits = limits

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        refused, inflight, caps = self.limits.snapshot()
        limited = CounterMetricFamily(
            "modelserve_rate_limited", "Requests refused with 429: reason rate (the key's token bucket; "
            "key = key name or anonymous) or concurrency (the model's in-flight cap)",
            labels=["reason", "key", "model"])
        for (reason, key, model), count in sorted(refused.items()):
            limited.add_metric([reason, key, model], count)
        yield limited
        limit = GaugeMetricFamily("modelserve_model_inflight_limit",
                                  "A model's cap on concurrent requests (models with a cap)", labels=["model"])
        held = GaugeMetricFamily("modelserve_model_inflight",
                                 "Requests holding one of the model's in-flight slots (models with a cap)",
                                 labels=["model"])
        for model, cap in sorted(caps.items()):
            limit.add_metric([model], cap)
            held.add_metric([model], inflight.get(model, 0))
        yield limit
        yield held
        if self.limits.rate:
            yield GaugeMetricFamily("modelserve_rate_limit_requests_per_second",
                                    "The token bucket's refill rate, per caller", value=self.limits.rate)
            yield GaugeMetricFamily("modelserve_rate_limit_burst", "The token bucket's size, per caller",
                                    value=self.limits.burst)
