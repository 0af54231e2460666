"""`agentsched league` on a tiny config: its numbers are the runs it says it made; Ray tasks give the
same results as the process pool (bench, evaluate and league)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from envs.sim.cells import Cell
from heuristics.bench import BenchConfig, Scenario, run_bench
from heuristics.league import (
    OURS,
    SHIPPED_SUFFIX,
    LeagueConfig,
    markdown,
    run_job,
    run_league,
    select_cells,
    write,
)
from tests.test_bench import run_main
from training.evaluate import evaluate

TINY_POLICIES = ["rr", OURS, "autellix-plas"]


def tiny(backend: str = "process", workers: int = 1) -> LeagueConfig:
    return LeagueConfig(policies=list(TINY_POLICIES), cells=select_cells("paper-heavy"), tune_seeds=[1, 2],
                        test_seeds=[10, 11, 12], trials=2, workers=workers, backend=backend)


@pytest.fixture(scope="module")
def league() -> dict:
    return run_league(tiny())


def test_league_reports_the_runs_it_made(league, tmp_path):
    (cell,) = league["cells"]
    c = Cell(**cell["cell"])
    policies = cell["policies"]
    assert set(policies) == {"rr", OURS, "autellix-plas", OURS + SHIPPED_SUFFIX}
    goodputs = [policies[k]["goodput_qps"]["mean"] for k in cell["ranking"]]
    assert goodputs == sorted(goodputs, reverse=True)
    # untuned entries: exactly the named policy's runs on the test seeds
    for label, name in (("rr", "rr"), (OURS + SHIPPED_SUFFIX, OURS)):
        runs = [run_job(name, c, seed) for seed in (10, 11, 12)]
        assert policies[label]["goodput_qps"]["per_seed"] == pytest.approx([r["goodput_qps"] for r in runs])
        cost = sum(r["cost_usd"] for r in runs) / sum(r["n_met"] for r in runs) if sum(r["n_met"] for r in runs) else np.inf
        assert policies[label]["cost_per_met_usd"]["mean"] == pytest.approx(cost)
        m = policies[label]["goodput_qps"]
        assert m["lo"] <= m["mean"] <= m["hi"] or np.isnan(m["lo"])
    # tuned entries: tuning starts from the policy's knobs, so it is never worse on the tuning seeds
    for label in (OURS, "autellix-plas"):
        entry = policies[label]
        assert entry["tuned"] and entry["knobs"]
        assert entry["tune_goodput_qps"]["tuned"] >= entry["tune_goodput_qps"]["start"]
    assert not policies["rr"]["tuned"]
    for key, allowed in (("ours_vs_best_other", lambda k: policies[k]["policy"] != OURS),
                         ("ours_vs_best_peer", lambda k: k == "autellix-plas")):
        v = cell[key]
        assert v["best"] == next(k for k in cell["ranking"] if allowed(k))
        assert v["goodput_ratio"]["mean"] == pytest.approx(
            np.mean(policies[OURS]["goodput_qps"]["per_seed"]) / np.mean(policies[v["best"]]["goodput_qps"]["per_seed"]))
    paths = write(league, tmp_path)
    assert json.loads(paths[0].read_text())["cells"][0]["ranking"] == cell["ranking"]
    table = paths[1].read_text()
    for label in policies:
        assert f"| {label} |" in table or f"| **{label}** |" in table
    assert paths[2].stat().st_size > 0
    shown = {cell["ranking"][0]} | {k for k, p in policies.items() if p["policy"] == OURS}  # the top one and ours
    assert markdown(league, top=1).count("| paper-heavy |") == len(shown)


def test_league_cli_errors_are_one_line(capsys, monkeypatch):
    r = run_main(capsys, monkeypatch, "league", "--cells", "nowhere")
    assert r.returncode == 2 and "--cells" in r.stderr and "paper-heavy" in r.stderr and "Traceback" not in r.stderr
    r = run_main(capsys, monkeypatch, "league", "--policies", "rr", "--fixed", "hexgen")
    assert r.returncode == 2 and "--fixed" in r.stderr
    for command in (["bench", "--policies", "rr"], ["evaluate", "--policy", "rr"], ["league"]):
        r = run_main(capsys, monkeypatch, *command, "--backend", "dask")
        assert r.returncode == 2 and "--backend" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ray_backend_gives_the_process_pool_results(league):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_league(tiny(backend="ray", workers=2))
        for label, entry in league["cells"][0]["policies"].items():
            other = on_ray["cells"][0]["policies"][label]
            assert other["goodput_qps"]["per_seed"] == entry["goodput_qps"]["per_seed"]
            assert other.get("knobs") == entry.get("knobs")
        cells = [Cell(cluster="paper", rate_qps=0.12, queries=12)]
        pooled = evaluate("rr", ["least-work+workflow"], cells, [1, 2], workers=1)
        rayed = evaluate("rr", ["least-work+workflow"], cells, [1, 2], workers=2, backend="ray")
        for label in ("rr", "least-work+workflow"):
            assert (rayed["cells"][0]["policies"][label]["metrics"]["goodput_qps"]["per_seed"]
                    == pooled["cells"][0]["policies"][label]["metrics"]["goodput_qps"]["per_seed"])
        bench = dict(scenario=Scenario("chess_trace1", "paper", 12), policies=["rr", "hexgen"], rates_qps=[0.05],
                     slo_scales=[3.0], seeds=[0, 1], ratio_rate_qps=0.05, ratio_slo_scale=3.0, ratios=False, workers=2)
        a = run_bench(BenchConfig(**bench))["points"]
        b = run_bench(BenchConfig(**bench, backend="ray"))["points"]
        assert [(p["policy"], p["seed"], p["n_met"], p["latency_p95_s"]) for p in a] == \
               [(p["policy"], p["seed"], p["n_met"], p["latency_p95_s"]) for p in b]
    finally:
        ray.shutdown()
