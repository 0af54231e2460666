"""The roofline engine model reproduces every published single-call latency within +-20%."""

from __future__ import annotations

import json

import pytest

from envs.sim.catalog import DATA_DIR
from envs.sim.config import EngineConfig
from envs.sim.engine import Engine
from envs.sim.model import StepTokens
from envs.sim.perf import solo_call_latency_s

REFERENCE = json.loads((DATA_DIR / "reference" / "hexgen_stage_latency.json").read_text())
CHECKED_GPUS = ("A100", "H100", "A6000", "L40")
CELLS = [(gpu, step) for gpu in CHECKED_GPUS for step in REFERENCE["latency_s"][gpu]]


@pytest.mark.parametrize("gpu,step", CELLS, ids=[f"{g}-{s}" for g, s in CELLS])
def test_single_call_latency_within_20_percent(gpu: str, step: str) -> None:
    config = EngineConfig(gpu=gpu, model="Llama-3.1-70B", tp=1, weight_bits=4, name="ref")
    engine = Engine.from_config(0, config)
    tokens = REFERENCE["stage_mean_tokens"][step]
    predicted = solo_call_latency_s(engine.perf, tokens["input_tokens"], tokens["output_tokens"],
                                    engine.max_num_batched_tokens)
    measured = REFERENCE["latency_s"][gpu][step]
    assert predicted == pytest.approx(measured, rel=0.20), f"{gpu} {step}: {predicted:.3f}s vs {measured:.3f}s"


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
