"""Pydantic records shared by every layer and stored as JSON in the metadata store.

Each stored record carries `schema_version`; `decode()` turns bytes from the store into a record
or raises `RecordError` naming the key, so a watcher can report and skip a corrupt value.
"""

from __future__ import annotations

import enum
import re
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecordError

SCHEMA_VERSION = 1
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


def now() -> float:
    return time.time()


class Record(BaseModel):
    """Base of stored records: JSON round trip with a schema version."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    schema_version: int = SCHEMA_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


R = TypeVar("R", bound=Record)


def decode(cls: type[R], key: str, value: bytes) -> R:
    try:
        record = cls.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        raise RecordError(key, f"{where}: {first['msg']}") from None
    if record.schema_version > SCHEMA_VERSION:
        raise RecordError(key, f"schema_version {record.schema_version} is newer than this client")
    return record


# ---- durations ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """Seconds from "30s", "15m", "1h", "1.5h", "2d", "250ms" or a number (seconds)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"not a duration: {value!r} (write e.g. 30s, 15m, 1h)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(value.lower())
        if m is None:
            raise ValueError(f"not a duration: {value!r} (write e.g. 30s, 15m, 1h)")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The short form people write: 900 -> "15m", 3600 -> "1h", 90 -> "90s", 2.5 -> "2.5s"."""
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# ---- deployments -------------------------------------------------------------------------------

Strategy = Literal["spread", "binpack", "idle_first"]
EngineName = Literal["vllm", "llama.cpp", "auto"]


def engine_for(model: str, engine: str = "auto") -> Literal["vllm", "llama.cpp"]:
    """The engine for `model`: `engine` unless it is auto; auto picks llama.cpp for a GGUF (a
    `.gguf` file or a local `<alias>-gguf`), vLLM otherwise. From the name alone, so the
    controller and every client decide alike without seeing the worker's files."""
    if engine == "vllm":
        return "vllm"
    if engine == "llama.cpp":
        return "llama.cpp"
    return "llama.cpp" if model.lower().endswith((".gguf", "-gguf")) else "vllm"


class Placement(BaseModel):
    """Where a deployment's engines may go."""

    model_config = ConfigDict(extra="forbid")
    strategy: Strategy | None = Field(
        default=None, description="None: the controller's [scheduler] strategy (spread by default)"
    )
    nodes: list[str] = Field(default_factory=list, description="only these nodes (empty: any)")
    gpus: list[int] = Field(default_factory=list, description="only these GPU indices")


class RolloutPolicy(BaseModel):
    """How a changed spec replaces running engines (see control/rollout.py)."""

    model_config = ConfigDict(extra="forbid")
    max_surge: int = Field(default=1, ge=0, le=64, description="extra engines during a rollout")
    max_unavailable: int = Field(
        default=0, ge=0, le=64, description="replicas that may be down during a rollout"
    )

    @model_validator(mode="after")
    def _can_progress(self) -> RolloutPolicy:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0")
        return self


class ModelFacts(BaseModel):
    """What placement needs to know about a model's size, read from its config.json (and the
    safetensors index) by `hub/fit.py` before the deployment is written."""

    params: int = Field(ge=0, description="parameter count")
    dtype: str = "bfloat16"
    """The checkpoint's dtype (config.json `torch_dtype`/`dtype`)."""
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 0
    source: str = "config.json"
    """Where the numbers come from ("config.json", or "name" when only the id hinted a size)."""


