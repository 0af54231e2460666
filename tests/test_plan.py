"""`agentsched plan`: the integer program on a toy catalog worked out by hand, the planner end to
end on a tiny case (its cluster file loads and simulates), and one-line errors for targets that
cannot be met."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from envs.sim.catalog import Catalog, Efficiency, GPUSpec, ModelSpec
from envs.sim.config import load_cluster
from envs.sim.scenario import RunSpec, simulate
from heuristics.bench import make_policy
from heuristics.plan import (
    TEST_SEED_BASE,
    TUNE_SEED_BASE,
    EngineOption,
    Evaluation,
    PlanConfig,
    StepDemand,
    engine_options,
    grid_size,
    make_mix,
    mix_cluster,
    mix_gpus,
    neighbours,
    pareto_front,
    run_spec_for,
    solve_ilp,
    step_throughput,
    throughput_table,
)

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 8192  # one prefill chunk at the default max_num_batched_tokens


def toy_catalog() -> Catalog:
    """Two GPU types that differ only in FLOP/s and price, and a model whose attention and weight
    reads are negligible next to its dense FLOPs: a prefill of n tokens takes n * 2 * params / peak."""
    exact = Efficiency(compute=1.0, memory=1.0, overhead_s=0.0)
    gpus = {
        "slow": GPUSpec(name="slow", peak_tflops=100.0, hbm_bandwidth_gbps=2000.0, memory_gb=48, price_per_hour=1.0,
                        efficiency=exact),
        "fast": GPUSpec(name="fast", peak_tflops=400.0, hbm_bandwidth_gbps=2000.0, memory_gb=48, price_per_hour=3.0,
                        efficiency=exact),
    }
    models = {"toy": ModelSpec(name="toy", layers=1, hidden_size=64, intermediate_size=64, attention_heads=1,
                               kv_heads=1, vocab_size=1000, parameters=1e9)}
    return Catalog(gpus=gpus, models=models)


def one_step(calls_per_s: float, budget_s: float) -> StepDemand:
    # output 1 token: the call is its prefill alone (no decode iterations)
    return StepDemand("route", calls_per_s, PROMPT_TOKENS, 1, PROMPT_TOKENS + 1, budget_s)


def toy_program(calls_per_s: float, budget_s: float, max_gpus: int | None = None) -> dict[str, int] | None:
    options = engine_options(["slow", "fast"], "toy", toy_catalog(), tps=(1,), bits=(16,))
    tput = throughput_table([e for _, e in options], [one_step(calls_per_s, budget_s)])
    counts = solve_ilp([o.price_per_hour for o, _ in options], [o.tp for o, _ in options], tput, [calls_per_s],
                       headroom=1.0, max_gpus=max_gpus)
    return None if counts is None else {o.gpu: int(n) for (o, _), n in zip(options, counts) if n}


def test_throughput_is_one_prefill_per_call_on_the_toy_catalog() -> None:
    # by hand: 8192 tokens x 2 x 1e9 FLOPs / 1e14 FLOP/s = 0.164 s per call -> 6.10 calls/s (slow), 24.4 (fast)
    options = {o.gpu: e for o, e in engine_options(["slow", "fast"], "toy", toy_catalog(), tps=(1,), bits=(16,))}
    for gpu, peak in (("slow", 100e12), ("fast", 400e12)):
        calls_per_s, _ = step_throughput(options[gpu], one_step(1.0, 10.0))
        assert calls_per_s == pytest.approx(peak / (PROMPT_TOKENS * 2 * 1e9), rel=0.01)


def test_program_finds_the_hand_computed_mix() -> None:
    # 28 calls/s: fast alone serves 24.4 (too few); fast + slow = 30.5 for $4 beats 5 x slow ($5) and 2 x fast ($6)
    assert toy_program(28.0, budget_s=10.0) == {"fast": 1, "slow": 1}
    # 20 calls/s: one fast GPU ($3) is cheaper than four slow ones (24.4 calls/s for $4)
    assert toy_program(20.0, budget_s=10.0) == {"fast": 1}
    # a 0.1 s budget: a slow GPU's call alone takes 0.164 s, so only fast GPUs count: 2 x fast ($6)
    assert toy_program(28.0, budget_s=0.1) == {"fast": 2}
    # within one GPU, 28 calls/s cannot be served at all
    assert toy_program(28.0, budget_s=10.0, max_gpus=1) is None


def test_batching_raises_throughput_until_the_latency_budget_binds() -> None:
    options = {o.gpu: e for o, e in engine_options(["fast"], "toy", toy_catalog(), tps=(1,), bits=(16,))}
    engine = options["fast"]
    # 200 decode iterations of ~1 ms each (the weights read once per iteration): ~0.2 s alone
    decode_heavy = [StepDemand("gen", 1.0, 500, 200, 700, budget_s) for budget_s in (0.1, 0.25, 0.3, 0.5, 30.0)]
    results = [step_throughput(engine, d) for d in decode_heavy]
    assert results[0] == (0.0, 0)  # below a call's solo latency: the engine cannot serve the step
    rates = [r for r, _ in results[1:]]
    batches = [b for _, b in results[1:]]
    assert rates[0] < rates[1] < rates[2] <= rates[3]  # a looser budget admits a larger batch, until it saturates
    assert batches == sorted(batches) and batches[0] > 1 and batches[-1] <= engine.max_num_seqs


def test_neighbours_are_one_move_away_and_respect_the_gpu_cap() -> None:
    a, b = EngineOption("H100", 1, 4, 3.0), EngineOption("L40S", 2, 4, 2.0)
    mix = make_mix({a: 2})
    out = neighbours(mix, [a, b], gpu_cap=3)
    assert make_mix({a: 1}) in out and make_mix({a: 3}) in out and make_mix({a: 1, b: 1}) in out
    assert make_mix({a: 2, b: 1}) not in out  # 2 + 2 GPUs > the cap
    assert all(mix_gpus(m) <= 3 for m in out) and mix not in out


def test_pareto_front_keeps_only_undominated_clusters() -> None:
    a = EngineOption("H100", 1, 4, 3.0)
    evals = [Evaluation(make_mix({a: n}), met, 10, 1, "rr") for n, met in ((1, 5), (2, 9), (3, 8), (4, 10))]
    assert [dict(e.mix)[a] for e in pareto_front(evals)] == [1, 2, 4]


def test_seed_blocks_are_the_training_ones() -> None:
    from training.config import TEST_SEED_BASE as TRAIN_TEST
    from training.config import TUNE_SEED_BASE as TRAIN_TUNE

    assert (TUNE_SEED_BASE, TEST_SEED_BASE) == (TRAIN_TUNE, TRAIN_TEST)
    cfg = PlanConfig()
    assert not set(cfg.tune_seeds) & set(cfg.test_seeds)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentsched.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_plan_end_to_end_writes_a_cluster_that_loads_and_simulates(tmp_path) -> None:
    out = tmp_path / "plan"
    proc = _cli("--rate", "0.05", "--slo-scale", "4", "--target", "0.75", "--gpus", "H100,A6000", "--queries", "4",
                "--seeds", "150000", "--test-seeds", "200000", "--workers", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "plan.json").read_text())
    assert (out / "pareto.png").stat().st_size > 0
    chosen = result["chosen"]
    assert chosen["attainment_tune"] >= 0.75
    whats = [c["what"] for c in result["comparisons"]]
    assert whats[0] == "program answer alone" and "paper cluster" in whats
    assert {"cheapest homogeneous H100", "cheapest homogeneous A6000"} <= set(whats)
    phases = result["simulations_by_phase"]
    assert sum(phases.values()) == result["simulations"]
    assert phases["local search"] == result["search_clusters"] * 1  # one tuning seed per cluster
    assert result["grid_simulations"] >= phases["local search"]  # the grid holds every cluster searched
    cluster = load_cluster(out / "cluster.yaml")
    assert sum(e.count * e.tp for e in cluster.engines) == chosen["gpus"]
    assert {e.gpu for e in cluster.engines} <= {"H100", "A6000"}
    spec = RunSpec(cluster=str(out / "cluster.yaml"), rate_qps=0.05, slo_scale=chosen["slo_scale_in_simulate"],
                   queries=4, seed=200000)
    metrics, _ = simulate(spec, make_policy("least-work+workflow"))
    assert metrics["n_workflows"] == 4
    # the cluster file with the scale it names reproduces the plan's test-seed attainment (one test seed here)
    assert metrics["slo_attainment"] == pytest.approx(chosen["attainment_test"])


def test_infeasible_target_is_one_line_and_exit_2(tmp_path) -> None:
    proc = _cli("--rate", "1.0", "--max-gpus", "1", "--target", "0.99", "--queries", "4", "--out", str(tmp_path / "p"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "--max-gpus" in lines[0] and "1 GPUs" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "plan.json").exists()


def test_prefix_cache_setting_is_passed_through() -> None:
    a = EngineOption("H100", 1, 4, 3.0)
    cluster = mix_cluster(make_mix({a: 1}), "Llama-3.1-70B")
    assert run_spec_for(cluster, PlanConfig().cell, 0, 3.0, False).prefix_cache is False
    assert run_spec_for(cluster, PlanConfig().cell, 0, 3.0, True).prefix_cache is True
    assert run_spec_for(cluster, PlanConfig().cell, 0, 3.0, None).prefix_cache is True  # the simulator's default


def test_grid_size_counts_the_count_vectors_of_the_searched_region() -> None:
    a, b = EngineOption("H100", 1, 4, 3.0), EngineOption("L40S", 2, 4, 2.0)
    evals = [Evaluation(make_mix({a: 2}), 1, 1, 1, "rr"), Evaluation(make_mix({b: 1}), 1, 1, 1, "rr")]
    # at most 2 of a type and 2 GPUs in all: {a: 1}, {a: 2}, {b: 1}
    assert grid_size(evals, [a, b]) == 3
