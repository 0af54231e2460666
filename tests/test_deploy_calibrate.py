"""Calibration fits (no engines needed): the profile fit recovers known coefficients, writes the
per-call overhead where the simulator reads it, and the under-load refit recovers a known
iteration-cost scale and overhead from simulated measurements."""

from __future__ import annotations

import random

import numpy as np
import pytest

from deploy.calibrate import LoadSample, Samples, apply_load_fit, fit_profile, fit_under_load, simulate_samples
from envs.sim.perf import PerfProfile, ProfileCoefficients


def _samples(base=0.004, seq=2e-4, ctx=5e-7, tok=3e-5, overhead=0.012) -> Samples:
    s = Samples()
    for n in (16, 64, 128, 256, 512, 768, 1024):
        s.prefill.append((n, overhead + base + (tok + ctx) * n))
    for b in (1, 2, 4, 8, 16, 32):
        for c in (32, 384):
            context = b * (c + 16)
            s.decode.append((b, context, base + seq * b + ctx * context))
    return s


def test_fit_recovers_coefficients_and_writes_overhead_for_the_simulator() -> None:
    info = {"model": "tiny", "url": "http://x", "kv_cache_tokens": 131072, "block_size": 128}
    p = fit_profile(_samples(), info, max_num_seqs=32, max_num_batched_tokens=2048)
    c = p.iteration
    assert c.base_s == pytest.approx(0.004, rel=1e-3)
    assert c.decode_seq_s == pytest.approx(2e-4, rel=1e-3)
    assert c.context_token_s == pytest.approx(5e-7, rel=1e-3)
    assert c.prefill_token_s == pytest.approx(3e-5, rel=1e-2)
    assert p.request_overhead_s == pytest.approx(0.012, rel=1e-2)  # first-class field, not only fit[...]
    assert p.block_size_tokens == 128 and p.max_num_batched_tokens == 2048 and p.kv_capacity_tokens == 131072


def _profiles() -> dict[str, PerfProfile]:
    return {name: PerfProfile(engine=name, iteration=ProfileCoefficients(
        base_s=b, prefill_token_s=3e-5, decode_seq_s=1e-4, context_token_s=2e-7), max_num_seqs=16,
        max_num_batched_tokens=2048, block_size_tokens=128, kv_capacity_tokens=20000)
        for name, b in (("fast", 0.004), ("slow", 0.008))}


def _measured(seed: int, profiles: dict[str, PerfProfile], scale: dict[str, float],
              overhead: dict[str, float]) -> tuple[list[LoadSample], np.ndarray]:
    """120 calls alternating between the engines, 'measured' as the simulator predicts them under
    the given true scale and overhead."""
    rng = random.Random(seed)
    samples = [LoadSample(i * 0.1, "fast" if i % 2 else "slow", rng.randint(10, 700), rng.randint(1, 40), 0.0)
               for i in range(120)]
    truth = simulate_samples(samples, profiles, scale, overhead)
    for s, lat in zip(samples, truth):
        s.latency_s = float(lat)
    return samples, truth


def test_load_fit_recovers_scale_and_overhead() -> None:
    profiles = _profiles()
    samples, truth = _measured(0, profiles, {"fast": 2.0, "slow": 1.5}, {"fast": 0.030, "slow": 0.012})
    fit = fit_under_load(samples, profiles, frontends_ms=None)
    assert fit["fast"]["scale"] == pytest.approx(2.0) and fit["fast"]["overhead_s"] == pytest.approx(0.030)
    assert fit["slow"]["scale"] == pytest.approx(1.5) and fit["slow"]["overhead_s"] == pytest.approx(0.012)
    p = apply_load_fit(profiles["fast"], fit["fast"])
    assert p.iteration.base_s == pytest.approx(0.008) and p.request_overhead_s == pytest.approx(0.030)
    again = simulate_samples(samples, {"fast": p, "slow": apply_load_fit(profiles["slow"], fit["slow"])},
                             {}, {})
    assert np.allclose(again, truth)


def test_load_fit_refines_off_the_coarse_grid() -> None:
    """A scale between the coarse grid's 0.1 steps and an overhead off a whole millisecond are
    recovered to the refine step, not rounded to the coarse grid."""
    profiles = _profiles()
    samples, _ = _measured(1, profiles, {"fast": 1.57, "slow": 0.93}, {"fast": 0.0105, "slow": 0.00475})
    fit = fit_under_load(samples, profiles, frontends_ms=None)
    assert fit["fast"]["scale"] == pytest.approx(1.57, abs=0.011)
    assert fit["slow"]["scale"] == pytest.approx(0.93, abs=0.011)
    assert fit["fast"]["overhead_s"] == pytest.approx(0.0105, abs=0.0006)
    assert fit["slow"]["overhead_s"] == pytest.approx(0.00475, abs=0.0006)
    assert fit["fast"]["mean_abs_log_err"] < 0.01


