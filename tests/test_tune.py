"""`agentsched tune`: a 2-3 trial TPE run writes a policy file that loads, resumes from its SQLite
study, and the --grid mode sweeps the paper's alphas. `agentsched tune-rl --search pbt|pb2`: bad
values and a warm-started config are one-line errors; a tiny PBT population runs (slow: Ray)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from envs.sim.cells import Cell
from heuristics.league import tune_job
from heuristics.tune import search_space
from policies import load_policy
from tests.test_bench import run_main

SMALL = ["--trace", "chess_trace1", "--cluster", "paper", "--rate", "0.04", "--slo-scale", "2", "--queries", "10",
         "--seeds", "0", "--test-seeds", "7", "--workers", "2"]


def _trials_in(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from trials").fetchone()[0]


def test_tune_writes_a_loadable_policy_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "hexgen-tuned.yaml"
    proc = run_main(capsys, monkeypatch, "tune", "--policy", "hexgen", "--trials", "2", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    policy = load_policy(out)
    assert policy.name == "hexgen-tuned"
    spec = yaml.safe_load(out.read_text())
    assert spec["dispatch"]["name"] == "workload-balanced" and 0 <= spec["dispatch"]["alpha"] <= 1
    assert set(spec["meta"]["scores"]) == {"start", "tuned"}
    assert spec["meta"]["test_seeds"] == [7]
    db = tmp_path / "optuna.db"
    assert _trials_in(db) == 2
    proc = run_main(capsys, monkeypatch, "tune", "--policy", "hexgen", "--trials", "3", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "1 new trials (2 already in the study)" in proc.stdout.replace("\n", " ")
    assert _trials_in(db) == 3


def test_tune_grid_sweeps_paper_alphas(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid.yaml"
    proc = run_main(capsys, monkeypatch, "tune", "--policy", "wb+fcfs", "--grid", "--rates", "0.03,0.06", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(out.read_text())
    assert [g["alpha"] for g in spec["meta"]["grid"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert spec["dispatch"]["alpha"] in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert load_policy(out).spec()["local"]["name"] == "fcfs"


def test_tune_bad_input(tmp_path, capsys, monkeypatch):
    proc = run_main(capsys, monkeypatch, "tune", "--policy", "rr", "--trials", "2", "--out", str(tmp_path / "x.yaml"), *SMALL)
    assert proc.returncode == 2 and "has no tunable knobs" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_main(capsys, monkeypatch, "tune", "--policy", "hexgen", "--out", str(tmp_path / "x.yaml"), *SMALL[:-4], "--test-seeds", "0")
    assert proc.returncode == 2 and "--test-seeds: seed 0 is also a tuning seed" in proc.stderr


# ---- tune-rl --search (training/tune.py): PBT and PB2 on Ray Tune next to Optuna

TINY_RL_CONFIG = """\
name: pbt-tiny
env_id: agentsched/Dispatch-v0
algo: maskable_ppo
policy: EngineScoringPolicy
n_envs: 1
vec_env: dummy
env_kwargs: {max_engines: 4}
scenarios:
  - {trace: chess_trace1, cluster: paper, queries: 6, rate_qps: 0.08}
hyperparams: {n_steps: 64, batch_size: 64, n_epochs: 1}
eval: {seeds: [100000], baseline: null}
checkpoint_freq_steps: null
"""


@pytest.mark.parametrize("search", ["nope", "PBT", "asha"])
def test_tune_rl_bad_search_is_one_line(search, capsys, monkeypatch):
    proc = run_main(capsys, monkeypatch, "tune-rl", "--config", "smoke", "--search", search)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--search" in lines[0] and "Traceback" not in proc.stderr


def test_tune_rl_population_search_refuses_a_warm_start(tmp_path, capsys, monkeypatch):
    # the smoke config warm-starts by cloning; population runs start from scratch: one line, nothing started
    def never(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr("training.tune._run_population", never)
    proc = run_main(capsys, monkeypatch, "tune-rl", "--config", "smoke", "--search", "pb2", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--search pb2: the config's warm_start" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_tune_rl_pbt_runs_a_population_and_reports_on_test_seeds(tmp_path, capsys, monkeypatch):
    from training.tune import PBT_BOUNDS, PBT_ROUNDS

    config = tmp_path / "pbt-tiny.yaml"
    config.write_text(TINY_RL_CONFIG)
    out = tmp_path / "run"
    proc = run_main(capsys, monkeypatch, "tune-rl", "--config", str(config), "--search", "pbt", "--trials", "2",
                    "--timesteps", "256", "--tune-seeds", "1", "--test-seeds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["search"] == "pbt" and len(report["trials"]) == 2
    assert not set(report["tune_seeds"]) & set(report["test_seeds"])
    segment = 256 // PBT_ROUNDS
    for row in report["trials"]:
        # one evaluation (and chance to exploit) per round; a member that exploits resumes from the
        # donor's checkpoint, so its history may repeat a step count (asynchronous PBT)
        steps = [h["timesteps"] for h in row["history"]]
        assert steps and all(0 < t <= 256 and t % segment == 0 for t in steps), steps
        for name, (lo, hi) in PBT_BOUNDS["maskable_ppo"].items():
            assert lo <= row["params"][name] <= hi
    best = max(report["trials"], key=lambda r: r["value"])
    assert report["best_policy"] == best["policy"] and load_policy(best["policy"]).name
    assert report["test"]["seeds"] == report["test_seeds"]
    tuned = yaml.safe_load((out / "best_config.yaml").read_text())
    assert tuned["hyperparams"]["learning_rate"] == pytest.approx(report["best_params"]["learning_rate"])


def test_pbt_explore_keeps_hyperparameters_in_their_bounds():
    from training.tune import PBT_BOUNDS, clip_to_bounds

    bounds = PBT_BOUNDS["maskable_ppo"]
    explored = clip_to_bounds({"learning_rate": 2e-3, "clip_range": 0.04, "ent_coef": 1e-3, "other": 7}, bounds)
    assert explored == {"learning_rate": bounds["learning_rate"][1], "clip_range": bounds["clip_range"][0],
                        "ent_coef": 1e-3, "other": 7}


def test_a_policy_with_admission_tunes_its_admission_knobs_too():
    """search_space covers the admission rule's knobs, and tune_job starts from every given spec
    (the joint least-work+admit search of benchmarks/tune_cells.py)."""
    spec = {"kind": "heuristic", "name": "lw+admit", "dispatch": {"name": "least-work"}, "local": {"name": "workflow-first"},
            "admission": {"name": "defer-late", "margin": 1.0, "queue_weight": 0.0, "active_per_engine": 4.0}}
    space = search_space(spec)
    assert {"admission.margin", "admission.queue_weight", "admission.active_per_engine"} <= set(space)
    assert "dispatch.backlog_weight" in space and "local.margin" in space
    assert not any(k.startswith("admission.") for k in search_space("least-work+workflow"))
    other = {**spec, "admission": {**spec["admission"], "active_per_engine": 2.0}}
    result = tune_job(spec, Cell(cluster="paper", rate_qps=0.2, queries=12), [5], trials=2, sampler_seed=0, starts=[other])
    assert result["spec"]["name"] == "lw+admit" and result["spec"]["admission"]["name"] == "defer-late"
    assert set(result["params"]) == set(space)
    assert result["params"]["admission.active_per_engine"] in (4.0, 2.0)  # both trials were the given starts
