"""``modelserve keys …`` and ``modelserve audit``: API keys and the audit log in the registry database.

``keys create`` prints the secret once, alone on stdout (``KEY=$(modelserve keys create …)`` works; the
notice and the key's details go to stderr), or with ``--json`` as ``{"secret": …, "key": {…}}``. Nothing
else ever shows a secret or its hash: the database holds only the hash.

Every command takes ``--registry`` (or ``MODELSERVE_REGISTRY_URL``; default the embedded SQLite registry)
and ``--json``. Errors print ``error: …`` on stderr and exit 1 (2 for bad input), never a traceback.
Who made a change (``created_by``, ``revoked_by``, the audit log's actor) is ``MODELSERVE_REGISTRY_ACTOR``,
else user@host, as for the registry's history.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from modelserve.cli_models import JsonOut, _console, _esc, _fail, _failing_clearly, _print_json, _table

if TYPE_CHECKING:
    from modelserve.security import KeyStore

keys_app = typer.Typer(help="API keys for the servers: create (shown once), list, revoke.",
                       no_args_is_help=True, add_completion=False)

RegistryUrl = Annotated[Optional[str], typer.Option(
    "--registry", envvar="MODELSERVE_REGISTRY_URL", show_default=False,
    help="Registry database URL (keys live there): sqlite:///path/registry.db or postgresql+psycopg://… "
         "[default: sqlite:///modelserve-registry/registry.db]")]


def _when(at) -> str:
    return at.strftime("%Y-%m-%d %H:%M") if at is not None else ""


@contextmanager
def _keystore(url: Optional[str]) -> Iterator[tuple[KeyStore, str]]:
    """Open the key store (migrating the database to head) and name the actor; expected failures
    become ``error: …`` and an exit code."""
    from pydantic import ValidationError

    from modelserve.registry.db import safe_url
    from modelserve.security import KeyStore
    from modelserve.settings import RegistrySettings

    try:
        settings = RegistrySettings(**({"url": url} if url else {}))
    except ValidationError as exc:
        _fail(f"registry settings: {exc.errors()[0].get('msg', exc)}", 2)
    shown = safe_url(settings.url)
    with _failing_clearly(shown, opening=True):
        store = KeyStore.open(settings.url, client="cli")
    if settings.actor:
        actor = settings.actor
    else:
        from modelserve.registry.registry import default_actor

        actor = default_actor()
    try:
        with _failing_clearly(shown):
            yield store, actor
    finally:
        store.close()


def _day(at) -> str:
    return at.strftime("%Y-%m-%d") if at is not None else ""


def _models(models: list[str]) -> str:
    return "all" if models == ["*"] else ", ".join(models) or "none"


@keys_app.command()
def create(
    name: str = typer.Option(..., "--name", "-n", help="A unique name for the key (who or what uses it)"),
    role: str = typer.Option(..., "--role", "-r", help="reader (metadata + inference), operator (also load/unload, "
                                                       "aliases, feedback) or admin (also keys, protected aliases, "
                                                       "delete)"),
    models: Optional[str] = typer.Option(None, "--models", "-m", help="Comma-separated model globs the key may use, "
                                                                      "e.g. 'resnet*,bert' [default: all models]"),
    expires: Optional[str] = typer.Option(None, "--expires", help="30d, 12h, 90m, 2w or an ISO date/time (UTC) "
                                                                  "[default: never]"),
    registry: RegistryUrl = None,
    json_out: JsonOut = False,
):
    """Create an API key and print its secret, once: it is stored only as a hash and cannot be shown again.

    Example: modelserve keys create --name ci --role reader --models 'resnet*' --expires 90d
    """
    from modelserve.errors import InvalidInput
    from modelserve.security import parse_expiry

    try:
        expires_at = parse_expiry(expires)
    except InvalidInput as exc:
        _fail(exc.message, 2)
    with _keystore(registry) as (store, actor):
        secret, info = store.create(name, role, models, expires_at, created_by=actor)
    if json_out:
        typer.echo(json.dumps({"secret": secret, "key": info.model_dump(mode="json")}, indent=2))
        typer.echo("Store the secret now: it cannot be shown again.", err=True)
        return
    typer.echo(secret)
    expiry = f"expires {_when(info.expires_at)} UTC" if info.expires_at else "never expires"
    typer.echo(f"API key {info.name!r} (id {info.key_id}, role {info.role}, models {_models(info.models)}, {expiry}).\n"
               "This is the only time the secret is shown: store it now (it cannot be shown again). "
               "Send it as 'Authorization: Bearer <secret>'.", err=True)


@keys_app.command("list")
def list_keys(
    active: bool = typer.Option(False, "--active", help="Only keys that work (not revoked, not expired)"),
    registry: RegistryUrl = None,
    json_out: JsonOut = False,
):
    """List API keys (never their secrets): name, id, role, models, status, dates.

    Example: modelserve keys list --active
    """
    with _keystore(registry) as (store, _actor):
        keys = store.list()
    if active:
        keys = [k for k in keys if k.status == "active"]
    if json_out:
        return _print_json(keys)
    table = _table("API keys", "name", "!id", "role", "models", "status", "!created", "!expires", "!last used")
    styles = {"active": "green", "expired": "yellow", "revoked": "red"}
    for k in keys:
        table.add_row(_esc(k.name), k.key_id, k.role, _esc(_models(k.models)), f"[{styles[k.status]}]{k.status}[/]",
                      _day(k.created_at), _day(k.expires_at) or "never", _day(k.last_used_at))
    _console().print(table)


@keys_app.command()
def revoke(
    key: str = typer.Argument(..., help="The key's name or its id (the 8 characters after 'ms_')"),
    registry: RegistryUrl = None,
    json_out: JsonOut = False,
):
    """Revoke an API key: servers refuse it within seconds (their key cache refreshes every ~2 s).

    Example: modelserve keys revoke ci
    """
    with _keystore(registry) as (store, actor):
        info = store.revoke(key, by=actor)
    if json_out:
        return _print_json(info)
    _console().print(f"revoked API key {_esc(info.name)} (id {info.key_id}, role {info.role})")


def audit(
    since: Optional[str] = typer.Option(None, "--since", help="Only entries since: 7d, 12h, 30m ago, or an ISO "
                                                              "date/time (UTC)"),
    actor: Optional[str] = typer.Option(None, "--actor", help="Only this actor's changes ('alice' matches "
                                                              "alice@anyhost)"),
    action: Optional[str] = typer.Option(None, "--action", help="Only this action: key.create, key.revoke, …"),
    limit: int = typer.Option(100, help="Newest entries to show (0 = all)"),
    registry: RegistryUrl = None,
    json_out: JsonOut = False,
):
    """Show the audit log, oldest first: who changed API keys (and other guarded settings), when, and what.

    Example: modelserve audit --since 7d --actor alice
    """
    from modelserve.errors import InvalidInput
    from modelserve.security.keys import parse_since

    start = None
    if since:
        try:
            start = parse_since(since)
        except InvalidInput as exc:
            _fail(exc.message, 2)
    with _keystore(registry) as (store, _actor):
        entries = store.audit(since=start, actor=actor, action=action, limit=limit or None)
    if json_out:
        return _print_json(entries)
    table = _table("audit log (oldest first)", ">!id", "!at", "actor", "action", "target", "detail")
    for e in entries:
        detail = ", ".join(f"{k}={_models(v) if k == 'models' else v}" for k, v in e.detail.items()
                           if v is not None and k != "key_id")
        table.add_row(str(e.id), _when(e.at), _esc(e.actor), _esc(e.action), _esc(e.target), _esc(detail))
    _console().print(table)
