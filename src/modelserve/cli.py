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
    metrics_port: int = typer.Option(-1, help="A port of its own for GET /metrics, which the HTTP port serves "
                                              "too (0 = pick a free one, -1 = none)"),
    model_control_mode: str = typer.Option("none", help="none: load all at start; explicit: load/unload API only; "
                                                        "poll: also watch the repository"),
    load_model: Optional[list[str]] = typer.Option(None, help="Model to load at start in explicit mode; with --registry: serve only "
                                                       "these models (repeatable)"),
    poll_interval: float = typer.Option(2.0, help="Seconds between repository scans in poll mode"),
    max_request_bytes: int = typer.Option(256 * 1024 * 1024, help="Largest accepted request body"),
    ort_threads: int = typer.Option(0, envvar="MODELSERVE_ORT_THREADS",
                                    help="ONNX Runtime intra-op threads when a model's config does not say"),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
    registry: Optional[str] = typer.Option(None, help="Registry database URL: serve the versions --alias names "
                                                      "(instead of --model-repository) and follow its moves"),
    alias: str = typer.Option("production", help="With --registry: the alias to serve"),
    artifacts: Optional[str] = typer.Option(None, help="With --registry: artifact store URL (default: "
                                                       "MODELSERVE_REGISTRY_ARTIFACTS, or beside the SQLite file)"),
    registry_poll: float = typer.Option(2.0, help="With --registry: seconds between checks for alias moves"),
    registry_cache: Optional[Path] = typer.Option(None, envvar="MODELSERVE_REGISTRY_CACHE",
                                                  help="With --registry: folder for fetched artifacts "
                                                       "(default: one per registry under ~/.cache/modelserve)"),
    payload_log: bool = typer.Option(True, "--payload-log/--no-payload-log", envvar="MODELSERVE_PAYLOAD_LOG",
                                     help="Log every request and response to the monitor database"),
    monitor_db: Optional[str] = typer.Option(None, help="Payload log / feedback database URL (default: the "
                                                        "--registry one, else sqlite:///modelserve-monitor/monitor.db)"),
    monitor_spill: Optional[Path] = typer.Option(None, help="File where log records wait while that database is "
                                                            "down (default modelserve-monitor/spill.jsonl)"),
    monitor_max_buffer: int = typer.Option(200_000, envvar="MODELSERVE_MONITOR_MAX_BUFFER",
                                           help="Payload-log records waiting for its writer process at most; past "
                                                "them new records are dropped and counted (memory stays bounded)"),
    monitor_buffer_mb: int = typer.Option(256, envvar="MODELSERVE_MONITOR_BUFFER_MB", min=1,
                                          help="Shared memory (MiB) where payload-log records wait for the writer "
                                               "process; only the part a backlog needs is touched"),
    auth: str = typer.Option("none", envvar="MODELSERVE_AUTH",
                             help="Who may call: none, keys (API keys from 'modelserve keys create'), jwt, or keys+jwt. "
                                  "Anything but loopback needs one (or --insecure)"),
    keys_db: Optional[str] = typer.Option(None, envvar="MODELSERVE_KEYS_DB",
                                          help="Database holding the API keys (default: --registry, else "
                                               "MODELSERVE_REGISTRY_URL, else the embedded registry)"),
    jwt_secret_file: Optional[Path] = typer.Option(None, help="JWT: file holding the HS256 secret (>= 32 bytes)"),
    jwt_public_key: Optional[Path] = typer.Option(None, help="JWT: PEM public key (RSA -> RS256, EC P-256 -> ES256)"),
    jwt_jwks: Optional[Path] = typer.Option(None, help="JWT: JWKS file of the identity provider (re-read on change)"),
    jwt_audience: Optional[str] = typer.Option(None, help="JWT: required 'aud'"),
    jwt_issuer: Optional[str] = typer.Option(None, help="JWT: required 'iss'"),
    jwt_role_claim: str = typer.Option("role", help="JWT: claim with the role (dotted path, e.g. realm_access.roles)"),
    jwt_models_claim: str = typer.Option("models", help="JWT: claim with the model globs (absent: every model)"),
    metrics_auth: bool = typer.Option(True, "--metrics-auth/--no-metrics-auth", envvar="MODELSERVE_METRICS_AUTH",
                                      help="With --auth: GET /metrics needs a credential allowed every model"),
    insecure: bool = typer.Option(False, "--insecure", help="Allow listening beyond loopback without authentication"),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate chain (PEM) for HTTP and gRPC"),
    tls_key: Optional[Path] = typer.Option(None, help="TLS private key (PEM)"),
    tls_client_ca: Optional[Path] = typer.Option(None, help="Mutual TLS: require client certificates signed by this "
                                                            "CA (PEM)"),
    rate_limit: Optional[str] = typer.Option(None, envvar="MODELSERVE_RATE_LIMIT",
                                             help="RATE[:BURST]: inference requests a second per key (per client "
                                                  "address without --auth), bursts up to BURST; past it 429 + Retry-After"),
    max_inflight_per_model: int = typer.Option(0, envvar="MODELSERVE_MAX_INFLIGHT_PER_MODEL",
                                               help="Requests a model answers at once, past it 429 (0 = no cap; a "
                                                    "model's config.yaml 'limits: {max_inflight: N}' wins)"),
    request_timeout_s: float = typer.Option(60.0, envvar="MODELSERVE_REQUEST_TIMEOUT_S",
                                            help="Seconds from the request body to the answer, past it 504 / gRPC "
                                                 "DEADLINE_EXCEEDED (0 = none; a gRPC client's deadline also counts)"),
    body_timeout_s: float = typer.Option(30.0, envvar="MODELSERVE_BODY_TIMEOUT_S",
                                         help="Seconds a client may take to send the request body, past it 408 (0 = none)"),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: each model one application whose replicas "
                                                  "autoscale from its config's 'scaling:' (needs modelserve[ray])"),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: the cluster (auto, HOST:PORT or "
                                                         "ray://HOST:PORT); default: start a local one"),
):
    """Serve a model repository, or a registry alias, over KServe V2 REST and gRPC (Triton clients work unchanged).

    Example: modelserve serve --model-repository models --http-port 8000 --grpc-port 8001

    Example: modelserve serve --registry postgresql+psycopg://db/registry --artifacts s3://models --alias production

    Example: modelserve serve --host 0.0.0.0 --auth keys --tls-cert server.pem --tls-key server.key

    Example: modelserve serve --ray --ray-address auto --model-repository models
    """
    import sys

    from modelserve.logs import setup_logging
    from modelserve.server.app import run
    from modelserve.settings import ServerSettings

    setup_logging(log_level)
    if model_control_mode not in ("none", "explicit", "poll"):
        raise typer.BadParameter("must be none, explicit or poll", param_hint="--model-control-mode")
    if auth not in ("none", "keys", "jwt", "keys+jwt"):
        raise typer.BadParameter("must be none, keys, jwt or keys+jwt", param_hint="--auth")
    from modelserve.errors import InvalidInput
    from modelserve.server.limits import parse_rate

    try:
        parse_rate(rate_limit)
    except InvalidInput as exc:
        raise typer.BadParameter(exc.message, param_hint="--rate-limit") from None
    settings = ServerSettings(
        model_repository=model_repository, host=host, http_port=http_port, grpc_port=grpc_port,
        metrics_port=metrics_port, model_control_mode=model_control_mode, load_models=load_model or [], poll_interval_s=poll_interval,
        max_request_bytes=max_request_bytes, ort_threads=ort_threads, log_level=log_level,
        alias=alias, registry_poll_s=registry_poll, payload_log=payload_log, monitor_max_buffer=monitor_max_buffer,
        monitor_buffer_mb=monitor_buffer_mb,
        auth=auth, jwt_role_claim=jwt_role_claim, jwt_models_claim=jwt_models_claim, metrics_auth=metrics_auth,
        insecure=insecure, max_inflight_per_model=max_inflight_per_model, request_timeout_s=request_timeout_s,
        body_timeout_s=body_timeout_s,
        **{k: v for k, v in (("registry", registry), ("registry_artifacts", artifacts),
                             ("registry_cache", registry_cache), ("monitor_db", monitor_db),
                             ("monitor_spill", monitor_spill), ("keys_db", keys_db),
                             ("jwt_secret_file", jwt_secret_file), ("jwt_public_key", jwt_public_key),
                             ("jwt_jwks", jwt_jwks), ("jwt_audience", jwt_audience), ("jwt_issuer", jwt_issuer),
                             ("tls_cert", tls_cert), ("tls_key", tls_key), ("tls_client_ca", tls_client_ca),
                             ("rate_limit", rate_limit))
           if v is not None},
    )
    if not ray:
        run(settings)
        return
    try:
        from modelserve.scale import ray_serve
    except ImportError as exc:
        print(f"error: --ray needs Ray Serve: pip install 'modelserve[ray]' ({exc})", file=sys.stderr)
        raise SystemExit(2) from None
    ray_serve.run(settings, ray_address)


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
    typer.echo(usage(http_port, grpc_port, model_repository))


