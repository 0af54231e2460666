"""The benchmark harness: ratio definitions, threshold searches, and a tiny end-to-end bench that
writes results.json with the ratios, CSVs and the PNG plots; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from heuristics.bench import Scenario, max_rate, min_slo_scale, pooled_attainment, ratio_table

ROOT = Path(__file__).resolve().parent.parent
AGENTSCHED = ROOT / ".venv" / "bin" / "agentsched"
TINY = Scenario("chess_trace1", "paper", 12)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command in a subprocess (exit code, stderr, no traceback)."""
    exe = [str(AGENTSCHED)] if AGENTSCHED.exists() else [sys.executable, "-m", "agentsched.cli"]
    return subprocess.run(exe + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_main(capsys, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """`agentsched.cli.main` in-process (fast): same exit code and stderr as the command."""
    from agentsched.cli import main

    monkeypatch.setattr(sys, "argv", ["agentsched", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_ratio_definitions():
    thresholds = {"rr": {"min_slo_scale": 4.0, "max_rate_qps": 0.02},
                  "hexgen": {"min_slo_scale": 2.0, "max_rate_qps": 0.05},
                  "bad": {"min_slo_scale": math.inf, "max_rate_qps": 0.0}}
    r = ratio_table(thresholds)
    assert r["rr"] == {"deadline_ratio": 1.0, "goodput_ratio": 1.0}
    assert r["hexgen"]["deadline_ratio"] == pytest.approx(2.0)  # rr needs 2x looser SLOs
    assert r["hexgen"]["goodput_ratio"] == pytest.approx(2.5)  # hexgen sustains 2.5x the rate
    assert r["bad"] == {"deadline_ratio": 0.0, "goodput_ratio": 0.0}


def test_threshold_searches_bracket_the_target():
    seeds = [0]
    found = min_slo_scale("rr", TINY, 0.02, seeds, 0.95, 0.05)
    s = found["value"]
    assert math.isfinite(s)
    assert pooled_attainment("rr", TINY, 0.02, s, seeds) >= 0.95
    assert pooled_attainment("rr", TINY, 0.02, s / 1.06, seeds) < 0.95 or s <= 0.25
    top = max_rate("rr", TINY, 3.0, 0.02, seeds, 0.95, 0.05)
    r = top["value"]
    assert r > 0 and pooled_attainment("rr", TINY, r, 3.0, seeds) >= 0.95


def test_tiny_bench_writes_results_ratios_and_plots(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    proc = run_main(capsys, monkeypatch, "bench", "--policies", "hexgen,wb+fcfs", "--rates", "0.01,0.03", "--slo-scales", "2,4",
                   "--seeds", "0", "--queries", "12", "--ratio-rate", "0.02", "--workers", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["policies"] == ["rr", "hexgen", "wb+fcfs"]  # rr added as the baseline
    ratios = results["ratios_vs_rr"]
    assert set(ratios) == {"rr", "hexgen", "wb+fcfs"}
    assert ratios["rr"] == {"deadline_ratio": 1.0, "goodput_ratio": 1.0}
    for name in ("hexgen", "wb+fcfs"):
        assert isinstance(ratios[name]["deadline_ratio"], (int, float))
        assert isinstance(ratios[name]["goodput_ratio"], (int, float))
    assert len(results["points"]) == 3 * 2 * 2
    assert {p["policy"] for p in results["summary"]} == {"rr", "hexgen", "wb+fcfs"}
    for png in ("attainment_vs_slo_scale.png", "attainment_vs_rate.png", "p95_latency_vs_rate.png", "ratios_vs_rr.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "points.csv").read_text().startswith("policy,")
    assert "deadline ratio" in proc.stdout and "plots:" in proc.stdout


@pytest.mark.parametrize("args,fragment", [
    (["--rates", "0.1,abc"], "'--rates': 'abc' is not a positive number"),
    (["--rates", "-1"], "'--rates': '-1' is not a positive number"),
    (["--policies", "rr,hexgne"], "unknown policy name 'hexgne'"),
    (["--cluster", "nosuch"], "cluster: nosuch is neither a file nor a shipped cluster"),
    (["--trace", "nosuch"], "trace: nosuch is neither a file nor a shipped trace"),
    (["--seeds", "x"], "'--seeds': 'x' is not an integer"),
])
def test_bench_bad_input_is_one_line_exit_2(args, fragment, tmp_path, capsys, monkeypatch):
    proc = run_main(capsys, monkeypatch, "bench", "--out", str(tmp_path / "b"), *args)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_simulate_with_bad_policy_knob_file_is_one_line(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("base: hexgen\ndispatch: {alpha: 2}\n")
    proc = run_cli("simulate", "--policy", str(bad), "--queries", "2")
    assert proc.returncode == 2
    assert "alpha must be a number in [0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("cluster", ["mixed-16", "llama8b"])
def test_shipped_clusters_run_every_named_policy(cluster):
    from envs.sim.scenario import RunSpec, simulate
    from policies import load_policy

    for name in ("rr", "hexgen", "hexgen-outstanding", "llmd"):
        result, _ = simulate(RunSpec(cluster=cluster, rate_qps=0.1, slo_scale=3.0, queries=10), load_policy(name))
        assert result["n_finished"] == 10


def test_short_runs_are_flagged_as_bursts():
    from heuristics.bench import steady_state_warnings

    points = [{"n_workflows": 90, "base_slo_s": 50.0}]
    # 90 queries at 1 q/s arrive over 90 s < 5 SLOs of 150 s: a burst
    warnings = steady_state_warnings({"llmd": {"max_rate_qps": 1.0}, "rr": {"max_rate_qps": 0.01}}, points, 3.0)
    assert len(warnings) == 1 and warnings[0].startswith("llmd:") and "--queries 750" in warnings[0]
