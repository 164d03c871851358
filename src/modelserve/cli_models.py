"""``modelserve models …``: thin commands over the registry's Python API (``modelserve.registry.Registry``).

Every command takes ``--registry`` / ``--artifacts`` (or ``MODELSERVE_REGISTRY_URL`` / ``_ARTIFACTS``) and
``--json``, which prints the registry's own records (``model_dump(mode="json")``) instead of tables.
Errors print ``error: …`` on stderr and exit 1 (2 for bad input), never a traceback.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from modelserve.registry import AliasInfo, HistoryInfo, ModelDetail, Registry, VersionInfo

DIGEST = 10  # hex digits of a sha256 shown in tables

models_app = typer.Typer(help="The model registry: register versions, move aliases, promote, roll back, export.",
                         no_args_is_help=True, add_completion=False)
alias_app = typer.Typer(help="Point an alias (production, staging, …) at a version, with an optional canary.",
                        no_args_is_help=True, add_completion=False)
models_app.add_typer(alias_app, name="alias")

RegistryUrl = Annotated[Optional[str], typer.Option(
    "--registry", envvar="MODELSERVE_REGISTRY_URL", show_default=False,
    help="Registry database URL: sqlite:///path/registry.db or postgresql+psycopg://… "
         "[default: sqlite:///modelserve-registry/registry.db]")]
ArtifactsUrl = Annotated[Optional[str], typer.Option(
    "--artifacts", envvar="MODELSERVE_REGISTRY_ARTIFACTS", show_default=False,
    help="Artifact store: a folder or s3://bucket/prefix [default: artifacts/ beside a SQLite registry]")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the registry's records as JSON instead of tables")]
Force = Annotated[bool, typer.Option("--force", help="Move a protected alias (the admin right; needs --reason)")]
Reason = Annotated[str, typer.Option("--reason", help="Why: recorded in the history (required with --force)")]


# -- plumbing ----------------------------------------------------------------------------------

def _fail(message: str, code: int = 1):
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {_esc(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


@contextmanager
def _failing_clearly(shown: str, opening: bool = False) -> Iterator[None]:
    """Expected failures of a registry command, or of ``opening`` the database ``shown``, -> ``error: …``
    and an exit code (2: the input was wrong)."""
    from sqlalchemy.exc import SQLAlchemyError

    from modelserve.errors import InvalidInput, ModelServeError

    try:
        yield
    except InvalidInput as exc:
        _fail(exc.message, 2)
    except ModelServeError as exc:
        _fail(exc.message)
    except SQLAlchemyError as exc:
        _fail(f"registry {shown}: {getattr(exc, 'orig', None) or exc}")
    except (ValueError, ImportError) as exc:  # a bad URL or settings value, a missing driver
        if not opening:
            raise
        _fail(f"registry settings: {exc}", 2)
    except OSError as exc:
        _fail(f"registry {shown}: {exc}" if opening else str(exc))


@contextmanager
def _registry(url: Optional[str], artifacts: Optional[str]) -> Iterator[Registry]:
    """Open the registry; turn every expected failure into ``error: …`` and an exit code."""
    from modelserve.registry import Registry
    from modelserve.registry.db import safe_url

    overrides = {k: v for k, v in (("url", url), ("artifacts", artifacts)) if v}
    shown = safe_url(url or "the default registry")
    with _failing_clearly(shown, opening=True):
        reg = Registry.from_settings(**overrides)
    try:
        with _failing_clearly(shown):
            yield reg
    finally:
        reg.close()


def _print_json(data: Any) -> None:
    def dump(x):
        return x.model_dump(mode="json") if hasattr(x, "model_dump") else x

    typer.echo(json.dumps([dump(x) for x in data] if isinstance(data, list) else dump(data), indent=2))


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _table(title: str, *columns: str):
    """A rich table; a column named ``>name`` is right-aligned, ``!name`` never wraps (ids, digests, dates)."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        flags, name = column[:len(column) - len(column.lstrip(">!"))], column.lstrip(">!")
        table.add_column(name, justify="right" if ">" in flags else "left", no_wrap="!" in flags,
                         overflow="ellipsis" if "!" in flags else "fold")
    return table


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _when(at) -> str:
    return at.strftime("%Y-%m-%d %H:%M")


def _change(from_version: int | None, to_version: int | None) -> str:
    if from_version is None and to_version is None:
        return ""
    return f"{'' if from_version is None else from_version} → {'' if to_version is None else to_version}".strip()


def _alias_line(a: AliasInfo) -> str:
    text = f"{a.model} {a.alias} → {a.version}"
    if a.canary_version is not None:
        text += f" (canary {a.canary_version} gets {a.canary_weight:.0%} of requests"
        text += f", sticky by header {a.sticky_header})" if a.sticky_header else ")"
    return text + (" [protected]" if a.protected else "")


