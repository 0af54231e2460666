"""GPU and model catalogs: hardware and architecture facts live in data files, not in code."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr, field_validator

from envs.sim.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class Efficiency(BaseModel):
    """Roofline calibration factors of one GPU type and weight class (fitted, see envs.sim.calibration)."""

    model_config = ConfigDict(extra="forbid")
    compute: PositiveFloat = 1.0  # achieved / peak FLOP/s in compute-bound phases
    memory: PositiveFloat = 0.8  # achieved / peak bytes/s in memory-bound phases
    overhead_s: float = Field(0.004, ge=0.0)  # fixed per-iteration cost (scheduler, sampling, launch)


# Weight classes the roofline keeps factors for, named by the weight precision they were measured at:
# `w4` for weight-only quantized kernels (AWQ/GPTQ/FP8-Marlin: 4- or 8-bit weights dequantized inside the GEMM,
# activations in 16 bit), `w16` for full 16-bit GEMMs (BF16/FP16 weights and activations).
WeightClass = Literal["w4", "w16"]
WEIGHT_CLASSES: tuple[WeightClass, ...] = ("w4", "w16")
EFFICIENCY_FIELDS = frozenset(Efficiency.model_fields)
EFFICIENCY_CAP = 1.0  # no GPU computes or reads faster than its catalog peak


def weight_class_of(weight_bits: int) -> WeightClass:
    """The factor set that serves `weight_bits`-bit weights: `w16` for 16-bit, `w4` for 4 and 8 bits.

    8 bits takes the 4-bit factors. On Ampere (A100, A800, A6000, A40, A10G) vLLM runs FP8
    checkpoints as weight-only W8A16 FP8-Marlin and 8-bit GPTQ as GPTQ-Marlin, the same
    dequantize-inside-the-GEMM kernels as 4-bit AWQ/GPTQ-Marlin (vLLM docs,
    features/quantization/fp8.md). On Ada/Hopper FP8 runs as W8A8 on FP8 tensor cores, whose peak
    is twice the BF16 peak the factors are relative to, so the w16 factors would halve its compute;
    no 8-bit measurement is in the repository to fit a class of its own."""
    return "w16" if weight_bits >= 16 else "w4"


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    aliases: list[str] = []
    peak_tflops: PositiveFloat
    hbm_bandwidth_gbps: PositiveFloat
    memory_gb: PositiveFloat
    price_per_hour: float = Field(ge=0.0)
    link_bandwidth_gbps: PositiveFloat = 32.0
    # roofline factors per weight class; a plain {compute, memory, overhead_s} block (the catalog's
    # earlier format) applies to every class. load_catalog fills the classes a GPU has no
    # measurements for (see fill_missing_efficiency)
    efficiency: dict[WeightClass, Efficiency] = {}
    _efficiency_source: dict[WeightClass, str] = PrivateAttr(default_factory=dict)

    @field_validator("efficiency", mode="before")
    @classmethod
    def _plain_block_is_every_class(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, Efficiency):
            return {weight_class: value for weight_class in WEIGHT_CLASSES}
        if isinstance(value, dict) and value and set(value) <= EFFICIENCY_FIELDS:
            return {weight_class: value for weight_class in WEIGHT_CLASSES}
        return value

    def efficiency_for(self, weight_bits: int) -> Efficiency:
        weight_class = weight_class_of(weight_bits)
        if weight_class not in self.efficiency:
            raise UserError(f"gpu: {self.name} has no roofline efficiency for {weight_class} weights "
                            f"(add efficiency.{weight_class} to the GPU catalog)")
        return self.efficiency[weight_class]

    def efficiency_source(self, weight_class: WeightClass) -> str:
        """Where the factors of `weight_class` come from: `measured` (the catalog file), `scaled`
        (another class's factors of this GPU times the mean ratio between the classes), `mean` (the
        mean of the GPUs measured in this class) or `default`."""
        return self._efficiency_source.get(weight_class, "measured" if weight_class in self.efficiency else "none")


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


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def fill_missing_efficiency(gpus: dict[str, GPUSpec]) -> None:
    """Give every GPU factors for every weight class, from the measured ones.

    A GPU measured in another class: that class's compute and memory factors times the geometric
    mean ratio (this class / that class) over the GPUs measured in both, capped at 1.0 of peak; the
    ratio carries how the kernel family differs, the GPU's own factors how it differs from other
    GPUs. Its overhead (per-iteration CPU time, not a kernel property) is the mean of the GPUs
    measured in this class. A GPU measured in no class, or a class no GPU shares with another:
    the arithmetic mean of the GPUs measured in this class. No GPU measured in a class: defaults."""
    measured = {c: {n: g.efficiency[c] for n, g in gpus.items() if c in g.efficiency} for c in WEIGHT_CLASSES}
    filled: dict[str, dict[WeightClass, tuple[Efficiency, str]]] = {n: {} for n in gpus}
    for weight_class in WEIGHT_CLASSES:
        known = list(measured[weight_class].values())
        # sum / len, not statistics.fmean: the same rounding as the catalog's earlier mean, so that
        # engines on unmeasured GPUs simulate bit for bit as before
        mean = Efficiency(compute=sum(e.compute for e in known) / len(known),
                          memory=sum(e.memory for e in known) / len(known),
                          overhead_s=sum(e.overhead_s for e in known) / len(known)) if known else None
        for name, gpu in gpus.items():
            if weight_class in gpu.efficiency:
                continue
            for other in WEIGHT_CLASSES:
                both = [n for n in measured[weight_class] if n in measured[other]] if other != weight_class else []
                if other in gpu.efficiency and both and mean is not None:
                    ratio_compute = _geometric_mean([measured[weight_class][n].compute / measured[other][n].compute
                                                     for n in both])
                    ratio_memory = _geometric_mean([measured[weight_class][n].memory / measured[other][n].memory
                                                    for n in both])
                    base = gpu.efficiency[other]
                    filled[name][weight_class] = (Efficiency(
                        compute=min(EFFICIENCY_CAP, base.compute * ratio_compute),
                        memory=min(EFFICIENCY_CAP, base.memory * ratio_memory),
                        overhead_s=mean.overhead_s), "scaled")
                    break
            else:
                filled[name][weight_class] = (mean, "mean") if mean is not None else (Efficiency(), "default")
    for name, classes in filled.items():
        for weight_class, (eff, source) in classes.items():
            gpus[name].efficiency[weight_class] = eff
            gpus[name]._efficiency_source[weight_class] = source


@lru_cache(maxsize=4)
def load_catalog(gpus_path: str | None = None, models_path: str | None = None) -> Catalog:
    gpus_raw = _load_yaml(Path(gpus_path) if gpus_path else DATA_DIR / "gpus.yaml")["gpus"]
    models_raw = _load_yaml(Path(models_path) if models_path else DATA_DIR / "models.yaml")["models"]
    gpus = {name: GPUSpec(name=name, **spec) for name, spec in gpus_raw.items()}
    fill_missing_efficiency(gpus)
    models = {name: ModelSpec(name=name, **spec) for name, spec in models_raw.items()}
    return Catalog(gpus=gpus, models=models)