class DeploymentSpec(Record):
    """Desired state of one deployment: `deployments/{name}`."""

    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(min_length=1, description="hub id, local folder or a local model alias")
    revision: str = Field(
        default="main", min_length=1, description="hub branch, tag or commit (hub ids only)"
    )
    served_model_name: str = ""
    engine: EngineName = Field(
        default="auto", description="vllm | llama.cpp | auto (llama.cpp for a GGUF, else vLLM)"
    )
    replicas: int = Field(default=1, ge=0, le=64)
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=16)
    dtype: str = "auto"
    enforce_eager: bool | None = Field(
        default=None, description="None: the device's default (eager on CPU; see defaults.py)"
    )
    task: Literal["auto", "generate", "embed"] = Field(
        default="auto",
        description="generate (chat, completions) or embed (/v1/embeddings); auto: the model's",
    )
    tool_call_parser: str = Field(
        default="auto",
        description="vLLM tool parser for tool_choice auto (hermes, llama3_json, ...); auto: "
        "the model family's where vLLM knows one; none: no parser",
    )
    engine_args: list[str] = Field(default_factory=list, description="extra vLLM CLI args")
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[str] = Field(
        default_factory=list,
        description="names of secret env vars (HF_TOKEN) the worker fills in from its own "
        "environment or secrets file; their values are never in the store",
    )
    placement: Placement = Field(default_factory=Placement)
    max_restarts: int = Field(default=5, ge=0)
    idle_timeout: float | None = Field(
        default=None,
        description="scale to zero after this long without requests (seconds, or 30s/15m/1h; "
        "None: never); the next request starts an engine again",
    )
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    restart_generation: int = Field(
        default=0, ge=0, description="bumped by a rolling restart: every engine is replaced"
    )
    previous: dict[str, Any] | None = Field(
        default=None, description="the engine settings before the last change (for rollback)"
    )
    facts: ModelFacts | None = Field(
        default=None, description="model size facts found before writing (None: unknown)"
    )
    created_at: float = Field(default_factory=now)
    created_by: str = Field(default="", description='key name, "notebook" or "anonymous"')
    updated_by: str = Field(default="", description="who last changed it (as created_by)")

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _check_idle_timeout(cls, v: Any) -> float | None:
        if v is None or v in ("", "0", "off", "none", 0):
            return None
        return parse_duration(v)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @property
    def model_name(self) -> str:
        """The name clients use in the OpenAI `model` field."""
        return self.served_model_name or self.name

    @property
    def wants_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def backend(self) -> Literal["vllm", "llama.cpp"]:
        """The engine that serves this deployment (`engine: auto` resolved from the model)."""
        return engine_for(self.model, self.engine)

    @model_validator(mode="after")
    def _check_engine(self) -> DeploymentSpec:
        if self.backend == "llama.cpp" and self.tensor_parallel_size != 1:
            raise ValueError("llama.cpp serves a model on one device: tensor_parallel_size 1")
        return self


class Activity(Record):
    """When a deployment last had requests, and whether it is scaled to zero: `activity/{name}`.

    Gateways (and the kernel's own chat) write `last_request_at` at a coarse interval and wake an
    idle deployment (`idle` False) when a request comes; the controller sets `idle` once a
    deployment with an `idle_timeout` had no request for that long, then stops its engines. See
    store/activity.py for the writes and control/reconcile.py for the decision."""

    deployment: str
    last_request_at: float = 0.0
    idle: bool = False
    idle_since: float = 0.0
    """When the controller scaled it to zero (requests older than this do not wake it)."""

    def idles(self, spec: DeploymentSpec) -> bool:
        """Whether `spec` is scaled to zero by this record (a flag set before the deployment
        was created belongs to an earlier deployment of that name)."""
        return self.idle and self.idle_since >= spec.created_at


# ---- engines -----------------------------------------------------------------------------------


class EngineState(str, enum.Enum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    DOWNLOADING = "Downloading"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FAILED = "Failed"
    LOST = "Lost"

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) resources on a node."""
        return self in (
            EngineState.SCHEDULED,
            EngineState.DOWNLOADING,
            EngineState.STARTING,
            EngineState.RUNNING,
            EngineState.STOPPING,
        )


class Transition(BaseModel):
    state: EngineState
    reason: str = ""
    at: float = Field(default_factory=now)


class DownloadProgress(BaseModel):
    """A hub download in progress (engine state Downloading), refreshed about once a second."""

    repo: str
    revision: str = "main"
    done: int = 0  # bytes fetched so far
    total: int = 0  # bytes to fetch (0: not known yet)
    rate: float = 0.0  # bytes/s over the last few seconds
    files: int = 0  # files to fetch
    waiting: bool = False  # another engine of the node is downloading the same repository

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


class EngineSettings(BaseModel):
    """What an engine runs with, after the device defaults (shown in API responses and status)."""

    device: Literal["cpu", "cuda"]
    dtype: str
    """"auto" until a node resolves it (the model's dtype on GPU; the CPU's best on CPU)."""
    enforce_eager: bool
    mode: Literal["eager", "compiled"]
    max_model_len: int | None
    """None: the model's own maximum context."""


class Engine(Record):
    """One replica of a deployment: `engines/{id}`."""

    id: str
    deployment: str
    replica: int = 0
    state: EngineState = EngineState.PENDING
    reason: str = ""
    node: str = ""
    device: str = "cpu"  # cpu | cuda
    gpus: list[int] = Field(default_factory=list)
    gpu_fraction: float = 0.0  # memory fraction promised on each of `gpus`
    endpoint: str = ""  # host:port of the gRPC shim
    auth_token: str = ""
    spec_hash: str = ""  # the engine settings it runs (control/rollout.py); "" = unknown
    pid: int = 0
    pid_start_time: float = 0.0
    restarts: int = 0
    error: str = ""
    permanent: bool = False
    """Failed for a reason no restart can fix (not found, gated, bad args, the launch policy
    refused the spec): never restarted."""
    unplaced: bool = False
    """Pending because the scheduler found no node that fits (`reason` says why): it waits for
    capacity or a spec change, not for a start, so requests are not held for it."""
    download: DownloadProgress | None = None
    settings: EngineSettings | None = None
    """The effective engine settings, written by the node that launches it."""
    next_restart_at: float = 0.0
    started_at: float = 0.0
    updated_at: float = Field(default_factory=now)
    history: list[Transition] = Field(default_factory=list)

    def transition(self, state: EngineState, reason: str = "") -> Engine:
        """A copy in `state`, with the reason recorded and the history bounded."""
        t = Transition(state=state, reason=reason)
        history = [*self.history, t][-MAX_HISTORY:]
        return self.model_copy(
            update={"state": state, "reason": reason, "updated_at": t.at, "history": history}
        )


