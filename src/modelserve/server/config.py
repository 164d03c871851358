"""Model configuration: one pydantic model, read from Triton's config.pbtxt, our YAML, or nothing.

Three sources, one meaning:
- ``config.pbtxt``: Triton's protobuf text format, read as-is (unknown fields are skipped);
- ``config.yaml``: ours, the same fields with friendlier spellings (see ``ModelConfig``);
- no file: everything is derived from the model file by ``complete()``.

``to_triton()`` renders the config back as Triton's JSON (``/config`` and gRPC ``ModelConfig``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelserve.datatypes import CONFIG_OF, parse_datatype
from modelserve.errors import InvalidInput, ModelLoadError
from modelserve.runtime import RuntimeOptions, TensorSpec
from modelserve.vision.config import ImagePreprocess, Postprocess

log = logging.getLogger(__name__)

CONFIG_FILES = ("config.yaml", "config.yml", "config.pbtxt")
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_SIZE = 1024
PLATFORM_OF_BACKEND = {"onnxruntime": "onnxruntime_onnx", "python": "python", "pipeline": "ensemble"}
#: the code/model file of a version folder when the config names none
DEFAULT_FILE_OF_BACKEND = {"python": "model.py", "pipeline": ""}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TensorConfig(_Strict):
    name: str
    datatype: str = Field(alias="data_type")
    #: dims without the batch dimension when ``max_batch_size`` > 0; -1 = any size
    dims: list[int]
    format: str = "FORMAT_NONE"
    label_filename: str = ""
    optional: bool = False

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        try:
            return parse_datatype(value)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None


class DynamicBatching(_Strict):
    preferred_batch_size: list[int] = []
    max_queue_delay_microseconds: int = 0
    #: requests waiting at most; past it new requests get "queue full"
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE


class VersionPolicy(_Strict):
    """Which version folders are served: the ``latest`` N, ``all``, or a ``specific`` list."""

    latest: int | None = None
    all: bool = False
    specific: list[int] | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> "VersionPolicy":
        chosen = sum([self.latest is not None, self.all, self.specific is not None])
        if chosen > 1:
            raise ValueError("version_policy takes one of latest, all, specific")
        if chosen == 0:
            self.latest = 1
        return self

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest:] if self.latest else []


class DriftConfig(_Strict):
    """Input drift of this model's logged requests against a reference (``monitoring: {drift: ...}``;
    see ``modelserve.monitor.drift``). Drift sees only what the payload log keeps: off with
    ``payload_log: false``, sampled with ``sample_rate``."""

    enabled: bool = True
    #: a .npy (one input) or .npz (keys = input names) of evaluation inputs, rows first, in the version
    #: or model folder; None = the first ``reference_size`` logged rows are the reference
    reference: str | None = None
    #: reference rows kept (a bigger file is subsampled to this)
    reference_size: int = Field(default=1000, ge=10, le=100_000)
    #: the sliding window of recent rows compared with the reference
    window: int = Field(default=1000, ge=10, le=100_000)
    #: PSI bins, cut at the reference's quantiles
    bins: int = Field(default=10, ge=2, le=100)
    #: alert when the version's score (largest feature PSI) is above this
    threshold: float = Field(default=0.2, gt=0.0)
    #: no score before the window holds this many rows
    min_samples: int = Field(default=100, ge=1)

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.endswith((".npy", ".npz")):
            raise ValueError(f"drift reference must be a .npy or .npz file, got '{value}'")
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"drift reference '{value}' must be a path inside the model folder")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "DriftConfig":
        if self.min_samples > self.window:
            raise ValueError(f"drift min_samples ({self.min_samples}) is more than the window ({self.window})")
        return self


class Monitoring(_Strict):
    """What the payload log keeps of this model's requests (``monitoring:`` in config.yaml).

    Failed requests are always logged while ``payload_log`` is on: they are rare and are what one
    debugs; ``sample_rate`` thins out the successful ones only."""

    payload_log: bool = True
    #: share of successful requests logged, 0..1 (the decision is one random() on the request path)
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    #: tensors with more elements than this are logged as a summary (shape, dtype, mean, std, min, max, sha256)
    max_values: int = Field(default=256, ge=0)
    #: how feedback is scored: classification (argmax / label output), regression, or auto (from the outputs)
    task: str = Field(default="auto", pattern="^(auto|classification|regression)$")
    #: input drift against a reference (see ``DriftConfig``)
    drift: DriftConfig = DriftConfig()


class ModelLimits(_Strict):
    """``limits:`` in config.yaml: how many requests the model (all its versions) answers at once; past it
    new requests get 429 with ``Retry-After`` (``server/limits.py``). None: the server's
    ``--max-inflight-per-model``; 0: no cap."""

    max_inflight: int | None = Field(default=None, ge=0)


class Scaling(_Strict):
    """``scaling:`` in config.yaml (or ``scaling.<field>`` parameters in config.pbtxt): the model's replicas
    when served on Ray Serve (``serve --ray``). Ray's autoscaler keeps between ``min_replicas`` and
    ``max_replicas`` running, aiming at ``target_ongoing_requests`` in flight per replica. The single-process
    server ignores it (a pod's count is the HorizontalPodAutoscaler's, see ``deploy k8s``)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    #: seconds the load must stay above / below target before a replica is added / removed
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    #: requests one replica takes at once (its batcher fills from these); past it Ray holds them at the proxy
    max_ongoing_requests: int = Field(default=64, ge=1)
    #: what Ray reserves for each replica
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Scaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class PipelineStep(_Strict):
    """One step of a ``backend: pipeline`` model (Triton's ensemble step, same meaning and aliases):
    run ``model`` on pipeline tensors, ``inputs`` = {step input: pipeline tensor},
    ``outputs`` = {step output: pipeline tensor}."""

    model: str = Field(alias="model_name")
    #: None (or Triton's -1) = the version the model serves by default
    version: int | None = Field(default=None, alias="model_version")
    inputs: dict[str, str] = Field(default={}, alias="input_map")
    outputs: dict[str, str] = Field(default={}, alias="output_map")

    @field_validator("version")
    @classmethod
    def _latest(cls, value: int | None) -> int | None:
        return None if value is None or value < 0 else value


