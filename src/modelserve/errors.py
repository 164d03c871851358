"""One exception hierarchy for the whole server; each protocol adapter maps it once, at its edge.

``http_status`` and ``grpc_code`` are the only protocol knowledge here: the REST adapter answers
``{"error": message}`` with ``http_status``, the gRPC adapter aborts with ``grpc_code``.
"""

from __future__ import annotations


class ModelServeError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ModelServeError):
    """The request is malformed: wrong shape, dtype, size, unknown tensor, bad JSON."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(ModelServeError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class PayloadTooLarge(ModelServeError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class QueueFull(ModelServeError):
    """A model's request queue is at its bound; the client should retry later."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    retry_after_s = 1


class ModelNotReady(ModelServeError):
    http_status = 503
    grpc_code = "UNAVAILABLE"


class Unsupported(ModelServeError):
    http_status = 501
    grpc_code = "UNIMPLEMENTED"


class Conflict(ModelServeError):
    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class ModelLoadError(ModelServeError):
    """A model's files or configuration cannot be loaded; the reason goes into the index."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class Unauthenticated(ModelServeError):
    """No credentials, or credentials that do not check out (unknown, malformed, expired, revoked key;
    a JWT with a bad signature or claims). The message never repeats the credential itself."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    #: extra response headers for the REST adapter (RFC 6750): tells the client to send a bearer token
    headers = {"WWW-Authenticate": "Bearer"}


class PermissionDenied(ModelServeError):
    """The caller is known but its role or model scope does not allow this. For a model outside the
    caller's scope the message is the same whether the model exists or not."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class RateLimited(ModelServeError):
    """The caller's rate limit (token bucket) or the model's concurrency cap is reached (``server/limits.py``).
    ``retry_after_s``: whole seconds until a retry can succeed (REST ``Retry-After``, gRPC ``retry-after``)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ModelServeError):
    """The request did not finish within its deadline (``--request-timeout-s``, or the gRPC client's)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class RequestTimeout(ModelServeError):
    """The client did not send the whole request body within ``--body-timeout-s``."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"
