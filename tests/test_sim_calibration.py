"""The roofline engine model reproduces every published single-call latency within +-20%, with
physically possible factors, when the reference calls' static template prefixes are served from
the prefix cache (see envs.sim.calibration); the factors are kept per weight class, and the
engine model picks the class of its weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from envs.sim import calibration
from envs.sim.catalog import DATA_DIR, WEIGHT_CLASSES, Efficiency, GPUSpec, load_catalog, weight_class_of
from envs.sim.config import EngineConfig
from envs.sim.engine import Engine
from envs.sim.errors import UserError
from envs.sim.model import StepTokens
from envs.sim.perf import RooflineModel, solo_call_latency_s

REFERENCE = json.loads((DATA_DIR / "reference" / "hexgen_stage_latency.json").read_text())
CACHED = calibration.reference_cached_tokens(REFERENCE, calibration.DEFAULT_PREFIX)
CHECKED_GPUS = ("A100", "H100", "A6000", "L40")
CELLS = [(gpu, step) for gpu in CHECKED_GPUS for step in REFERENCE["latency_s"][gpu]]


@pytest.mark.parametrize("gpu,step", CELLS, ids=[f"{g}-{s}" for g, s in CELLS])
def test_single_call_latency_within_20_percent(gpu: str, step: str) -> None:
    config = EngineConfig(gpu=gpu, model="Llama-3.1-70B", tp=1, weight_bits=4, name="ref")
    engine = Engine.from_config(0, config)
    tokens = REFERENCE["stage_mean_tokens"][step]
    predicted = solo_call_latency_s(engine.perf, tokens["input_tokens"], tokens["output_tokens"],
                                    engine.max_num_batched_tokens, cached_tokens=CACHED[step])
    measured = REFERENCE["latency_s"][gpu][step]
    assert predicted == pytest.approx(measured, rel=0.20), f"{gpu} {step}: {predicted:.3f}s vs {measured:.3f}s"


def test_shipped_factors_are_physically_possible() -> None:
    """No GPU computes faster than its peak dense FLOP/s or reads faster than its HBM bandwidth, in
    any weight class, measured or filled."""
    for gpu in load_catalog().gpus.values():
        assert set(gpu.efficiency) == set(WEIGHT_CLASSES), gpu.name
        for weight_class, eff in gpu.efficiency.items():
            assert 0.0 < eff.compute <= 1.0, (gpu.name, weight_class)
            assert 0.0 < eff.memory <= 1.0, (gpu.name, weight_class)
            assert 0.0 <= eff.overhead_s <= calibration.UPPER[2], (gpu.name, weight_class)


def test_shipped_w4_factors_are_the_reference_fit() -> None:
    """`python -m envs.sim.calibration --write` is what produced the shipped w4 factors."""
    catalog = load_catalog()
    assert weight_class_of(calibration.REFERENCE_WEIGHT_BITS) == "w4"
    for gpu_name, eff in calibration.fit_all(calibration.DEFAULT_PREFIX, REFERENCE).items():
        spec = catalog.gpu(gpu_name)
        assert spec.efficiency_source("w4") == "measured", gpu_name
        assert spec.efficiency["w4"].model_dump() == pytest.approx(eff.model_dump(), rel=1e-3), gpu_name


def _gpu(**efficiency) -> GPUSpec:
    return GPUSpec(name="X", peak_tflops=100.0, hbm_bandwidth_gbps=1000.0, memory_gb=80, price_per_hour=1.0,
                   efficiency=efficiency)


def test_roofline_picks_the_factors_of_its_weight_bits() -> None:
    w4 = Efficiency(compute=0.9, memory=0.95, overhead_s=0.001)
    w16 = Efficiency(compute=0.4, memory=0.7, overhead_s=0.002)
    gpu = _gpu(w4=w4, w16=w16)
    model = load_catalog().model("Llama-3.1-8B")
    for bits, expected in ((4, w4), (8, w4), (16, w16)):
        roofline = RooflineModel(gpu, model, 1, bits, 16)
        assert roofline.efficiency == expected, bits
        assert roofline.s_per_token == pytest.approx(2.0 * model.parameters / (100e12 * expected.compute))
        assert roofline.weight_s == pytest.approx(model.parameters * bits / 8 / (1000e9 * expected.memory))
        assert roofline.overhead_s == expected.overhead_s
    override = Efficiency(compute=0.5, memory=0.5, overhead_s=0.0)
    assert RooflineModel(gpu, model, 1, 16, 16, efficiency=override).efficiency == override


def test_engines_use_their_weight_class_from_the_catalog() -> None:
    catalog = load_catalog()
    for gpu, bits, weight_class in (("H100", 16, "w16"), ("H100", 4, "w4"), ("H100", 8, "w4"),
                                    ("A100-80G", 8, "w4"), ("L40S", 16, "w16"), ("A6000", 16, "w16")):
        engine = Engine.from_config(0, EngineConfig(gpu=gpu, model="Llama-3.1-8B", tp=1, weight_bits=bits, name="e"))
        assert engine.perf.efficiency == catalog.gpu(gpu).efficiency[weight_class], (gpu, bits)


def test_plain_efficiency_block_applies_to_every_class() -> None:
    plain = {"compute": 0.7, "memory": 0.6, "overhead_s": 0.003}
    gpu = _gpu(**plain)
    assert set(gpu.efficiency) == set(WEIGHT_CLASSES)
    assert all(e == Efficiency(**plain) for e in gpu.efficiency.values())
    assert gpu.efficiency_for(16) == gpu.efficiency_for(4)
    with pytest.raises(UserError, match="efficiency.w16"):
        _gpu(w4=plain).efficiency_for(16)


def test_missing_classes_are_scaled_by_the_class_ratio_or_averaged(tmp_path: Path) -> None:
    """B (w4 only) takes its w4 factors times the geometric-mean w16/w4 ratio of A and D (capped at
    1.0), with the w16 overhead mean; C (nothing measured) takes each class's mean."""
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text(
        "gpus:\n"
        "  A: {peak_tflops: 100, hbm_bandwidth_gbps: 1000, memory_gb: 80, price_per_hour: 1,\n"
        "      efficiency: {w4: {compute: 0.8, memory: 0.5, overhead_s: 0.001}, w16: {compute: 0.4, memory: 0.6, overhead_s: 0.003}}}\n"
        "  D: {peak_tflops: 100, hbm_bandwidth_gbps: 1000, memory_gb: 80, price_per_hour: 1,\n"
        "      efficiency: {w4: {compute: 1.0, memory: 0.5, overhead_s: 0.001}, w16: {compute: 0.2, memory: 1.0, overhead_s: 0.001}}}\n"
        "  B: {peak_tflops: 100, hbm_bandwidth_gbps: 1000, memory_gb: 80, price_per_hour: 1,\n"
        "      efficiency: {w4: {compute: 0.9, memory: 0.9, overhead_s: 0.002}}}\n"
        "  C: {peak_tflops: 100, hbm_bandwidth_gbps: 1000, memory_gb: 80, price_per_hour: 1}\n")
    catalog = load_catalog(str(gpus), str(DATA_DIR / "models.yaml"))
    b, c = catalog.gpu("B"), catalog.gpu("C")
    ratio_compute = math.sqrt((0.4 / 0.8) * (0.2 / 1.0))
    ratio_memory = math.sqrt((0.6 / 0.5) * (1.0 / 0.5))  # > 1: 0.9 x ratio is capped at the peak
    assert b.efficiency_source("w4") == "measured" and b.efficiency_source("w16") == "scaled"
    assert b.efficiency["w16"].compute == pytest.approx(0.9 * ratio_compute)
    assert b.efficiency["w16"].memory == 1.0 and 0.9 * ratio_memory > 1.0
    assert b.efficiency["w16"].overhead_s == pytest.approx(0.002)
    assert c.efficiency_source("w4") == c.efficiency_source("w16") == "mean"
    assert c.efficiency["w4"].compute == (0.8 + 1.0 + 0.9) / 3  # exactly the earlier mean (bit-identical runs)
    assert c.efficiency["w16"].memory == pytest.approx((0.6 + 1.0) / 2)