class ModelConfig(_Strict):
    name: str
    backend: str = "onnxruntime"
    platform: str = ""
    #: 0 = the model takes no implicit batch dimension; None = decide from the model file
    max_batch_size: int | None = Field(default=None, ge=0)
    inputs: list[TensorConfig] = Field(default=[], alias="input")
    outputs: list[TensorConfig] = Field(default=[], alias="output")
    dynamic_batching: DynamicBatching | None = None
    instances: int = 1
    version_policy: VersionPolicy = VersionPolicy()
    default_model_filename: str = ""
    runtime: RuntimeOptions = RuntimeOptions()
    parameters: dict[str, str] = {}
    #: backend python: the PythonModel subclass in model.py ("" = the only one there)
    python_class: str = Field(default="", alias="class")
    #: backend pipeline: the steps, in order
    steps: list[PipelineStep] = []
    #: images in: each request's encoded images decoded, resized and normalized before batching
    preprocess: ImagePreprocess | None = None
    #: answers out: top-k labels, boxes after NMS, or masks (see modelserve.vision.Postprocess)
    postprocess: Postprocess | None = None
    #: payload log and feedback settings (see ``Monitoring``)
    monitoring: Monitoring = Monitoring()
    #: concurrency cap (see ``ModelLimits``)
    limits: ModelLimits = ModelLimits()
    #: replicas and autoscaling on Ray Serve (see ``Scaling``)
    scaling: Scaling = Scaling()

    @property
    def batching(self) -> bool:
        return bool(self.max_batch_size)

    def model_file(self, version_dir: Path) -> Path:
        if self.default_model_filename:
            return version_dir / self.default_model_filename
        return version_dir / DEFAULT_FILE_OF_BACKEND.get(self.backend, "model.onnx")

    def complete(self, inputs: list[TensorSpec], outputs: list[TensorSpec], batch_dynamic: bool) -> "ModelConfig":
        """Fill what the file left out from the model's own signature (shapes include the batch dim)."""
        cfg = self.model_copy(deep=True)
        if cfg.max_batch_size is None:
            cfg.max_batch_size = DEFAULT_MAX_BATCH_SIZE if batch_dynamic else 0
            if batch_dynamic and cfg.dynamic_batching is None:
                cfg.dynamic_batching = DynamicBatching()
        strip = 1 if cfg.max_batch_size else 0
        if cfg.max_batch_size and not batch_dynamic:
            raise ModelLoadError(
                f"model '{cfg.name}': max_batch_size is {cfg.max_batch_size} but the model's first "
                "dimension is fixed; set max_batch_size: 0"
            )
        declared_in = {t.name: t for t in cfg.inputs}
        declared_out = {t.name: t for t in cfg.outputs}
        cfg.inputs = [_merge(declared_in.pop(t.name, None), t, strip, cfg.name, "input") for t in inputs]
        cfg.outputs = [_merge(declared_out.pop(t.name, None), t, strip, cfg.name, "output") for t in outputs]
        for kind, left in (("input", declared_in), ("output", declared_out)):
            if left:
                actual = [t.name for t in (inputs if kind == "input" else outputs)]
                raise ModelLoadError(
                    f"model '{cfg.name}': config names {kind}(s) {sorted(left)} the model does not have "
                    f"(model {kind}s: {actual})"
                )
        if not cfg.platform:
            cfg.platform = PLATFORM_OF_BACKEND.get(cfg.backend, cfg.backend)
        return cfg

    def to_triton(self) -> dict[str, Any]:
        """Triton's ``/config`` JSON: snake_case, enum names, int64 as numbers, defaults printed."""
        policy: dict[str, Any]
        if self.version_policy.all:
            policy = {"all": {}}
        elif self.version_policy.specific is not None:
            policy = {"specific": {"versions": self.version_policy.specific}}
        else:
            policy = {"latest": {"num_versions": self.version_policy.latest}}
        out: dict[str, Any] = {
            "name": self.name,
            "platform": self.platform,
            "backend": self.backend,
            "runtime": "",
            "version_policy": policy,
            "max_batch_size": self.max_batch_size or 0,
            "input": [
                {"name": t.name, "data_type": CONFIG_OF[t.datatype], "format": t.format, "dims": t.dims,
                 "is_shape_tensor": False, "allow_ragged_batch": False, "optional": t.optional,
                 "is_non_linear_format_io": False}
                for t in self.inputs
            ],
            "output": [
                {"name": t.name, "data_type": CONFIG_OF[t.datatype], "dims": t.dims,
                 "label_filename": t.label_filename, "is_shape_tensor": False, "is_non_linear_format_io": False}
                for t in self.outputs
            ],
            "batch_input": [],
            "batch_output": [],
            "instance_group": [{"name": self.name, "kind": "KIND_CPU", "count": self.instances, "gpus": [],
                                "secondary_devices": [], "profile": [], "passive": False, "host_policy": ""}],
            "default_model_filename": self.default_model_filename or DEFAULT_FILE_OF_BACKEND.get(self.backend, "model.onnx"),
            "cc_model_filenames": {},
            "metric_tags": {},
            "parameters": {k: {"string_value": v} for k, v in self.parameters.items()},
            "model_warmup": [],
        }
        if self.steps:
            out["ensemble_scheduling"] = {"step": [
                {"model_name": s.model, "model_version": -1 if s.version is None else s.version,
                 "input_map": s.inputs, "output_map": s.outputs} for s in self.steps]}
        if self.dynamic_batching is not None:
            out["dynamic_batching"] = {
                "preferred_batch_size": self.dynamic_batching.preferred_batch_size,
                "max_queue_delay_microseconds": self.dynamic_batching.max_queue_delay_microseconds,
                "preserve_ordering": False,
                "priority_levels": 0,
                "default_priority_level": 0,
                "priority_queue_policy": {},
            }
        return out


