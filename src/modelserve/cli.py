"""The ``modelserve`` command: thin commands over the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="modelserve: convert, optimize, register, serve and monitor ML models.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def serve(
    model_repository: Path = typer.Option(Path("models"), help="Folder of <model>/<version>/model.onnx"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    http_port: int = typer.Option(8000, help="HTTP port (0 = pick a free one)"),
    grpc_port: int = typer.Option(8001, help="gRPC port (0 = pick a free one, -1 = no gRPC)"),
    model_control_mode: str = typer.Option("none", help="none: load all at start; explicit: load/unload API only; "
                                                        "poll: also watch the repository"),
    load_model: Optional[list[str]] = typer.Option(None, help="Model to load at start in explicit mode (repeatable)"),
    poll_interval: float = typer.Option(2.0, help="Seconds between repository scans in poll mode"),
    max_request_bytes: int = typer.Option(256 * 1024 * 1024, help="Largest accepted request body"),
    ort_threads: int = typer.Option(0, envvar="MODELSERVE_ORT_THREADS",
                                    help="ONNX Runtime intra-op threads when a model's config does not say"),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
):
    """Serve a model repository over KServe V2 REST and gRPC (Triton clients work unchanged).

    Example: modelserve serve --model-repository models --http-port 8000 --grpc-port 8001
    """
    from modelserve.logs import setup_logging
    from modelserve.server.app import run
    from modelserve.settings import ServerSettings

    setup_logging(log_level)
    if model_control_mode not in ("none", "explicit", "poll"):
        raise typer.BadParameter("must be none, explicit or poll", param_hint="--model-control-mode")
    run(ServerSettings(
        model_repository=model_repository, host=host, http_port=http_port, grpc_port=grpc_port,
        model_control_mode=model_control_mode, load_models=load_model or [], poll_interval_s=poll_interval,
        max_request_bytes=max_request_bytes, ort_threads=ort_threads, log_level=log_level,
    ))


@app.command()
def demo(
    model_repository: Path = typer.Option(Path("models"), help="Where to put the demo model"),
    force: bool = typer.Option(False, help="Rebuild even if it exists"),
    http_port: int = typer.Option(8000, help="Port used in the printed examples"),
    grpc_port: int = typer.Option(8001, help="Port used in the printed examples"),
):
    """Build the demo model (a digits classifier, scikit-learn -> ONNX) into a model repository.

    Example: modelserve demo --model-repository models
    """
    from modelserve.demo import build_demo_repository, usage

    path = build_demo_repository(model_repository, force)
    typer.echo(f"demo model at {path}\n")
    typer.echo(usage(http_port, grpc_port))
