"""envs/data/reference/published_vllm.json and benchmarks/published_vllm.py: every published point is
sourced and complete, and the point builder drives a one-engine simulation as the benchmark client
drove the real engine."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from envs.sim.catalog import load_catalog

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("published_vllm", ROOT / "benchmarks" / "published_vllm.py")
published = importlib.util.module_from_spec(_spec)
sys.modules["published_vllm"] = published
_spec.loader.exec_module(published)


@pytest.fixture(scope="module")
def points():
    return published.load_points()


def test_every_point_is_sourced_and_complete(points) -> None:
    assert len(points) >= 10
    assert len({p.id for p in points}) == len(points)
    catalog = load_catalog()
    for p in points:
        assert p.source.url.startswith("https://") and p.source.section, p.id
        assert p.vllm_version and p.precision and p.gpu_variant, p.id
        catalog.gpu(p.gpu)  # every GPU and model is in the catalog
        catalog.model(p.model)
        assert p.measured.mean_e2e_ms > 0
    assert len({catalog.canonical_gpu(p.gpu) for p in points}) >= 2
    assert len({p.model for p in points}) >= 2
    splits = {p.split for p in points}
    assert "validate" in splits


def test_derived_e2e_matches_the_published_ttft_and_tpot(points) -> None:
    """mean E2E = mean TTFT + (mean output - 1) x mean TPOT where the JSON says it was derived."""
    for p in points:
        m = p.measured
        if m.mean_e2e_derived:
            assert m.mean_e2e_ms == pytest.approx(m.mean_ttft_ms + (p.workload.output_tokens - 1) * m.mean_tpot_ms,
                                                  rel=1e-4), p.id


def test_closed_loop_is_one_chain_per_client(points) -> None:
    point = next(p for p in points if p.workload.max_concurrency)
    clients = point.workload.max_concurrency
    workflows, times = published.workload_for(point)
    assert len(workflows) == clients and not times.any()
    assert sum(w.n_calls for w in workflows) == point.workload.num_requests
    assert max(w.n_calls for w in workflows) - min(w.n_calls for w in workflows) <= 1


def test_small_closed_loop_simulation_is_valid(points) -> None:
    """Two clients, five requests: at most two calls in flight, each the point's lengths, and the
    simulated figures consistent with the calls' own timestamps."""
    base = next(p for p in points if p.workload.max_concurrency)
    point = base.model_copy(update={"workload": base.workload.model_copy(update={"num_requests": 5, "max_concurrency": 2})})
    sim = published.build_simulator(point)
    while (call := sim.next_decision()) is not None:
        assert call.input_tokens == round(point.workload.input_tokens)
        sim.dispatch(call, 0)
    calls = sim.calls
    assert len(calls) == 5 and all(not math.isnan(c.finish_time_s) for c in calls)
    for c in calls:  # a closed loop: never more than two requests between send and finish at once
        in_flight = sum(1 for o in calls if o.ready_time_s <= c.ready_time_s < o.finish_time_s)
        assert in_flight <= 2
    figures = published.simulate_point(point)
    assert 0 < figures.mean_ttft_ms < figures.mean_e2e_ms
    assert figures.duration_s == pytest.approx(max(c.finish_time_s for c in calls))
    assert not figures.saturated


def test_an_offered_rate_above_capacity_is_saturated(points) -> None:
    base = next(p for p in points if p.workload.max_concurrency)
    point = base.model_copy(update={"workload": base.workload.model_copy(
        update={"num_requests": 40, "max_concurrency": None, "request_rate": 1000.0})})
    assert published.simulate_point(point).saturated


def test_the_json_has_no_unknown_fields() -> None:
    raw = json.loads(published.PUBLISHED_PATH.read_text())
    published.PublishedSet.model_validate(raw)  # extra="forbid" on every point
    assert all(p["split"] in ("fit", "validate") for p in raw["points"])
