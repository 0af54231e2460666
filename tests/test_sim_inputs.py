"""Bad traces, cluster files and flags: one clear line naming the field, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.sim.errors import UserError
from envs.sim.workload import (
    GammaArrivals,
    PiecewiseArrivals,
    PoissonArrivals,
    ReplayArrivals,
    TraceGenerator,
    load_trace,
    step_mean_tokens,
)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentsched.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("content,needle", [
    ("not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"Text2SQLRequest": [{"step": "x", "input_length": 5}]}]', "output_length"),
    ('[{"Text2SQLRequest": [{"step": "x", "input_length": -5, "output_length": 3}]}]', "input_length"),
    ('[{"Foo": []}]', "Text2SQLRequest"),
])
def test_bad_trace(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    assert_one_line_error(run_cli("simulate", "--trace", str(path)), "trace", needle)


@pytest.mark.parametrize("content,needle", [
    ("engines: []", "engines"),
    ("engines:\n  - {gpu: A100, model: Llama-3.1-70B, tp: 3}", "tp"),
    ("engines:\n  - {gpu: B300, model: Llama-3.1-70B}", "B300"),
    ("engines:\n  - {gpu: A100, model: Llama-3.1-70B, weight_bits: 16}", "weight_bits"),
    ("engines:\n  - {gpu: A100, model: Llama-3.1-70B, colour: red}", "colour"),
    ("engines: [", "not valid YAML"),
])
def test_bad_cluster_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert_one_line_error(run_cli("simulate", "--cluster", str(path), "--queries", "2"), needle)


def test_bad_flags() -> None:
    assert_one_line_error(run_cli("simulate", "--rate", "0"), "--rate")
    assert_one_line_error(run_cli("simulate", "--slo-scale", "-1"), "--slo-scale")
    assert_one_line_error(run_cli("simulate", "--policy", "nonsense"), "nonsense")
    assert_one_line_error(run_cli("simulate", "--trace", "missing.json"), "missing.json")


def test_simulate_cli_writes_contract_json(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    trace = tmp_path / "trace.json"
    proc = run_cli("simulate", "--trace", "chess_trace1", "--cluster", "paper", "--policy", "rr", "--rate", "0.1",
                   "--slo-scale", "3", "--seed", "1", "--queries", "20", "--out", str(out), "--chrome-trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("slo_attainment", "goodput_qps", "throughput_qps", "latency_p50_s", "latency_p95_s", "latency_p99_s",
                "n_workflows", "n_calls", "sim_wall_s", "cost_usd"):
        assert key in result
    assert result["n_workflows"] == 20
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("ph") == "X" and e.get("name") == "decode" for e in events)


def test_trace_loader_builds_fanout_stages() -> None:
    workflows = load_trace("chess_trace1")
    assert len(workflows) == 90
    wf = workflows[3]
    widths = [(stage[0].step, len(stage)) for stage in wf.stages]
    assert ("generate_candidate", 2) in widths and ("evaluate", 6) in widths
    # consecutive non-fan-out steps stay sequential
    assert widths[:4] == [("Information Retriever", 1)] * 4
    assert all(not c.step.startswith("generate_candidate_") for w in workflows for s in w.stages for c in s)


def test_generator_looks_like_its_trace() -> None:
    trace = load_trace("chess_trace2")
    gen = TraceGenerator.fit(trace)
    drawn = gen.sample(2000, np.random.default_rng(0))
    real_len = np.mean([w.n_calls for w in trace])
    gen_len = np.mean([w.n_calls for w in drawn])
    assert gen_len == pytest.approx(real_len, rel=0.05)
    real, fake = step_mean_tokens(trace), step_mean_tokens(drawn)
    assert set(real) == set(fake)
    for step in real:
        assert fake[step][0] == pytest.approx(real[step][0], rel=0.25), step
    # new queries, not copies
    real_inputs = {c.input_tokens for w in trace for s in w.stages for c in s}
    fresh = [c.input_tokens for w in drawn[:50] for s in w.stages for c in s]
    assert sum(1 for x in fresh if x not in real_inputs) > len(fresh) / 2


def test_arrival_processes_are_seeded_and_have_their_rate() -> None:
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    for proc in (PoissonArrivals(rate_qps=2.0), GammaArrivals(rate_qps=2.0, cv=3.0)):
        a, b = proc.times(4000, rng()), proc.times(4000, rng())
        assert np.array_equal(a, b)
        assert 4000 / a[-1] == pytest.approx(2.0, rel=0.15)
    gaps = np.diff(GammaArrivals(rate_qps=2.0, cv=3.0).times(20000, rng()))
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    steps = PiecewiseArrivals(segments=[{"duration_s": 100, "rate_qps": 1.0}, {"duration_s": 100, "rate_qps": 4.0}])
    t = steps.times(480, rng())
    assert np.sum(t < 100) == pytest.approx(100, rel=0.3)
    assert np.sum((t >= 100) & (t < 200)) == pytest.approx(400, rel=0.2)
    diurnal = PiecewiseArrivals.diurnal(mean_rate_qps=1.0, amplitude=0.8, period_s=1000)
    assert diurnal.mean_rate_qps == pytest.approx(1.0, rel=0.01)
    assert np.array_equal(ReplayArrivals(timestamps_s=[0.0, 1.0, 5.0]).times(3, rng()), [0.0, 1.0, 5.0])
    with pytest.raises(UserError, match="timestamps"):
        ReplayArrivals(timestamps_s=[0.0]).times(3, rng())


def test_yaml_workflow_template_runs_and_bad_template_is_one_line(tmp_path: Path) -> None:
    from envs.sim.scenario import RunSpec, simulate
    from policies import load_policy

    result, sim = simulate(RunSpec(trace="react-agent.yaml", cluster="paper", rate_qps=0.2, slo_scale=3.0, queries=30),
                           load_policy("rr"))
    assert result["n_workflows"] == 30
    assert {c.step for c in sim.calls} == {"plan", "act", "reflect", "answer"}
    assert sim.slo.standard[:2] == ["plan", "act"]
    bad = tmp_path / "w.yaml"
    bad.write_text("stages:\n  - step: a\n    input_tokens: {median: -3}\n    output_tokens: {median: 5}\n")
    assert_one_line_error(run_cli("simulate", "--trace", str(bad)), "stages.0.input_tokens.median")


def test_tenants_file_gives_per_tenant_metrics(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("- {name: gold, slo_scale: 1.0, priority: 0, share: 0.3}\n"
                       "- {name: bronze, slo_scale: 2.0, priority: 1, share: 0.7}\n")
    out = tmp_path / "r.json"
    proc = run_cli("simulate", "--tenants", str(tenants), "--queries", "40", "--rate", "0.05", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    per_tenant = json.loads(out.read_text())["per_tenant"]
    assert set(per_tenant) == {"gold", "bronze"}
    assert sum(t["n_workflows"] for t in per_tenant.values()) == 40
    tenants.write_text("- {name: x, slo_scale: -1}\n")
    assert_one_line_error(run_cli("simulate", "--tenants", str(tenants)), "slo_scale")