def test_write_factors_replaces_one_class_only(tmp_path: Path) -> None:
    path = tmp_path / "gpus.yaml"  # load_catalog caches by path: a fresh one for the written file
    shutil.copy(DATA_DIR / "gpus.yaml", path)
    before = load_catalog().gpu("H100").efficiency["w16"]
    new = Efficiency(compute=0.5, memory=0.5, overhead_s=0.002)
    calibration.write_factors({"H100": new}, "w4", path)
    assert path.read_text().startswith("# GPU catalog.")  # the header comment stays
    after = load_catalog(str(path), str(DATA_DIR / "models.yaml")).gpu("H100")
    assert after.efficiency["w4"] == new and after.efficiency["w16"] == before
    plain = tmp_path / "plain.yaml"  # the earlier one-block format: the block stays as the other class
    plain.write_text("gpus:\n  X: {peak_tflops: 100, hbm_bandwidth_gbps: 1000, memory_gb: 80, price_per_hour: 1,\n"
                     "      efficiency: {compute: 0.7, memory: 0.6, overhead_s: 0.003}}\n")
    calibration.write_factors({"X": new}, "w16", plain)
    written = load_catalog(str(plain), str(DATA_DIR / "models.yaml")).gpu("X")
    assert written.efficiency["w16"] == new
    assert written.efficiency["w4"] == Efficiency(compute=0.7, memory=0.6, overhead_s=0.003)
    assert written.efficiency_source("w4") == "measured"