def _key_values(items: Optional[list[str]], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"{flag} {item}: expected key=value", 2)
        out[key.strip()] = value
    return out


def _read_mapping(path: Optional[Path], flag: str, loader: str) -> Optional[dict]:
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as exc:
        _fail(f"{flag} {path}: {exc.strerror or exc}", 2)
    try:
        if loader == "yaml":
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as exc:  # yaml.YAMLError and json.JSONDecodeError are both ValueErrors
        _fail(f"{flag} {path} does not parse: {exc}", 2)
    if not isinstance(data, dict):
        _fail(f"{flag} {path} must hold a mapping (key: value), not {type(data).__name__}", 2)
    return data


# -- commands ----------------------------------------------------------------------------------

@models_app.command()
def register(
    path: Path = typer.Argument(..., help="The model file (.onnx, .pt, .tflite, .pkl, …)"),
    name: str = typer.Option(..., "--name", "-n", help="Model name"),
    from_version: Optional[str] = typer.Option(None, help="The version it was derived from: 3, an alias, or "
                                                          "other-model:3 (records lineage)"),
    step: Optional[str] = typer.Option(None, help="How it was derived: convert, optimize, graph, quantize, fp16, "
                                                  "prune, distill, finetune, retrain or import"),
    description: str = typer.Option("", help="Free text shown with the version"),
    tag: Optional[list[str]] = typer.Option(None, help="key=value (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="Serving config (YAML, the model repository's config.yaml "
                                                     "fields), written out by export"),
    metrics: Optional[Path] = typer.Option(None, help="JSON object of metrics (a <stem>.report.json from "
                                                      "modelserve optimize beside the file is read anyway)"),
    format: Optional[str] = typer.Option(None, "--format", help="Model format when the suffix does not tell "
                                                                "(onnx, torchscript, tflite, sklearn, keras, …)"),
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Register a model file as the next version of NAME (the file is stored once per content).

    Example: modelserve models register net-int8.onnx --name resnet --from-version 1 --step quantize
    """
    tags = _key_values(tag, "--tag")
    config_data = _read_mapping(config, "--config", "yaml")
    metrics_data = _read_mapping(metrics, "--metrics", "json")
    with _registry(registry, artifacts) as reg:
        v = reg.register(path, name, from_version=from_version, step=step, metrics=metrics_data, tags=tags,
                         description=description, config=config_data, format=format)
    if json_out:
        return _print_json(v)
    origin = f" ({v.step} of version {v.parent})" if v.step else (f" (from version {v.parent})" if v.parent else "")
    _console().print(f"registered {_esc(v.model)} version {v.version}{_esc(origin)}: {v.format}, {_size(v.size)}, "
                     f"sha256 {v.digest[:12]}…")


@models_app.command("list")
def list_models(registry: RegistryUrl = None, artifacts: ArtifactsUrl = None, json_out: JsonOut = False):
    """List the registered models with their version counts and aliases.

    Example: modelserve models list --registry postgresql+psycopg://ml@db/registry
    """
    with _registry(registry, artifacts) as reg:
        models = reg.list_models()
    if json_out:
        return _print_json(models)
    table = _table("registered models", "model", ">!versions", ">!latest", "aliases", "!created", "description")
    for m in models:
        table.add_row(_esc(m.name), str(m.versions), str(m.latest_version or ""),
                      _esc(", ".join(f"{a} → {v}" for a, v in sorted(m.aliases.items()))),
                      _when(m.created_at), _esc(m.description))
    _console().print(table if models else "no registered models")


@models_app.command()
def show(
    name: str = typer.Argument(..., help="Model name"),
    history_limit: int = typer.Option(10, "--history", help="How many of the latest history entries to show"),
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Show a model: its versions, aliases (with canary and protection), lineage tree and latest history.

    Example: modelserve models show resnet
    """
    with _registry(registry, artifacts) as reg:
        detail = reg.show(name, history_limit=history_limit or None)
        children = reg.children(name)
    if json_out:
        return _print_json(detail)
    console = _console()
    console.print(_versions_table(detail))
    if detail.aliases:
        console.print(_aliases_table(detail.aliases))
    console.print(_lineage_tree(detail, children))
    console.print(_history_table(detail.history, f"latest history of {detail.name}"))


def _versions_table(detail: ModelDetail):
    title = f"{_esc(detail.name)}: versions" + (f" — {_esc(detail.description)}" if detail.description else "")
    table = _table(title, ">!version", "format", ">!size", "!sha256", "aliases", "derived", "!created")
    for v in detail.versions:
        derived = f"{v.step or 'from'} ← {v.parent}" if v.parent else ""
        table.add_row(str(v.version), v.format, _size(v.size), v.digest[:DIGEST], _esc(", ".join(v.aliases)),
                      _esc(derived), _when(v.created_at))
    return table


def _aliases_table(aliases: list[AliasInfo]):
    table = _table("aliases", "alias", ">!version", ">!canary", ">!weight", "sticky", "protected", "!updated")
    for a in aliases:
        canary = a.canary_version is not None
        table.add_row(_esc(a.alias), str(a.version), str(a.canary_version) if canary else "",
                      f"{a.canary_weight:.0%}" if canary else "", _esc(a.sticky_header or ""),
                      "yes" if a.protected else "", _when(a.updated_at))
    return table


def _lineage_tree(detail: ModelDetail, children: dict[int, list[str]]):
    """Versions nested under the version they were derived from; other models' versions dimmed."""
    from rich.tree import Tree

    tree = Tree(f"{_esc(detail.name)}: lineage")
    numbers = {v.version for v in detail.versions}
    kids: dict[int, list[VersionInfo]] = defaultdict(list)
    outside: dict[str, list[VersionInfo]] = defaultdict(list)  # parents in another model, or deleted ones
    roots: list[VersionInfo] = []
    for v in detail.versions:
        if v.parent is None:
            roots.append(v)
        elif v.parent.isdigit() and int(v.parent) in numbers:
            kids[int(v.parent)].append(v)
        else:
            outside[v.parent].append(v)

    def add(node, v: VersionInfo) -> None:
        label = f"[bold]{v.version}[/]" + (f" [cyan]{_esc(v.step)}[/]" if v.step else "")
        label += f" {v.format} {_size(v.size)} sha256 {v.digest[:DIGEST]}"
        if v.aliases:
            label += f" [green]{_esc(', '.join(v.aliases))}[/]"
        branch = node.add(label)
        for child in kids[v.version]:
            add(branch, child)
        for ref in children.get(v.version, []):
            if not ref.startswith(f"{detail.name}:"):
                branch.add(f"[dim]{_esc(ref)} (another model)[/]")

    for v in roots:
        add(tree, v)
    for ref, versions in outside.items():
        node = tree.add(f"[dim]{_esc(ref if ':' in ref else f'{detail.name}:{ref} (deleted)')}[/]")
        for v in versions:
            add(node, v)
    return tree


def _history_table(entries: list[HistoryInfo], title: str):
    table = _table(title, ">!id", "!at", "!action", "alias", "!versions", "reason / details", "by")
    for h in entries:
        details = ", ".join(f"{k}={v}" for k, v in h.details.items() if k not in ("digest", "size", "source"))
        notes = _esc(h.reason) + (f" [dim]{_esc(details)}[/]" if details else "")
        table.add_row(str(h.id), _when(h.at), h.action, _esc(h.alias or ""), _change(h.from_version, h.to_version),
                      notes.strip(), _esc(h.actor))
    return table


@alias_app.command("set")
def alias_set(
    name: str = typer.Argument(..., help="Model name"),
    alias: str = typer.Argument(..., help="Alias name, e.g. production or staging"),
    version: str = typer.Argument(..., help="Version number (or another alias) to point at"),
    canary: Optional[str] = typer.Option(None, help="Canary version: gets --weight of the requests"),
    weight: float = typer.Option(0.0, help="Share of requests (0..1, exclusive) sent to --canary"),
    sticky_header: Optional[str] = typer.Option(None, help="Request header whose value pins a client to one side"),
    protect: Optional[bool] = typer.Option(None, "--protect/--no-protect",
                                           help="Protect the alias: later moves need --force and --reason"),
    force: Force = False,
    reason: Reason = "",
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Point ALIAS of NAME at VERSION (servers following the alias swap to it), optionally with a canary.

    Example: modelserve models alias set resnet production 2 --canary 3 --weight 0.1 --sticky-header x-user
    """
    with _registry(registry, artifacts) as reg:
        info = reg.set_alias(name, alias, version, canary=canary, weight=weight, sticky_header=sticky_header,
                             protect=protect, force=force, reason=reason)
    if json_out:
        return _print_json(info)
    _console().print(_esc(_alias_line(info)))


@alias_app.command("delete")
def alias_delete(
    name: str = typer.Argument(..., help="Model name"),
    alias: str = typer.Argument(..., help="Alias to remove"),
    force: Force = False,
    reason: Reason = "",
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Remove an alias (a protected one needs --force and --reason).

    Example: modelserve models alias delete resnet staging
    """
    with _registry(registry, artifacts) as reg:
        reg.delete_alias(name, alias, force=force, reason=reason)
    if json_out:
        return _print_json({"model": name, "alias": alias, "deleted": True})
    _console().print(f"deleted alias {_esc(alias)} of {_esc(name)}")


@models_app.command()
def promote(
    name: str = typer.Argument(..., help="Model name"),
    source: str = typer.Option("staging", "--from", help="Alias whose version is promoted"),
    target: str = typer.Option("production", "--to", help="Alias moved to that version"),
    force: Force = False,
    reason: Reason = "",
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Point the --to alias at the version the --from alias points at (staging → production by default).

    Example: modelserve models promote resnet --from staging --to production
    """
    with _registry(registry, artifacts) as reg:
        info = reg.promote(name, source, target, force=force, reason=reason)
    if json_out:
        return _print_json(info)
    _console().print(f"{_esc(_alias_line(info))} (promoted from {_esc(source)})")


@models_app.command()
def rollback(
    name: str = typer.Argument(..., help="Model name"),
    alias: str = typer.Argument("production", help="Alias to move back one step"),
    force: Force = False,
    reason: Reason = "",
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Move ALIAS back to the version it pointed at before its last move (one step, recorded in the history).

    Example: modelserve models rollback resnet production --reason "p99 latency doubled"
    """
    with _registry(registry, artifacts) as reg:
        info = reg.rollback(name, alias, force=force, reason=reason)
    if json_out:
        return _print_json(info)
    _console().print(f"rolled back {_esc(name)} {_esc(alias)}: {info.previous_version} → {info.version}")


@models_app.command()
def delete(
    name: str = typer.Argument(..., help="Model name"),
    version: int = typer.Argument(..., help="Version number to delete"),
    reason: Reason = "",
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Delete a version (refused while an alias points at it); its file goes when no other version shares it.

    Example: modelserve models delete resnet 1 --reason "superseded by 3"
    """
    with _registry(registry, artifacts) as reg:
        reg.delete_version(name, version, reason=reason)
    if json_out:
        return _print_json({"model": name, "version": version, "deleted": True})
    _console().print(f"deleted version {version} of {_esc(name)}")


@models_app.command()
def history(
    name: str = typer.Argument(..., help="Model name"),
    alias: Optional[str] = typer.Option(None, help="Only this alias's moves"),
    limit: int = typer.Option(50, help="Newest entries to show (0 = all)"),
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Show what happened to a model, newest first: registrations, alias moves, promotions, rollbacks, deletions.

    Example: modelserve models history resnet --alias production --limit 20
    """
    with _registry(registry, artifacts) as reg:
        entries = reg.history(name, alias=alias, limit=limit or None)
    if json_out:
        return _print_json(entries)
    title = f"history of {name}" + (f" {alias}" if alias else "") + " (newest first)"
    _console().print(_history_table(entries, _esc(title)))


@models_app.command()
def lineage(
    name: str = typer.Argument(..., help="Model name"),
    version: str = typer.Argument(..., help="Version number or alias"),
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Show a version and the versions it was derived from, step by step (newest first).

    Example: modelserve models lineage resnet production
    """
    with _registry(registry, artifacts) as reg:
        chain = reg.lineage(name, version)
    if json_out:
        return _print_json(chain)
    table = _table(f"lineage of {_esc(name)} {_esc(version)} (newest first)", "model", ">!version", "step",
                   "format", ">!size", "!sha256", "metrics", "!created")
    for v in chain:
        metrics = ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in v.metrics.items())
        table.add_row(_esc(v.model), str(v.version), _esc(v.step or ""), v.format, _size(v.size), v.digest[:DIGEST],
                      _esc(metrics), _when(v.created_at))
    _console().print(table)


@models_app.command()
def export(
    name: str = typer.Argument(..., help="Model name"),
    dest: Path = typer.Argument(..., help="Model repository folder: writes DEST/NAME/<version>/<file>"),
    version: Optional[str] = typer.Option(None, help="Version number or alias (default: every version)"),
    registry: RegistryUrl = None,
    artifacts: ArtifactsUrl = None,
    json_out: JsonOut = False,
):
    """Write versions of a model into a model repository folder (digests verified) that the server serves.

    Example: modelserve models export resnet models --version production && modelserve serve --model-repository models
    """
    with _registry(registry, artifacts) as reg:
        versions = [reg.version(name, version)] if version else reg.show(name, history_limit=1).versions
        model_dir = reg.export(name, dest, version)
    if json_out:
        return _print_json({"model": name, "path": str(model_dir),
                            "versions": [v.model_dump(mode="json") for v in versions]})
    console = _console()
    for v in versions:
        console.print(f"exported {_esc(name)} version {v.version} to {_esc(model_dir / str(v.version) / v.filename)} "
                      f"(sha256 {v.digest[:12]}… verified)")
    console.print(f"serve it: modelserve serve --model-repository {_esc(dest)}")