def test_load_fit_recovers_api_server_time_per_call_from_fan_outs() -> None:
    """Groups of calls sent at once (LoadPlan's fan-outs) identify the API-server time per call:
    the fit recovers it with the scale and overhead, and the fitted profile reproduces the stream."""
    from deploy.calibrate import LoadPlan, load_plan_calls

    plan = LoadPlan(duration_s=12.0, seed=3)
    calls = load_plan_calls(plan)
    assert len({t for t, _, _ in calls}) < len(calls)  # some calls are sent together
    samples = [LoadSample(t, "fast" if i % 2 else "slow", n_in, n_out, 0.0) for i, (t, n_in, n_out) in enumerate(calls)]
    profiles = _profiles()
    truth = simulate_samples(samples, profiles, {"fast": 1.2, "slow": 0.9}, {"fast": 0.006, "slow": 0.004},
                             {"fast": 0.003, "slow": 0.0015})
    for s, lat in zip(samples, truth):
        s.latency_s = float(lat)
    fit = fit_under_load(samples, profiles, scales=(0.8, 0.9, 1.0, 1.1, 1.2, 1.3), frontends_ms=(0.0, 1.0, 2.0, 3.0, 4.0))
    assert fit["fast"]["frontend_s"] == pytest.approx(0.003, abs=0.0003)
    assert fit["slow"]["frontend_s"] == pytest.approx(0.0015, abs=0.0003)
    assert fit["fast"]["scale"] == pytest.approx(1.2, abs=0.011) and fit["slow"]["scale"] == pytest.approx(0.9, abs=0.011)
    fitted = {n: apply_load_fit(profiles[n], fit[n]) for n in profiles}
    assert fitted["fast"].call_frontend_s == pytest.approx(0.003, abs=0.0003) and fitted["fast"].call_engine_s == 0.0
    again = simulate_samples(samples, fitted, {}, {})
    assert np.median(np.abs(again - truth) / truth) < 0.02


def test_load_fit_with_a_measured_solo_call_ties_overhead_to_api_server_time() -> None:
    """Given what a solo call measured besides its iteration, every candidate keeps overhead +
    API-server time equal to it: the fit recovers the split from the fan-outs alone."""
    from deploy.calibrate import LoadPlan, load_plan_calls

    calls = load_plan_calls(LoadPlan(duration_s=12.0, seed=3))
    samples = [LoadSample(t, "fast" if i % 2 else "slow", n_in, n_out, 0.0) for i, (t, n_in, n_out) in enumerate(calls)]
    profiles = _profiles()
    overhead, frontend = {"fast": 0.006, "slow": 0.004}, {"fast": 0.003, "slow": 0.0015}
    truth = simulate_samples(samples, profiles, {"fast": 1.1, "slow": 0.9}, overhead, frontend)
    for s, lat in zip(samples, truth):
        s.latency_s = float(lat)
    solo = {n: overhead[n] + frontend[n] for n in profiles}
    fit = fit_under_load(samples, profiles, scales=(0.9, 1.0, 1.1), frontends_ms=(0.0, 1.0, 2.0, 3.0, 4.0),
                         solo_per_call_s=solo)
    for n in profiles:
        assert fit[n]["overhead_s"] + fit[n]["frontend_s"] == pytest.approx(solo[n])
        assert fit[n]["frontend_s"] == pytest.approx(frontend[n], abs=0.0003)
    # a solo time too small for the API-server time leaves no negative overhead
    tight = fit_under_load(samples, profiles, scales=(1.0,), frontends_ms=(3.0,), refine_step=0,
                           solo_per_call_s={"fast": 0.001, "slow": 0.001})
    assert tight["fast"]["overhead_s"] == 0.0


def test_fit_separates_engine_time_per_call_from_path_overhead() -> None:
    """Bursts of k short calls rise by (call_engine_s + one prompt's prefill) per call; the fit
    recovers call_engine_s and leaves only the rest of the intercept as request_overhead_s."""
    base, tok, ctx, overhead, call_s = 0.004, 3e-5, 5e-7, 0.008, 0.003
    s = _samples(base=base, tok=tok, ctx=ctx, overhead=overhead + call_s)
    for k in (1, 2, 4, 8, 16):
        s.burst.append((k, 16, overhead + base + k * (call_s + (tok + ctx) * 16)))
    p = fit_profile(s, {"model": "tiny"}, max_num_seqs=32)
    assert p.call_engine_s == pytest.approx(call_s, rel=0.02)
    assert p.request_overhead_s == pytest.approx(overhead, rel=0.02)


def test_idle_wake_fit_recovers_the_curve_and_finds_none_on_a_flat_one() -> None:
    from deploy.calibrate import fit_idle_wake

    gaps = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    curve = [(g, 0.006 + 0.004 * -np.expm1(-g / 0.03)) for g in gaps]
    wake_s, tau_s, err = fit_idle_wake(curve)
    assert wake_s == pytest.approx(0.004, rel=1e-3) and tau_s == pytest.approx(0.03, rel=1e-3) and err < 1e-6
    flat_wake, _, _ = fit_idle_wake([(g, 0.006) for g in gaps])
    assert flat_wake == pytest.approx(0.0, abs=1e-9)
    assert fit_idle_wake([(0.0, 0.006), (0.1, 0.01)])[0] == 0.0  # too few idle times to fit


def test_profile_fit_carries_the_idle_wake_to_the_simulator() -> None:
    info = {"model": "tiny", "url": "http://x", "kv_cache_tokens": 131072, "block_size": 128}
    s = _samples()
    s.idle = [(g, 0.006 + 0.004 * -np.expm1(-g / 0.03)) for g in (0.0, 0.01, 0.05, 0.1, 0.4)]
    p = fit_profile(s, info, max_num_seqs=32, max_num_batched_tokens=2048)
    assert p.idle_wake_s == pytest.approx(0.004, rel=1e-3) and p.idle_wake_tau_s == pytest.approx(0.03, rel=1e-3)
    assert fit_profile(_samples(), info, max_num_seqs=32).idle_wake_s == 0.0  # not measured: off
