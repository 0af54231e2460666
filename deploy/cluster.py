"""The cluster file: which vLLM engines the gateway routes to, and how to start local ones.

One YAML file describes a serving cluster. Each engine has a URL; engines with a `launch`
section are started by `agentsched engines up` on this machine (vLLM CPU, tiny model), engines
without one are started by the user (GPU clusters) and only listed. The optional `gateway`
section holds the gateway's knobs, so one file is all `agentsched serve` needs.

Validated with pydantic (extra keys are errors, so a typo names its field); relative paths are
resolved against the repository root when they exist there, else against the file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from envs.sim.config import DEFAULT_BLOCK_SIZE_TOKENS, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, EngineConfig
from envs.sim.errors import UserError, load_yaml_mapping

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size_bytes(value: str | int) -> int:
    """'64M' -> 67108864; ints pass through. vLLM's --kv-cache-memory-bytes takes the same suffixes."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"size {value!r} is not like 64M, 4G or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModelShape(_Strict):
    """Shape of a tiny random model built on `engines up` when `model_dir` does not exist yet."""

    hidden: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    seed: int = 0


def parse_cpu_list(value: str) -> set[int]:
    """CPU ids of a Linux cpu list such as '0', '0-3' or '0,2-3' (the format of taskset -c)."""
    cpus: set[int] = set()
    try:
        for part in value.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"cpu_bind {value!r} is not a CPU list; write e.g. '0', '0-1' or '0,2'") from None
    if not cpus:
        raise ValueError(f"cpu_bind {value!r} names no CPU; write e.g. '0'")
    return cpus


class LaunchSpec(_Strict):
    """How `agentsched engines up` starts a local vLLM CPU engine."""

    model_dir: str
    tiny_model: TinyModelShape | None = None  # build the model here if model_dir is missing
    served_model_name: str = "tiny"
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    cpu_bind: str = Field(description="VLLM_CPU_OMP_THREADS_BIND, e.g. '0' or '0-1'")
    # vLLM pins only its worker's OMP threads; the API server and EngineCore processes float over
    # every core and steal time from the other engines' workers, so an engine's speed depends on
    # what its neighbours do. Pinning the whole process group keeps each engine on its own cores.
    pin_processes: bool = True
    kv_cache_memory: str = "64M"
    max_model_len: int = Field(4096, ge=16)
    max_num_seqs: int = Field(DEFAULT_MAX_NUM_SEQS, ge=1)
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    enforce_eager: bool = True
    # vLLM's automatic prefix caching, on as in vLLM V1 (and as the simulator models it by default);
    # set false for measurements that must see every prompt prefilled in full
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout_s: float = Field(240.0, gt=0)

    @field_validator("kv_cache_memory")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size_bytes(value)
        return value

    @field_validator("cpu_bind")
    @classmethod
    def _cpus(cls, value: str) -> str:
        parse_cpu_list(value)
        return value

    @property
    def kv_cache_bytes(self) -> int:
        return parse_size_bytes(self.kv_cache_memory)

    @property
    def cpus(self) -> set[int]:
        return parse_cpu_list(self.cpu_bind)