def _merge(declared: TensorConfig | None, actual: TensorSpec, strip: int, model: str, kind: str) -> TensorConfig:
    dims = list(actual.dims[strip:])
    if declared is None:
        return TensorConfig(name=actual.name, datatype=actual.datatype, dims=dims)
    if declared.datatype != actual.datatype:
        raise ModelLoadError(
            f"model '{model}': config says {kind} '{actual.name}' is {declared.datatype}, "
            f"the model file says {actual.datatype}"
        )
    if len(declared.dims) != len(dims) or any(d != a and a != -1 and d != -1 for d, a in zip(declared.dims, dims)):
        raise ModelLoadError(
            f"model '{model}': config dims {declared.dims} of {kind} '{actual.name}' do not match "
            f"the model's {dims}" + (" (dims exclude the batch dimension when max_batch_size > 0)" if strip else "")
        )
    # a fixed size in the model beats -1 in the config
    merged = [a if d == -1 else d for d, a in zip(declared.dims, dims)]
    return declared.model_copy(update={"dims": merged})


def from_triton(data: dict[str, Any], folder_name: str) -> ModelConfig:
    """Triton's config (as parsed JSON of the ModelConfig message) -> ours."""
    name = data.get("name") or folder_name
    if name != folder_name:
        raise ModelLoadError(f"config name '{name}' does not match its folder '{folder_name}'")
    kwargs: dict[str, Any] = {"name": name}
    for key in ("platform", "backend", "default_model_filename"):
        if data.get(key):
            kwargs[key] = data[key]
    if kwargs.get("platform", "").startswith("onnxruntime"):
        kwargs.setdefault("backend", "onnxruntime")
    elif kwargs.get("platform") == "ensemble":  # Triton's ensemble is our pipeline, field for field
        kwargs["backend"] = "pipeline"
        kwargs["steps"] = [{k: v for k, v in step.items() if k in ("model_name", "model_version", "input_map", "output_map")}
                           for step in data.get("ensemble_scheduling", {}).get("step", [])]
    elif "backend" not in kwargs and kwargs.get("platform"):
        raise ModelLoadError(f"model '{name}': platform '{kwargs['platform']}' is not supported yet")
    if "max_batch_size" in data:
        kwargs["max_batch_size"] = int(data["max_batch_size"])
    for key in ("input", "output"):
        kwargs[key] = [
            {"name": t["name"], "data_type": t.get("data_type", "TYPE_INVALID"),
             "dims": [int(d) for d in t.get("dims", [])], "format": t.get("format", "FORMAT_NONE"),
             **({"label_filename": t["label_filename"]} if t.get("label_filename") else {}),
             **({"optional": t["optional"]} if key == "input" and "optional" in t else {})}
            for t in data.get(key, [])
        ]
    if "dynamic_batching" in data:
        db = data["dynamic_batching"]
        queue = db.get("default_queue_policy", {}).get("max_queue_size")
        kwargs["dynamic_batching"] = {
            "preferred_batch_size": [int(x) for x in db.get("preferred_batch_size", [])],
            "max_queue_delay_microseconds": int(db.get("max_queue_delay_microseconds", 0)),
            **({"max_queue_size": int(queue)} if queue else {}),
        }
    groups = data.get("instance_group", [])
    if groups:
        kwargs["instances"] = sum(int(g.get("count", 1)) for g in groups)
    policy = data.get("version_policy", {})
    if "all" in policy:
        kwargs["version_policy"] = {"all": True}
    elif "specific" in policy:
        kwargs["version_policy"] = {"specific": [int(v) for v in policy["specific"].get("versions", [])]}
    elif "latest" in policy:
        kwargs["version_policy"] = {"latest": int(policy["latest"].get("num_versions", 1))}
    params = {k: v.get("string_value", "") for k, v in data.get("parameters", {}).items()}
    kwargs["parameters"] = params
    scaling = {k.removeprefix("scaling."): v for k, v in params.items() if k.startswith("scaling.")}
    if scaling:
        kwargs["scaling"] = scaling
    runtime: dict[str, Any] = {}
    accel = data.get("optimization", {}).get("execution_accelerators", {})
    providers = [a["name"] for a in accel.get("gpu_execution_accelerator", []) + accel.get("cpu_execution_accelerator", [])]
    if providers:
        runtime["execution_providers"] = providers
    for ours, theirs in (("intra_op_threads", "intra_op_thread_count"), ("inter_op_threads", "inter_op_thread_count")):
        if theirs in params:
            runtime[ours] = int(params[theirs])
    if runtime:
        kwargs["runtime"] = runtime
    return _validated(kwargs, name)