def test_warm_prefixes_explain_the_reference_better_than_cold() -> None:
    """The bounded fit with each step's static template cached leaves a smaller worst cell than the
    best bounded fit with nothing cached, on every checked GPU."""
    for gpu in CHECKED_GPUS:
        worst = {}
        for prefix in calibration.PREFIX_MODES:
            cached = calibration.reference_cached_tokens(REFERENCE, prefix)
            eff = calibration.fit_gpu(gpu, REFERENCE, cached)
            worst[prefix] = max(abs(math.log1p(e)) for e in calibration.cell_errors(gpu, eff, REFERENCE, cached).values())
        assert worst["warm"] < worst["cold"], (gpu, worst)


def test_cached_tokens_of_the_reference_steps() -> None:
    templates = calibration.load_templates()
    warm = calibration.reference_cached_tokens(REFERENCE, "warm", templates)
    assert warm["generate_candidate"] == templates["static_prefix_tokens_estimate"]["generate_candidate_one"]
    assert warm["Information Retriever"] == 0  # no static prefix estimate: uncached
    assert all(warm[s] < REFERENCE["stage_mean_tokens"][s]["input_tokens"] for s in warm)
    assert set(calibration.reference_cached_tokens(REFERENCE, "cold").values()) == {0}
    with pytest.raises(ValueError):
        calibration.reference_cached_tokens(REFERENCE, "hot")


def test_engine_expected_latency_uses_the_same_model() -> None:
    """The T_e(s) table policies see is the solo latency at the step's mean tokens."""
    config = EngineConfig(gpu="A100", model="Llama-3.1-70B", weight_bits=4, name="a")
    means = {"revise": (5963.0, 79.0)}
    engine = Engine.from_config(0, config, StepTokens(means))
    assert engine.expected_latency_s("revise") == pytest.approx(
        solo_call_latency_s(engine.perf, 5963, 79, engine.max_num_batched_tokens))
    # faster GPU, shorter expected latency
    h100 = Engine.from_config(1, config.model_copy(update={"gpu": "H100"}), StepTokens(means))
    assert h100.expected_latency_s("revise") < engine.expected_latency_s("revise")
