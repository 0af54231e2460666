"""The benchmark env ids (envs/gym/benchmark.py) and their shipped reference table."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
import typer
from gymnasium.utils.env_checker import check_env

import envs.gym  # noqa: F401  (registers the ids)
from benchmarks.headroom import TUNED_HEXGEN, TUNED_LEAST_WORK, TUNED_NAMES, TUNED_PATH, cell_tuned, policy_for
from benchmarks.reference_scores import BOUND, PLANNERS, POLICIES, refresh_intervals
from benchmarks.reference_scores import main as write_reference_table
from envs.gym.benchmark import (
    BENCHMARK_CELLS,
    BENCHMARK_ENV_IDS,
    CLUSTER_NAMES,
    HEAVY_RATES_QPS,
    SCORES_PATH,
    SHAPE_NAMES,
    TEST_SEEDS,
    BenchmarkDispatchEnv,
    reference_scores,
)
from envs.seeds import TEST_SEED_BASE, TRAIN_SEED_BASE, TRAIN_SEED_COUNT
from envs.sim.cells import Cell
from envs.sim.scenario import simulate
from envs.sim.workload import PiecewiseArrivals, PoissonArrivals
from policies import load_policy
from policies.lookahead import LookaheadPolicy


def run_episode(env: gym.Env, policy) -> dict:
    env.reset(seed=0)
    while True:
        _, _, terminated, truncated, info = env.step(env.unwrapped.heuristic_action(policy))
        if terminated or truncated:
            return info["metrics"]


def test_ids_cover_both_clusters_and_every_load_shape():
    assert len(BENCHMARK_ENV_IDS) == len(HEAVY_RATES_QPS) * len(SHAPE_NAMES) == 6
    assert "agentsched/Dispatch-paper-heavy-v1" in BENCHMARK_ENV_IDS
    assert "agentsched/Dispatch-mixed16-burst-v1" in BENCHMARK_ENV_IDS


# check_env resets a dozen times and a benchmark-length workload takes ~0.5 s to draw: one id per
# cluster in the fast tier, the others in the slow one
CHECKED_FAST = ("agentsched/Dispatch-paper-burst-v1", "agentsched/Dispatch-mixed16-heavy-v1")


@pytest.mark.parametrize("env_id", [pytest.param(i, marks=() if i in CHECKED_FAST else pytest.mark.slow)
                                    for i in BENCHMARK_ENV_IDS])
def test_every_id_passes_check_env(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("env_id", BENCHMARK_ENV_IDS)
def test_every_id_makes_and_its_scenario_matches_its_name(env_id):
    env = gym.make(env_id)
    cell = env.unwrapped.cell
    _, name = env_id.split("/")
    _, cluster_name, shape_name, version = name.split("-")
    assert CLUSTER_NAMES[cell.cluster] == cluster_name and SHAPE_NAMES[cell.load] == shape_name and version == "v1"
    assert cell.rate_qps == HEAVY_RATES_QPS[cell.cluster] and cell.prefix_cache and cell.slo_scale == 3.0
    assert gym.spec(env_id).kwargs["test_seeds"] == list(TEST_SEEDS)
    # the episode is the cell's run: its cluster, length and load shape
    _, info = env.reset(seed=1)
    spec = env.unwrapped.run_spec(info["episode_seed"])
    assert spec.cluster == cell.cluster and spec.queries == cell.queries and spec.rate_qps == cell.rate_qps
    assert isinstance(spec.arrivals, PoissonArrivals if cell.load == "constant" else PiecewiseArrivals)
    assert env.unwrapped.max_engines == env.unwrapped.scenario.largest_cluster()  # no padding
    env.close()


def test_train_split_draws_training_seeds_and_test_split_walks_the_test_seeds():
    train_env = gym.make("agentsched/Dispatch-paper-step-v1")
    seeds = {train_env.reset(seed=s)[1]["episode_seed"] for s in range(5)}
    assert all(TRAIN_SEED_BASE <= s < TRAIN_SEED_BASE + TRAIN_SEED_COUNT for s in seeds) and len(seeds) > 1
    test_env = gym.make("agentsched/Dispatch-paper-step-v1", split="test", test_seeds=TEST_SEEDS[:3])
    walked = [test_env.reset(seed=0 if i == 0 else None)[1]["episode_seed"] for i in range(4)]
    assert walked == [TEST_SEEDS[0], TEST_SEEDS[1], TEST_SEEDS[2], TEST_SEEDS[0]]
    assert test_env.reset(seed=3)[1]["episode_seed"] == TEST_SEEDS[0]  # a seeded reset restarts the walk
    assert test_env.reset(options={"episode_seed": 7})[1]["episode_seed"] == 7
    assert TEST_SEEDS[0] == TEST_SEED_BASE
    with pytest.raises(ValueError, match="split"):
        BenchmarkDispatchEnv(cell=BENCHMARK_CELLS[BENCHMARK_ENV_IDS[0]], split="eval")


def test_the_best_heuristic_dispatching_in_the_env_reproduces_its_simulate_run():
    # a short version of a benchmark cell (same env class and local order): the env is the simulator
    kwargs = gym.spec("agentsched/Dispatch-paper-burst-v1").kwargs
    cell = Cell(**{**kwargs["cell"], "queries": 24})
    env = BenchmarkDispatchEnv(**{**kwargs, "cell": cell}, split="test")
    policy = load_policy("least-work+workflow")
    metrics = run_episode(env, policy)
    result, _ = simulate(cell.run_spec(TEST_SEEDS[0]), load_policy("least-work+workflow"))
    assert metrics["goodput_qps"] == pytest.approx(result["goodput_qps"])
    assert metrics["slo_attainment"] == pytest.approx(result["slo_attainment"])


def test_reference_table_has_every_id_every_policy_and_the_bound():
    table = json.loads(SCORES_PATH.read_text())
    assert set(table["envs"]) == set(BENCHMARK_ENV_IDS)
    assert table["test_seeds"] == list(TEST_SEEDS[:len(table["test_seeds"])])
    for env_id in BENCHMARK_ENV_IDS:
        scores = reference_scores(env_id)
        assert set(POLICIES) | {BOUND} | set(PLANNERS) <= set(scores)
        bound = scores[BOUND]["goodput_qps"]["mean"]
        for name in POLICIES:
            g = scores[name]["goodput_qps"]
            assert g["lo"] <= g["mean"] <= g["hi"] and len(scores[name]["per_seed"]) == len(table["test_seeds"])
            assert g["mean"] <= bound + 1e-9  # nothing beats the capacity bound
        assert table["envs"][env_id]["cell"]["queries"] == BENCHMARK_CELLS[env_id].queries
        for label, (_, base) in PLANNERS.items():
            entry = scores[label]
            if entry.get("measured", True):  # compared with its base on its own seeds
                same = scores[base]["per_seed"][:len(entry["seeds"])]
                assert entry["base"] == base and entry["base_same_seeds"] == pytest.approx(sum(same) / len(same))
    with pytest.raises(KeyError, match="no reference scores"):
        reference_scores("agentsched/Dispatch-v0")


def test_reference_table_is_current_for_the_best_heuristic():
    # the shipped number reproduces: re-run the first test seed of one id
    env_id = "agentsched/Dispatch-paper-burst-v1"
    shipped = reference_scores(env_id)["least-work+workflow"]
    result, _ = simulate(BENCHMARK_CELLS[env_id].run_spec(shipped["seeds"][0]), load_policy("least-work+workflow"))
    assert result["goodput_qps"] == pytest.approx(shipped["per_seed"][0])


def test_tuned_knobs_cover_every_id_and_reproduce_their_tuning_score():
    table = json.loads(TUNED_PATH.read_text())
    assert not set(table["tune_seeds"]) & set(TEST_SEEDS)  # tuned apart from the test episodes
    for env_id, cell in BENCHMARK_CELLS.items():
        entry = table["envs"][env_id]
        assert entry["cell"] == cell.label
        for name, tuned_name in TUNED_NAMES.items():
            assert entry[name]["tune_goodput_qps"] >= entry[name]["start_goodput_qps"]  # shipped knobs: trial 0
            policy = policy_for(tuned_name, cell)
            assert policy.name == tuned_name
            spec = policy.spec()
            if name == "least-work+admit":  # the grid on top of the tuned least-work+workflow, then every knob
                assert entry[name]["tune_goodput_qps"] >= entry[name]["grid"]["tune_goodput_qps"]
                assert entry[name]["grid"]["tune_goodput_qps"] >= entry["least-work+workflow"]["tune_goodput_qps"]
                assert spec["admission"]["name"] == "defer-late"
            knobs = {f"{section}.{k}": v for section in ("dispatch", "local", "admission") if section in spec
                     for k, v in spec[section].items() if k != "name"}
            assert {k: knobs[k] for k in entry[name]["params"]} == pytest.approx(entry[name]["params"])
    # the tuned policy scores on the tuning seeds what tuning recorded
    env_id = "agentsched/Dispatch-paper-burst-v1"
    cell, entry = BENCHMARK_CELLS[env_id], table["envs"][env_id]["least-work+workflow"]
    runs = [simulate(cell.run_spec(s), policy_for(TUNED_LEAST_WORK, cell))[0]["goodput_qps"] for s in table["tune_seeds"]]
    assert sum(runs) / len(runs) == pytest.approx(entry["tune_goodput_qps"])
    # a cell that was not tuned: hexgen-tuned falls back to the league, least-work+workflow-tuned says what to run
    other = Cell(trace="chess_trace1", cluster="paper", rate_qps=0.05, load="constant", queries=20)
    assert cell_tuned("least-work+workflow", other) is None
    assert policy_for(TUNED_HEXGEN, other).name == TUNED_HEXGEN
    with pytest.raises(typer.BadParameter, match="tune_cells.py"):
        policy_for(TUNED_LEAST_WORK, other)


def test_a_planner_over_a_tuned_rule_plans_with_the_cells_own_knobs():
    """`lookahead-admit` of the reference table: lookahead whose base (its rollouts' policy and its
    admission) is the rule tuned on the very cell."""
    cell = BENCHMARK_CELLS["agentsched/Dispatch-mixed16-step-v1"]
    planner = policy_for(PLANNERS["lookahead-admit"][0], cell)
    assert isinstance(planner, LookaheadPolicy)
    assert planner.base.spec() == policy_for("least-work+admit-tuned", cell).spec()
    assert (planner.horizon_s, planner.samples, planner.top_k) == (20.0, 1, 2)


def test_shipped_intervals_are_the_codes_and_do_not_depend_on_other_entries() -> None:
    """Every interval of the shipped table is what benchmarks/reference_scores.py computes from the
    entry's own per-seed values, and it stays so when another entry (a planner) is left out."""
    shipped = json.loads(SCORES_PATH.read_text())
    refreshed = json.loads(SCORES_PATH.read_text())
    for env in refreshed["envs"].values():
        env["policies"].pop("lookahead")
        for entry in env["policies"].values():
            entry.pop("goodput_qps", None)  # recomputed from the per-seed values alone
            if "ratio_to" in entry:
                entry["ratio_to"] = dict.fromkeys(entry["ratio_to"])
    refresh_intervals(refreshed)
    for env_id, env in refreshed["envs"].items():
        assert len(env["policies"]) == len(shipped["envs"][env_id]["policies"]) - 1
        for name, entry in env["policies"].items():
            assert entry == shipped["envs"][env_id]["policies"][name]


def test_intervals_only_rewrites_a_table_from_its_per_seed_values(tmp_path, capsys) -> None:
    shipped = json.loads(SCORES_PATH.read_text())
    table = json.loads(SCORES_PATH.read_text())
    entry = table["envs"]["agentsched/Dispatch-paper-heavy-v1"]["policies"]["rr"]
    entry["goodput_qps"] = {"mean": entry["goodput_qps"]["mean"], "lo": 0.0, "hi": 1.0}  # a stale interval
    out = tmp_path / "scores.json"
    out.write_text(json.dumps(table))
    write_reference_table(intervals_only=True, out=out)
    assert json.loads(out.read_text()) == shipped
    assert out.with_suffix(".md").read_text() == SCORES_PATH.with_suffix(".md").read_text()
