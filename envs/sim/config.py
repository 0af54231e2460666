"""Validated configuration of clusters and engines, loaded from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from envs.sim.errors import UserError, load_yaml_mapping, validate_as

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "data" / "clusters"
# vLLM's engine defaults, where a config or profile does not say (one place for the simulator and
# the gateway's cluster files)
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192  # the chunked-prefill token budget per iteration
DEFAULT_BLOCK_SIZE_TOKENS = 16  # vLLM's KV page size on GPUs (the CPU build uses 128)


class EngineConfig(BaseModel):
    """One engine type (and how many of it): a model on a GPU type with a TP degree, served by a
    vLLM-like scheduler with these limits."""

    model_config = ConfigDict(extra="forbid")
    gpu: str = Field(min_length=1)
    model: str = Field(min_length=1)
    tp: Literal[1, 2, 4, 8] = 1
    count: PositiveInt = 1
    weight_bits: Literal[4, 8, 16] = 16
    kv_bits: Literal[4, 8, 16] = 16
    max_num_seqs: PositiveInt = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: PositiveInt = DEFAULT_MAX_NUM_BATCHED_TOKENS
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    block_size_tokens: PositiveInt = DEFAULT_BLOCK_SIZE_TOKENS
    activation_reserve_gb: float = Field(2.0, ge=0.0)  # per GPU, for activations and CUDA graphs
    profile: str | None = None  # a measured performance profile (YAML) that replaces the roofline
    name: str | None = None
    price_per_hour: float | None = Field(None, ge=0.0)  # overrides the catalog's price x tp


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "cluster"
    engines: list[EngineConfig] = Field(min_length=1)

    @field_validator("engines")
    @classmethod
    def _one_model(cls, engines: list[EngineConfig]) -> list[EngineConfig]:
        models = {e.model for e in engines}
        if len(models) > 1:
            raise ValueError(f"all engines must serve the same model, got {sorted(models)}")
        names = [e.name for e in engines if e.name]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be unique, got {names}")
        return engines

    def expanded(self) -> list[EngineConfig]:
        """One entry per engine (count expanded), each with a unique name."""
        out: list[EngineConfig] = []
        for spec in self.engines:
            for _ in range(spec.count):
                # a named single engine keeps its name (the gateway's cluster files name every engine)
                name = spec.name if spec.name and spec.count == 1 else f"{spec.name or spec.gpu}-{len(out)}"
                out.append(spec.model_copy(update={"count": 1, "name": name}))
        return out


def load_cluster(name_or_path: str | Path) -> ClusterConfig:
    """A shipped cluster name (`paper`, `mixed-16`, `llama8b`) or a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = CLUSTER_DIR / f"{name_or_path}.yaml"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml")))
            raise UserError(f"cluster: {name_or_path} is neither a file nor a shipped cluster (shipped: {names})")
        path = shipped
    raw = load_yaml_mapping(path, "cluster", " with an 'engines' list")
    config = validate_as(ClusterConfig, raw, "cluster", path.name)
    base = path.parent
    for engine in config.engines:
        if engine.profile and not Path(engine.profile).is_absolute():
            engine.profile = str((base / engine.profile).resolve())
    return config