def _floats(text: Optional[str]) -> Optional[list[float]]:
    return [float(v) for v in text.split(",")] if text else None


def _fail(message: str, code: int = 1):
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def convert(
    source: str = typer.Argument(..., help="Model file (.pt/.pth TorchScript, .pt2 torch.export, .keras, .h5, "
                                           "SavedModel folder, .pkl/.joblib scikit-learn) or pkg.module:factory"),
    output: Path = typer.Option(..., "-o", "--output", help="File to write (.onnx, .tflite, .pt)"),
    to: str = typer.Option("", help="onnx, tflite or torchscript (default: from the output's suffix)"),
    weights: Optional[Path] = typer.Option(None, help="State dict (PyTorch) or weights file for pkg.module:factory"),
    input_shape: Optional[list[str]] = typer.Option(None, help="Input shape, e.g. 1,3,224,224 (repeat per input)"),
    input_name: Optional[list[str]] = typer.Option(None, help="Input name (repeat per input)"),
    output_name: Optional[list[str]] = typer.Option(None, help="Output name (repeat per output)"),
    sample: Optional[Path] = typer.Option(None, help="Sample inputs (.npy/.npz or image folder) for shapes and the check"),
    opset: int = typer.Option(17, help="ONNX opset"),
    dynamic_batch: bool = typer.Option(True, help="Make the first axis of inputs and outputs dynamic"),
    float16: bool = typer.Option(False, help="TFLite: store weights as float16"),
    trust_pickle: bool = typer.Option(False, help="Allow loading a pickle (it runs code from the file: only for files you trust)"),
    atol: float = typer.Option(1e-4, help="Largest accepted absolute difference between source and result"),
    rtol: float = typer.Option(1e-3, help="Largest accepted relative difference"),
    external_data: bool = typer.Option(False, help="Keep weights in a separate .data file (default: one file)"),
    pythonpath: Optional[Path] = typer.Option(None, help="Folder to import pkg.module from (default: current folder)"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON"),
):
    """Convert a PyTorch, Keras/TensorFlow or scikit-learn model, then check the result gives the same outputs.

    Example: modelserve convert mypkg.nets:resnet18 --weights net.pt --input-shape 1,3,224,224 -o net.onnx
    """
    import json

    from modelserve.convert import ConversionError
    from modelserve.convert import convert as run_convert

    try:  # N, ? or -1: a dimension of any size
        shapes = [tuple(None if d.strip() in ("N", "n", "?", "-1") else int(d) for d in s.split(","))
                  for s in input_shape] if input_shape else None
    except ValueError:
        _fail(f"--input-shape {' '.join(input_shape)}: expected comma-separated sizes such as 1,3,224,224", 2)
    try:
        result = run_convert(source, output, to=to or None, weights=weights, input_shapes=shapes,
                             input_names=input_name, output_names=output_name, sample=sample, opset=opset,
                             dynamic_batch=dynamic_batch, float16=float16, trust_pickle=trust_pickle,
                             atol=atol, rtol=rtol, external_data=external_data, pythonpath=pythonpath)
    except ConversionError as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        v = result.verification
        typer.echo(f"wrote {result.output} ({result.framework} -> {result.target}); checked on {v.samples} samples: "
                   f"max abs error {v.max_abs_error:.3g}, max rel error {v.max_rel_error:.3g} "
                   f"(atol {v.atol:g}, rtol {v.rtol:g})")


@app.command()
def optimize(
    model: str = typer.Argument(..., help="An .onnx file, or a PyTorch pkg.module:factory (with --weights)"),
    output: Path = typer.Option(..., "-o", "--output", help="The optimized .onnx to write (report: OUTPUT.report.json)"),
    graph: str = typer.Option("ort", help="Graph optimization: ort (ONNX Runtime offline), slim (onnxslim) or none"),
    quantize: Optional[str] = typer.Option(None, help="int8 quantization: dynamic or static (static needs --calibration)"),
    calibration: Optional[Path] = typer.Option(None, help="Calibration data: .npy/.npz or a folder of images"),
    calibration_method: str = typer.Option("minmax", help="minmax, entropy or percentile"),
    calibration_size: int = typer.Option(256, help="Samples of the calibration data to use"),
    per_channel: bool = typer.Option(False, help="int8: one scale per output channel of each weight"),
    fp16: bool = typer.Option(False, help="Store weights and compute in float16; inputs and outputs stay float32"),
    prune: Optional[float] = typer.Option(None, help="Target weight sparsity, e.g. 0.5 (magnitude pruning)"),
    structured: bool = typer.Option(False, help="Prune whole conv output channels (needs a PyTorch model)"),
    train_data: Optional[Path] = typer.Option(None, help="Labeled data to fine-tune after pruning or to distill on"),
    epochs: int = typer.Option(5, help="Fine-tuning / distillation epochs"),
    distill: Optional[str] = typer.Option(None, help="Student architecture pkg.module:factory to distill MODEL into"),
    weights: Optional[Path] = typer.Option(None, help="State dict when MODEL is a PyTorch pkg.module:factory"),
    pythonpath: Optional[Path] = typer.Option(None, help="Folder to import pkg.module from"),
    eval_data: Optional[Path] = typer.Option(None, help="Labeled evaluation data (.npz with labels, or class folders)"),
    mean: Optional[str] = typer.Option(None, help="Image folders: per-channel mean after scaling to 0..1, e.g. 0.485,0.456,0.406"),
    std: Optional[str] = typer.Option(None, help="Image folders: per-channel std"),
    max_accuracy_drop: float = typer.Option(1.0, help="Refuse a result that loses more top-1 accuracy (points)"),
    speed_gate: bool = typer.Option(True, help="Refuse a result slower than the original"),
    speed_tolerance: float = typer.Option(0.10, help="Speed gate: how much slower (fraction of p50) still passes"),
    input_shape: Optional[str] = typer.Option(None, help="PyTorch MODEL: per-sample input shape, e.g. 3,224,224 "
                                                         "(default: from the first .npy/.npz data file)"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table"),
):
    """Optimize a model step by step and report size, latency and accuracy before and after.

    Example: modelserve optimize net.onnx --quantize static --calibration calib.npz --eval-data val.npz -o net-int8.onnx
    """
    import json

    from pydantic import ValidationError

    from modelserve.optimize import GateRefused, OptimizeSpec
    from modelserve.optimize import optimize as run_optimize
    from modelserve.optimize.report import print_report, progress_bar

    try:
        spec = OptimizeSpec(graph=graph, quantize=quantize, calibration=calibration,
                            calibration_method=calibration_method, calibration_size=calibration_size,
                            per_channel=per_channel, fp16=fp16, prune=prune, prune_structured=structured,
                            train_data=train_data, epochs=epochs, distill_student=distill, weights=weights,
                            pythonpath=pythonpath, eval_data=eval_data, mean=_floats(mean), std=_floats(std),
                            max_accuracy_drop=max_accuracy_drop, speed_gate=speed_gate,
                            speed_tolerance=speed_tolerance,
                            input_shape=[int(d) for d in input_shape.split(",")] if input_shape else None)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}"
                        f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()), 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        with progress_bar(None if not json_out else False) as progress:
            report = run_optimize(model, output, spec, progress=progress)
    except GateRefused as exc:
        print_report(exc.report) if not json_out else typer.echo(json.dumps(exc.report.to_dict(), indent=2))
        _fail(f"refused: {exc.reason}; {output} was not written")
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    print_report(report) if not json_out else typer.echo(json.dumps(report.to_dict(), indent=2))


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="An .onnx model (any model the server can serve)"),
    data: Optional[Path] = typer.Option(None, help="Labeled data (.npz with labels, or class folders); none = latency only"),
    mean: Optional[str] = typer.Option(None, help="Image folders: per-channel mean after scaling to 0..1"),
    std: Optional[str] = typer.Option(None, help="Image folders: per-channel std"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
):
    """Measure a model: size, parameters, sparsity, latency at batch 1 and 32, throughput, and accuracy with --data.

    Example: modelserve evaluate net-int8.onnx --data val.npz
    """
    import json

    from modelserve.optimize import evaluate as run_evaluate
    from modelserve.optimize.report import print_profile, progress_bar

    try:
        with progress_bar(None if not json_out else False) as progress:
            profile = run_evaluate(model, data, mean=_floats(mean), std=_floats(std), progress=progress)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    print_profile(profile) if not json_out else typer.echo(json.dumps(profile.to_dict(), indent=2))


from modelserve.cli_models import models_app  # noqa: E402 - the registry commands (imports stay lazy inside)

app.add_typer(models_app, name="models")

from modelserve.cli_vision import init_app, predict  # noqa: E402 - images to vision models, new model folders

app.command()(predict)
app.add_typer(init_app, name="init")

from modelserve.cli_monitor import register as register_monitor  # noqa: E402 - logs, stats, feedback

register_monitor(app)

from modelserve.cli_keys import audit, keys_app  # noqa: E402 - API keys and the audit log

app.add_typer(keys_app, name="keys")
app.command()(audit)

from modelserve.cli_deploy import deploy_app  # noqa: E402 - rendered deployment artifacts (Kubernetes)

app.add_typer(deploy_app, name="deploy")