def _validated(kwargs: dict[str, Any], name: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate(kwargs)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelLoadError(f"model '{name}': invalid config: {problems}") from None


def read_pbtxt(text: str, folder_name: str) -> ModelConfig:
    from google.protobuf import json_format, text_format

    from modelserve.server.proto import model_config_pb2

    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig(), allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"model '{folder_name}': config.pbtxt does not parse: {exc}") from None
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if re.search(r"^\s*max_batch_size\s*:", text, re.M):
        # proto3 drops an explicit 0; for us 0 (no batching) and absent (decide from the file) differ
        data["max_batch_size"] = message.max_batch_size
    return from_triton(data, folder_name)


def read_yaml(text: str, folder_name: str) -> ModelConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"model '{folder_name}': config.yaml does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model '{folder_name}': config.yaml must be a mapping")
    data.setdefault("name", folder_name)
    if data["name"] != folder_name:
        raise ModelLoadError(f"config name '{data['name']}' does not match its folder '{folder_name}'")
    return _validated(data, folder_name)


def read_model_config(model_dir: Path) -> ModelConfig:
    """The config of the model folder ``model_dir``, or a bare one to be completed from the model."""
    for filename in CONFIG_FILES:
        path = model_dir / filename
        if path.is_file():
            text = path.read_text()
            return read_pbtxt(text, model_dir.name) if filename.endswith(".pbtxt") else read_yaml(text, model_dir.name)
    return ModelConfig(name=model_dir.name)


def parse_override(text: str, folder_name: str) -> ModelConfig:
    """A config given with a load request: Triton JSON (as tritonclient sends) or our YAML."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return read_yaml(text, folder_name)
    if any(k in data for k in ("input", "output", "instance_group", "data_type")):
        return from_triton(data, folder_name)
    data.setdefault("name", folder_name)
    return _validated(data, folder_name)