MAX_HISTORY = 20


# ---- nodes and GPUs ----------------------------------------------------------------------------


class GpuProcess(BaseModel):
    """A process NVML lists on a GPU, matched by the worker to the engine whose process tree holds
    it (`engine` and `deployment` empty: not an engine of this node, an unknown process)."""

    pid: int
    used_memory: int | None = None  # bytes
    engine: str = ""
    deployment: str = ""


class GpuInfo(BaseModel):
    """A device as the NVML probe sees it; fields NVML cannot read are None."""

    index: int
    uuid: str = ""
    name: str = ""
    memory_total: int = 0  # bytes
    memory_used: int | None = None
    memory_free: int | None = None
    utilization: float | None = None  # percent
    temperature: float | None = None  # Celsius
    power_draw: float | None = None  # watts
    power_limit: float | None = None
    processes: list[GpuProcess] = Field(default_factory=list)


class Node(Record):
    """A worker's registration: `nodes/{id}`, bound to the worker's lease."""

    id: str = Field(pattern=NAME_PATTERN)
    host: str = ""
    advertise_host: str = "127.0.0.1"
    cpu_count: int = 0
    memory_total: int = 0
    gpus: list[GpuInfo] = Field(default_factory=list)
    gpu_error: str = ""  # why there are no GPUs ("no NVIDIA driver"), if none
    cpu_dtype: str = ""  # what dtype "auto" means for CPU engines here (engine/cpu_dtype.py)
    labels: dict[str, str] = Field(default_factory=dict)
    started_at: float = Field(default_factory=now)
    version: str = ""


class WarmPoolStatus(BaseModel):
    """A worker's warm engine processes (control/warmpool.py), sampled with its GPUs."""

    size: int = 0  # how many the worker keeps (0: no pool)
    warm: int = 0  # imports done, waiting for a model
    starting: int = 0  # still importing
    memory_bytes: int = 0  # resident memory of the members and their forkservers
    pids: list[int] = Field(default_factory=list)


class GpuSamples(Record):
    """Live samples of a node's GPUs: `nodes/{id}/gpus`, refreshed every few seconds."""

    node: str
    at: float = Field(default_factory=now)
    gpus: list[GpuInfo] = Field(default_factory=list)
    error: str = ""
    warm_pool: WarmPoolStatus | None = None  # None: the worker keeps no pool


# ---- operator metrics (`metrics/{process}`, see gateway/cluster_metrics.py) ---------------------


class HistogramData(BaseModel):
    """Counts per bucket: `counts[i]` in (`bounds[i-1]`, `bounds[i]`], the last above them all."""

    bounds: list[float]
    counts: list[int]
    sum: float = 0.0


class ControllerMetrics(BaseModel):
    identity: str
    leader: bool = False
    rounds: int = 0
    reconcile_seconds: HistogramData
    actions: dict[str, int] = Field(default_factory=dict)  # applied, by verb (create, schedule...)
    conflicts: int = 0
    placements: int = 0  # engines scheduled onto a node (first placement, restart, re-placement)
    restarts: int = 0  # of those, Failed engines started again


class WorkerMetrics(BaseModel):
    node: str
    lease_renewals: int = 0
    lease_renewal_failures: int = 0
    lease_losses: int = 0
    launches: dict[str, int] = Field(default_factory=dict)  # by outcome: started | failed
    engines: int = 0  # engine processes held now


class StoreMetrics(BaseModel):
    url: str
    retries: int = 0  # calls retried after a temporary failure
    failures: int = 0  # calls that raised (after retries)


class ProcessMetrics(Record):
    """One process's own figures: `metrics/{process}`, bound to a lease (gone when it dies), so
    the gateway's /metrics shows controllers and workers that run elsewhere."""

    process: str
    host: str = ""
    pid: int = 0
    at: float = Field(default_factory=now)
    controller: ControllerMetrics | None = None
    worker: WorkerMetrics | None = None
    store: StoreMetrics
