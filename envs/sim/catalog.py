"""GPU and model catalogs: hardware and architecture facts live in data files, not in code."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from envs.sim.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class Efficiency(BaseModel):
    """Roofline calibration factors of one GPU type (fitted, see envs.sim.calibration)."""

    model_config = ConfigDict(extra="forbid")
    compute: PositiveFloat = 1.0  # achieved / peak FLOP/s in compute-bound phases
    memory: PositiveFloat = 0.8  # achieved / peak bytes/s in memory-bound phases
    overhead_s: float = Field(0.004, ge=0.0)  # fixed per-iteration cost (scheduler, sampling, launch)


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    aliases: list[str] = []
    peak_tflops: PositiveFloat
    hbm_bandwidth_gbps: PositiveFloat
    memory_gb: PositiveFloat
    price_per_hour: float = Field(ge=0.0)
    link_bandwidth_gbps: PositiveFloat = 32.0
    efficiency: Efficiency | None = None


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    layers: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    attention_heads: PositiveInt
    kv_heads: PositiveInt
    vocab_size: PositiveInt
    parameters: PositiveFloat

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    def kv_bytes_per_token(self, kv_bits: int) -> float:
        """K and V of every layer for one token."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * kv_bits / 8.0


class Catalog(BaseModel):
    gpus: dict[str, GPUSpec]
    models: dict[str, ModelSpec]

    def gpu(self, name: str) -> GPUSpec:
        for key, spec in self.gpus.items():
            if name == key or name in spec.aliases:
                return spec
        raise UserError(f"gpu: unknown GPU type {name!r} (known: {', '.join(self.gpus)})")

    def model(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise UserError(f"model: unknown model {name!r} (known: {', '.join(self.models)})")
        return self.models[name]

    def canonical_gpu(self, name: str) -> str:
        return self.gpu(name).name


def _load_yaml(path: Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


@lru_cache(maxsize=4)
def load_catalog(gpus_path: str | None = None, models_path: str | None = None) -> Catalog:
    gpus_raw = _load_yaml(Path(gpus_path) if gpus_path else DATA_DIR / "gpus.yaml")["gpus"]
    models_raw = _load_yaml(Path(models_path) if models_path else DATA_DIR / "models.yaml")["models"]
    gpus = {name: GPUSpec(name=name, **spec) for name, spec in gpus_raw.items()}
    fitted = [g.efficiency for g in gpus.values() if g.efficiency is not None]
    if fitted:  # GPU types without reference measurements take the mean of the fitted ones
        mean = Efficiency(
            compute=sum(e.compute for e in fitted) / len(fitted),
            memory=sum(e.memory for e in fitted) / len(fitted),
            overhead_s=sum(e.overhead_s for e in fitted) / len(fitted),
        )
        for g in gpus.values():
            if g.efficiency is None:
                g.efficiency = mean
    else:
        for g in gpus.values():
            g.efficiency = Efficiency()
    models = {name: ModelSpec(name=name, **spec) for name, spec in models_raw.items()}
    return Catalog(gpus=gpus, models=models)
