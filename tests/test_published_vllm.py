"""envs/data/reference/published_vllm.json and benchmarks/published_vllm.py: every published point is
sourced and complete, the point builder drives a one-engine simulation as the benchmark client
drove the real engine, the shipped w16 factors are fitted to the `fit` split alone and reproduce
the `validate` split."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from envs.sim.catalog import load_catalog, weight_class_of

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


def test_bf16_points_simulate_with_the_w16_factors(points) -> None:
    catalog = load_catalog()
    for p in points:
        spec = catalog.gpu(p.gpu)
        assert p.weight_bits == 16 and weight_class_of(p.weight_bits) == "w16", p.id
        assert published.build_simulator(p).engines[0].perf.efficiency == spec.efficiency["w16"], p.id


def test_validate_points_meet_the_goal_with_the_shipped_factors(points) -> None:
    """Median |E2E error| over the `validate` points within the goal, and no validate run saturated."""
    errors = []
    for p in points:
        if p.split == "validate":
            sim = published.simulate_point(p)
            assert not sim.saturated, p.id
            errors.append(abs(sim.mean_e2e_ms / p.measured.mean_e2e_ms - 1))
    assert len(errors) >= 9
    assert statistics.median(errors) <= published.GOAL_MEDIAN_E2E_ERROR, errors


def test_the_fit_sees_only_fit_points_and_gives_the_shipped_factors(points, monkeypatch) -> None:
    """`--fit` hands the fit function the `fit` split alone, the fit simulates no other point, and
    its factors are the shipped w16 ones (so they were made by `--fit --write`, not by hand)."""
    simulated, handed = set(), []
    real_simulate, real_fit = published.simulate_point, published.fit_efficiency

    def spy_simulate(point, *args, **kwargs):
        simulated.add(point.id)
        return real_simulate(point, *args, **kwargs)

    def spy_fit(fit_points):
        handed.append([p.id for p in fit_points])
        fitted.update(real_fit(fit_points))
        return dict(fitted)

    fitted: dict = {}
    monkeypatch.setattr(published, "simulate_point", spy_simulate)
    monkeypatch.setattr(published, "fit_efficiency", spy_fit)
    monkeypatch.setattr(sys, "argv", ["published_vllm.py", "--fit", "--ids", points[1].id])
    published.main()
    fit_ids = {p.id for p in points if p.split == "fit"}
    assert handed == [sorted(fit_ids, key=[p.id for p in points].index)]
    assert fit_ids <= simulated and simulated - fit_ids == {points[1].id}  # the table row, after the fit
    catalog = load_catalog()
    assert {catalog.canonical_gpu(p.gpu) for p in points if p.split == "fit"} == set(fitted)
    for gpu, eff in fitted.items():
        assert catalog.gpu(gpu).efficiency_source("w16") == "measured"
        assert catalog.gpu(gpu).efficiency["w16"].model_dump() == pytest.approx(eff.model_dump(), rel=2e-3), gpu


def test_the_fit_refuses_validate_points(points) -> None:
    with pytest.raises(ValueError, match="not in the `fit` split"):
        published.fit_efficiency([p for p in points if p.split == "validate"][:1])


def test_write_needs_fit(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["published_vllm.py", "--write"])
    with pytest.raises(SystemExit) as exit_info:
        published.main()
    assert exit_info.value.code == 2 and "--write" in capsys.readouterr().err
