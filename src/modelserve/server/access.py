"""Who may call what, at the protocol edge: one rule table for HTTP, one for gRPC, both checked before
any model is looked up.

- HTTP: ``InferRoute`` (rest.py), the ASGI app in front of FastAPI, calls ``Access.check_http`` for every
  request: the infer hot path with ``Action.INFER``, every other path through ``HTTP_RULES`` (method +
  path -> action and where the model name is). The principal goes into ``scope["state"]["principal"]``;
  handlers that list models read it with ``principal_of(request)`` and filter. A path no rule names
  needs an admin: a route added without a rule is closed, not open (tests/test_security_serving.py checks
  that every route of the app has a rule).
- gRPC: ``GRPC_RULES`` (method -> action, request field holding the model), checked by the
  ``grpc_service._mapped`` decorator (and per message on the stream).

Open without credentials: the health endpoints (HTTP ``/v2/health/*``, gRPC ``ServerLive``/``ServerReady``
and ``grpc.health.v1``), the dashboard page's static files (the data it shows, ``/v2/dashboard``, is not),
the OpenAPI docs (routes, no data), and ``/metrics`` when the server runs with ``--no-metrics-auth``.

Model scope: ``authorize`` runs on the model *name* the caller sent, before any lookup, so a model
outside the caller's scope gets the same 403 whether it exists or not. Views across every model
(``/v2/quality``, ``/v2/drift``, ``/v2/logs`` without ``model=``, the dashboard, ``/metrics``) need a
credential allowed every model; listings (``/v2/models``, the repository index, statistics, the
registry's model list) are filtered instead.

With authentication off (the default on loopback), ``Access`` is not built at all: ``InferRoute``
skips the check with one attribute test and handlers see ``Principal.anonymous()``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from modelserve.errors import ModelServeError, PermissionDenied
from modelserve.security import Action, Authenticator, Principal, authorize

log = logging.getLogger(__name__)

ANONYMOUS = Principal.anonymous()
OPEN = None  # a rule's action: no credentials needed


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str]
    path: re.Pattern
    #: ``OPEN``, or the action the request performs
    action: Action | None
    #: where the model name is: ``"path"`` (the pattern's ``model`` group), ``"query"`` (``?model=``), or None
    model_from: str | None = None
    #: the request reaches across every model: the credential must be allowed every model
    every_model: bool = False


def _rule(methods: str, path: str, action: Action | None, model_from: str | None = None,
          every_model: bool = False) -> Rule:
    return Rule(frozenset(methods.split()), re.compile(path), action, model_from, every_model)


M = r"(?P<model>[^/]+)"  # a path segment, as Starlette's {model} matches it
V = r"(?:/versions/[^/]+)?"
R, W = Action.READ_METADATA, Action.READ_METRICS

#: the first rule whose method and path match decides; order matters where paths overlap (as in the app)
HTTP_RULES: list[Rule] = [
    # health and docs: open
    _rule("GET HEAD", r"/v2/health/(live|ready)", OPEN),
    _rule("GET HEAD", r"/dashboard(/app\.js|/style\.css)?", OPEN),
    _rule("GET HEAD", r"/(docs|docs/oauth2-redirect|redoc|openapi\.json)", OPEN),
    # server-wide reads
    _rule("GET", r"/v2", R),  # server metadata: any valid credential
    _rule("GET", r"/v2/models", R),  # filtered to the caller's models
    _rule("GET", r"/v2/models/stats", R),  # filtered
    _rule("POST", r"/v2/repository/index", R),  # filtered
    _rule("GET", r"/metrics", W),  # OPEN instead with --no-metrics-auth (Access.__init__)
    _rule("GET", r"/v2/dashboard", W),
    # V2 per model
    _rule("GET", rf"/v2/models/{M}{V}(/ready|/config|/stats)?", R, "path"),
    _rule("POST", rf"/v2/models/{M}{V}/infer", Action.INFER, "path"),  # InferRoute checks it itself; for the list
    _rule("POST", rf"/v2/repository/models/{M}/(load|unload)", Action.LOAD_UNLOAD, "path"),
    _rule("POST", rf"/v2/repository/[^/]+/models/{M}/[^/]+", Action.LOAD_UNLOAD, "path"),
    # monitor
    _rule("POST", rf"/v2/models/{M}/feedback", Action.FEEDBACK, "path"),
    _rule("POST", rf"/v2/models/{M}/drift/reset", Action.FEEDBACK, "path"),
    _rule("GET", rf"/v2/models/{M}/(quality|drift)", R, "path"),
    _rule("GET", r"/v2/(quality|drift)", R, every_model=True),
    _rule("GET", r"/v2/logs", Action.READ_LOGS, "query"),  # ?model=: that model; none: every model
    _rule("POST", r"/v2/logs/flush", Action.READ_LOGS, every_model=True),
    _rule("GET", r"/v2/logs/status", W),
    # TF Serving REST / KServe V1
    _rule("GET", r"/v1/models", R),  # filtered
    _rule("GET", r"/v1/models/(?P<model>[^/:]+)(/.*)?", R, "path"),
    _rule("POST", r"/v1/models/(?P<model>[^/:]+)([/:].*)?", Action.INFER, "path"),
    # images
    _rule("POST", rf"/models/{M}{V}/predict", Action.INFER, "path"),
    # the registry's management API (registry_api.py asks for admin where force/protect is given)
    _rule("GET", r"/v2/registry/models", R),  # filtered
    _rule("GET", r"/v2/registry/serving", R),  # filtered
    _rule("GET", rf"/v2/registry/models/{M}(/.*)?", R, "path"),
    _rule("POST", rf"/v2/registry/models/{M}/versions", Action.REGISTER, "path"),
    _rule("DELETE", rf"/v2/registry/models/{M}/versions/[^/]+", Action.DELETE, "path"),
    _rule("PUT DELETE", rf"/v2/registry/models/{M}/aliases/[^/]+", Action.MOVE_ALIAS, "path"),
    _rule("POST", rf"/v2/registry/models/{M}/(promote|rollback)", Action.MOVE_ALIAS, "path"),
]

#: a path no rule names: credentials of an admin allowed every model
DEFAULT_RULE = Rule(frozenset(), re.compile(""), Action.MANAGE_KEYS, None, True)

#: gRPC method -> (action or OPEN, the request field naming the model; "" = none)
GRPC_RULES: dict[str, tuple[Action | None, str]] = {
    "ServerLive": (OPEN, ""),
    "ServerReady": (OPEN, ""),
    "ServerMetadata": (R, ""),
    "ModelReady": (R, "name"),
    "ModelMetadata": (R, "name"),
    "ModelConfig": (R, "name"),
    "ModelStatistics": (R, "name"),  # empty name: every model, filtered
    "RepositoryIndex": (R, ""),  # filtered
    "RepositoryModelLoad": (Action.LOAD_UNLOAD, "model_name"),
    "RepositoryModelUnload": (Action.LOAD_UNLOAD, "model_name"),
    "ModelInfer": (Action.INFER, "model_name"),
    "ModelStreamInfer": (Action.INFER, "model_name"),  # checked per message
}


def every_model_denied(action: Action) -> PermissionDenied:
    return PermissionDenied(f"permission denied: a credential limited to some models may not {action.description} "
                            "across every model; ask about one model")


class Access:
    """The server's authentication (an ``Authenticator``) and its rules; ``None`` in the server when off."""

    def __init__(self, authenticator: Authenticator, metrics_auth: bool = True):
        self.authenticator = authenticator
        self.metrics_auth = metrics_auth
        self.rules = [r for r in HTTP_RULES if metrics_auth or r.path.pattern != "/metrics"]
        if not metrics_auth:
            self.rules.insert(0, _rule("GET", r"/metrics", OPEN))

    def check(self, authorization: str | None, action: Action, model: str | None = None,
              every_model: bool = False) -> Principal:
        """Authenticate the ``Authorization`` value and authorize ``action`` (on ``model``) -> the principal;
        ``Unauthenticated`` (401) / ``PermissionDenied`` (403) otherwise."""
        principal = self.authenticator.authenticate(authorization)
        authorize(principal, action, model)
        if every_model and not principal.unrestricted:
            raise every_model_denied(action)
        return principal

    # -- HTTP -----------------------------------------------------------------------------------

    def rule_for(self, method: str, path: str) -> tuple[Rule, re.Match | None]:
        for rule in self.rules:
            if method in rule.methods:
                match = rule.path.fullmatch(path)
                if match is not None:
                    return rule, match
        return DEFAULT_RULE, None

    def check_http(self, scope, authorization: str | None) -> Principal | None:
        """The principal for an HTTP request (None on an open path), or the error to answer with."""
        rule, match = self.rule_for(scope["method"], scope["path"])
        if rule.action is OPEN:
            return None
        if rule.model_from == "path":
            return self.check(authorization, rule.action, match.group("model"))
        if rule.model_from == "query":
            models = [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                              keep_blank_values=True) if k == "model" and v]
            principal = self.check(authorization, rule.action, None, every_model=not models)
            for model in models:
                authorize(principal, rule.action, model)
            return principal
        return self.check(authorization, rule.action, None, rule.every_model)

    def guard_asgi(self, app, action: Action = Action.READ_METRICS):
        """``app`` (a bare ASGI app, e.g. the metrics port's) behind a check of ``action`` on every request."""
        from modelserve.server.rest import error_parts

        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                try:
                    self.check(_header(scope, b"authorization"), action, every_model=True)
                except ModelServeError as exc:
                    return await send_error(send, exc, error_parts)
            return await app(scope, receive, send)

        return guarded

    # -- gRPC -----------------------------------------------------------------------------------

    def check_grpc(self, method: str, request, context) -> Principal:
        action, field = GRPC_RULES.get(method, (DEFAULT_RULE.action, ""))
        if action is OPEN:
            return ANONYMOUS
        model = getattr(request, field) if field else None
        principal = self.authenticator.authenticate_metadata(context.invocation_metadata())
        authorize(principal, action, model or None)
        if method not in GRPC_RULES and not principal.unrestricted:
            raise every_model_denied(action)
        return principal


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def send_error(send, exc: ModelServeError, error_parts: Callable) -> None:
    status, body, headers = error_parts(exc)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def principal_of(request) -> Principal:
    """The caller of an HTTP request, as ``InferRoute`` recorded it (anonymous when authentication is off)."""
    state = request.scope.get("state")
    return (state.get("principal") if state else None) or ANONYMOUS


def filter_names(principal: Principal, names):
    return list(names) if principal.unrestricted else principal.filter_models(names)
