"""`agentsched tune`: a 2-3 trial TPE run writes a policy file that loads, resumes from its SQLite
study, and the --grid mode sweeps the paper's alphas."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import yaml

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
