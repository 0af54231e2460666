"""The roofline engine model reproduces every published single-call latency within +-20%, with
physically possible factors, when the reference calls' static template prefixes are served from
the prefix cache (see envs.sim.calibration)."""

from __future__ import annotations

import json
import math

import pytest

from envs.sim import calibration
from envs.sim.catalog import DATA_DIR, load_catalog
from envs.sim.config import EngineConfig
from envs.sim.engine import Engine
from envs.sim.model import StepTokens
from envs.sim.perf import solo_call_latency_s

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
    """No GPU computes faster than its peak dense FLOP/s or reads faster than its HBM bandwidth."""
    for gpu in load_catalog().gpus.values():
        assert gpu.efficiency is not None
        assert 0.0 < gpu.efficiency.compute <= 1.0, gpu.name
        assert 0.0 < gpu.efficiency.memory <= 1.0, gpu.name
        assert 0.0 <= gpu.efficiency.overhead_s <= calibration.UPPER[2], gpu.name


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