class EngineSpec(_Strict):
    """One engine as the gateway sees it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    url: str | None = None  # http://host:port ; derived from launch.host/port when omitted
    gpu: str = "cpu"  # GPU type (catalog name) or a label of the engine type, e.g. cpu-fast
    model: str | None = None  # model name sent upstream; default launch.served_model_name or "tiny"
    # the served model's architecture in the catalog (envs/data/models.yaml), with tp and weight
    # precision: with a catalog GPU and no profile, expected latencies and KV capacity come from the
    # simulator's roofline of that engine
    architecture: str | None = None
    tp: Literal[1, 2, 4, 8] = 1
    weight_bits: Literal[4, 8, 16] = 16
    kv_bits: Literal[4, 8, 16] = 16
    price_per_hour: float = Field(0.0, ge=0)
    max_num_seqs: int | None = Field(None, ge=1)  # the engine's batch limit; default from launch
    max_num_batched_tokens: int = Field(DEFAULT_MAX_NUM_BATCHED_TOKENS, ge=1)  # vLLM's chunked-prefill budget
    block_size_tokens: int = Field(DEFAULT_BLOCK_SIZE_TOKENS, ge=1)  # vLLM's KV page size (the CPU build: 128)
    max_inflight: int | None = Field(None, ge=1)  # gateway's in-flight cap; default max_num_seqs
    profile: str | None = None  # performance profile YAML written by `agentsched calibrate`
    latency_s: dict[str, float] | None = None  # explicit solo latency per step (overrides profile)
    # the engine's KV-cache event publisher (vLLM --kv-events-config, e.g. tcp://10.0.0.5:5557): the
    # gateway's prefix index then follows what the engine reports stored and evicted (kv_events.py)
    kv_events_endpoint: str | None = Field(None, pattern=r"^(tcp|ipc)://.+")
    launch: LaunchSpec | None = None

    @model_validator(mode="after")
    def _url_or_launch(self) -> "EngineSpec":
        if self.url is None and self.launch is None:
            raise ValueError(f"engine {self.name!r} needs a url (external engine) or a launch section (local engine)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"engine {self.name!r}: url must start with http:// or https://")
        return self

    @property
    def base_url(self) -> str:
        if self.url is not None:
            return self.url.rstrip("/")
        assert self.launch is not None
        return f"http://{self.launch.host}:{self.launch.port}"

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        return self.launch.served_model_name if self.launch else "tiny"

    @property
    def batch_limit(self) -> int:
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        return self.launch.max_num_seqs if self.launch else DEFAULT_MAX_NUM_SEQS

    @property
    def inflight_cap(self) -> int:
        return self.max_inflight if self.max_inflight is not None else self.batch_limit

    def engine_config(self, profile_path: Path | None = None) -> EngineConfig:
        """This engine as the simulator describes engines: the gateway builds its engine model from
        it with the simulator's own function (`envs.sim.model.build_engine_model`), and
        sim-vs-real simulates the same engines from it."""
        return EngineConfig(gpu=self.gpu, model=self.architecture or self.model_name, tp=self.tp,
                            weight_bits=self.weight_bits, kv_bits=self.kv_bits, max_num_seqs=self.batch_limit,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            block_size_tokens=self.block_size_tokens,
                            profile=str(profile_path) if profile_path else None, name=self.name,
                            price_per_hour=self.price_per_hour)


class GatewaySpec(_Strict):
    """Gateway knobs. Times in seconds."""

    scrape_interval_s: float = Field(0.1, gt=0, le=0.1)  # the brief: every 100 ms or faster
    health_interval_s: float = Field(0.5, gt=0)
    unhealthy_after_failures: int = Field(2, ge=1)  # consecutive failed scrapes before marking down
    max_queue_per_engine: int = Field(512, ge=1)  # past this: 429
    retry_after_s: int = Field(1, ge=1)
    max_attempts: int = Field(4, ge=1)  # per call, across engines
    no_engine_wait_s: float = Field(60.0, ge=0)  # how long a call waits for any engine to be healthy
    upstream_timeout_s: float = Field(600.0, gt=0)
    slo_scale: float = Field(3.0, gt=0)  # default SLO = scale x base SLO when a workflow gives none
    token_scale: float = Field(1.0, gt=0)  # scales the standard stage tokens for expected latencies
    workflow_idle_s: float = Field(600.0, gt=0)  # forget a workflow after this long without calls
    control_interval_s: float = Field(1.0, gt=0)  # policy.on_interval period
    shutdown_grace_s: float = Field(5.0, ge=0)  # on SIGTERM/SIGINT: how long calls in flight upstream may finish
    pass_priority: bool = False  # send each call's rank as vLLM `priority` (needs --scheduling-policy priority)
    # hash each prompt into its block chain and keep a per-engine prefix index (deploy/gateway/prefix_index.py)
    # that cache-aware policies read; off: no call has segments, every predicted hit is 0
    prefix_index: bool = True
    # tokens per prompt segment of the index; default the engines' smallest block size (exact, as vLLM
    # matches). A multiple of it merges that many tokens of consecutive blocks into one segment:
    # fewer steps per lookup on long prompts (16-token GPU blocks), hits floored to that multiple
    prefix_segment_tokens: int | None = Field(None, ge=1)


class ClusterFile(_Strict):
    name: str = "cluster"
    workdir: str = ".work/engines"
    vllm_python: str = ".venv-vllm/bin/python"
    engines: list[EngineSpec] = Field(min_length=1)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    @model_validator(mode="after")
    def _unique(self) -> "ClusterFile":
        names = [e.name for e in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be unique, got {names}")
        urls = [e.base_url for e in self.engines]
        if len(set(urls)) != len(urls):
            raise ValueError(f"engine urls/ports must be unique, got {urls}")
        binds = [e.launch.cpu_bind for e in self.engines if e.launch]
        if len(set(binds)) != len(binds):
            raise ValueError(f"local engines need distinct cpu_bind values, got {binds}")
        return self


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve_path(path: str, base_dir: Path | None) -> Path:
    """Absolute path: as given if absolute; else relative to the cwd if it exists; else the file's dir."""
    # absolute() not resolve(): a venv's bin/python is a symlink that must stay a venv path
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if (Path.cwd() / p).exists() or base_dir is None:
        return (Path.cwd() / p).absolute()
    return (base_dir / p).absolute()


class Cluster:
    """A validated cluster file plus where it came from (to resolve relative paths)."""

    def __init__(self, spec: ClusterFile, source: Path | None = None) -> None:
        self.spec = spec
        self.source = source
        self.base_dir = source.parent if source else None

    @property
    def engines(self) -> list[EngineSpec]:
        return self.spec.engines

    @property
    def gateway(self) -> GatewaySpec:
        return self.spec.gateway

    def path(self, value: str) -> Path:
        return resolve_path(value, self.base_dir)

    @property
    def workdir(self) -> Path:
        return Path(self.spec.workdir).absolute()

    @property
    def vllm_python(self) -> Path:
        return self.path(self.spec.vllm_python)

    def engine_configs(self) -> list[EngineConfig]:
        """Every engine as the simulator describes it (profiles resolved against this file)."""
        return [spec.engine_config(self.path(spec.profile) if spec.profile else None) for spec in self.engines]


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster file; user mistakes raise UserError / ValidationError (exit 2)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"cluster file {p} does not exist (pass --cluster with a YAML file like deploy/clusters/local-cpu.yaml)")
    raw = load_yaml_mapping(p, "cluster file", " with an 'engines' list")
    return Cluster(ClusterFile.model_validate(raw), source=p.resolve())
