"""Logging set-up: readable lines on a terminal, one JSON object per line otherwise."""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import sys
import time
import warnings

#: the request being served in this task (set by the dataplane, cheap): JSON log lines carry it
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("modelserve_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            doc["request_id"] = request_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence chatty third-party code while it runs (exporters, converters, the quantizer): its prints to
    stdout/stderr, its warnings, and the named loggers ("" = the root logger) below ERROR. Errors still raise."""
    named = [logging.getLogger(n or None) for n in loggers]
    levels = [lg.level for lg in named]
    for lg in named:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(named, levels):
            lg.setLevel(level)
