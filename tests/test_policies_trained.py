"""Trained policies: save/load round trip (dir and zip) gives identical actions, clear errors for
policies that do not fit, any ClusterView works, and the shipped policy reproduces its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from envs.sim.scenario import RunSpec, simulate
from policies import PolicyError, load_policy

PRETRAINED = Path(__file__).resolve().parent.parent / "policies" / "pretrained"


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    """An untrained (randomly initialised, seeded) MaskablePPO engine scorer saved as a policy."""
    from training.config import TrainConfig
    from training.envs import make_vec_env
    from training.train import build_model, policy_meta, save_policy_dir

    cfg = TrainConfig.parse({"name": "rt", "n_envs": 1, "vec_env": "dummy", "policy": "EngineScoringPolicy",
                             "scenarios": [{"queries": 6}], "env_kwargs": {"max_engines": 5},
                             "hyperparams": {"n_steps": 64, "batch_size": 32}})
    venv = make_vec_env(cfg)
    model = build_model(cfg, venv, None)
    out = tmp_path_factory.mktemp("pol") / "policy"
    save_policy_dir(out, model, cfg, policy_meta(cfg, venv), None)
    return out, model


def _decisions(policy, spec):
    result, sim = simulate(spec, policy)
    return [c.engine_id for c in sim.calls], result


def test_round_trip_identical_actions(saved_policy, tmp_path, monkeypatch):
    import tempfile

    from policies.trained import zip_trained_policy

    path, model = saved_policy
    spec = RunSpec(cluster="paper", rate_qps=0.08, queries=10, seed=3)
    a = load_policy(path)
    b = load_policy(path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    z = load_policy(zip_trained_policy(path, tmp_path / "p.zip"))
    assert list(scratch.iterdir()) == []  # the zip's extracted copy is gone once loaded
    da, ra = _decisions(a, spec)
    assert da == _decisions(b, spec)[0] == _decisions(z, spec)[0]
    assert ra["n_finished"] == 10
    # the loaded network equals the in-memory one on arbitrary observations
    obs = np.random.default_rng(0).uniform(-1, 1, size=(16, model.observation_space.shape[0])).astype(np.float32)
    obs[:, -model.observation_space.shape[0] + 33:] = np.abs(obs[:, -model.observation_space.shape[0] + 33:])
    from training.bc import learner_actions

    masks = np.ones((16, 5), dtype=bool)
    assert (learner_actions(model.policy, obs, masks) == learner_actions(a.net.policy, obs, masks)).all()


def test_policy_metadata_and_spec(saved_policy):
    path, _ = saved_policy
    meta = yaml.safe_load((path / "policy.yaml").read_text())
    assert meta["kind"] == "trained" and meta["env_id"] == "agentsched/Dispatch-v0" and meta["max_engines"] == 5
    assert {"version", "fingerprint"} <= set(meta["observation_spec"])
    assert (path / "config.yaml").exists()
    assert load_policy(path).spec()["kind"] == "trained"


def test_too_many_engines_is_one_clear_error(saved_policy):
    path, _ = saved_policy
    with pytest.raises(PolicyError, match="max_engines=5"):
        simulate(RunSpec(cluster="mixed-16", rate_qps=0.1, queries=3), load_policy(path))


def test_observation_spec_mismatch_is_one_clear_error(saved_policy, tmp_path):
    import shutil

    path, _ = saved_policy
    copy = tmp_path / "old"
    shutil.copytree(path, copy)
    meta = yaml.safe_load((copy / "policy.yaml").read_text())
    meta["observation_spec"]["fingerprint"] = "000000000000"
    (copy / "policy.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(PolicyError, match="observation spec"):
        load_policy(copy)


def test_not_a_policy_directory(tmp_path):
    with pytest.raises(PolicyError, match="not a trained policy"):
        load_policy(tmp_path)


def test_wrong_env_is_rejected(saved_policy):
    import gymnasium as gym

    import envs.gym  # noqa: F401

    path, _ = saved_policy
    policy = load_policy(path)
    env = gym.make("agentsched/Dispatch-v0", scenario={"queries": 4}, max_engines=7)
    with pytest.raises(PolicyError, match="observation shape"):
        policy.check_env(env)


class _Engine:
    def __init__(self, i, lat):
        self.engine_id, self.name, self.gpu, self.healthy = i, f"e{i}", "A100-80G", True
        self.num_running, self.num_waiting, self.kv_usage = i, 0, 0.1 * i
        self.outstanding_work_s, self.assigned_work_s, self.assigned_calls = 5.0 * i, 10.0 * i, i
        self.price_per_hour, self.max_num_seqs, self._lat = 2.0, 64, lat
        self.kv_capacity_tokens = 100_000

    prefix_cache_tokens = 0

    def expected_latency_s(self, step):
        return self._lat

    def cached_prefix_tokens(self, call):
        return 1000 if self.engine_id == 1 else 0

    def expected_call_latency_s(self, call):
        return self._lat * (0.7 if self.cached_prefix_tokens(call) else 1.0)


class _Workflow:
    workflow_id, tenant, arrival_time_s, slo_s, deadline_s, calls_done, expected_remaining_s = 0, "t", 0.0, 200.0, 200.0, 2, 50.0


class _Call:
    call_id, workflow_id, tenant, step, stage_index, fanout = 0, 0, "t", "revise", 1, 1
    input_tokens, output_tokens, ready_time_s, deadline_s, priority = 4000, 200, 10.0, 60.0, 0
    workflow_deadline_s = 200.0
    segments = ()


class _View:
    """A minimal non-simulator ClusterView (like the deploy gateway's)."""

    now_s = 10.0
    recent_arrival_rate_qps = 0.05
    slo_attainment_so_far = 1.0

    def __init__(self):
        self.engines = [_Engine(0, 5.0), _Engine(1, 8.0), _Engine(2, 12.0)]

    def workflow(self, workflow_id):
        return _Workflow()


def test_dispatch_from_any_cluster_view(saved_policy):
    policy = load_policy(saved_policy[0])
    view = _View()
    assert policy.dispatch(_Call(), view) in (0, 1, 2)
    view.engines[0].healthy = False
    view.engines[1].healthy = False
    assert policy.dispatch(_Call(), view) == 2  # only healthy engines are chosen
    assert isinstance(policy.queue_key(_Call(), view.engines[2]), float)


def _shipped() -> list[Path]:
    return sorted(p for p in PRETRAINED.iterdir() if (p / "policy.yaml").exists()) if PRETRAINED.exists() else []


def test_shipped_policies_are_the_recommended_one_and_at_most_two_trained() -> None:
    from policies.loader import LEARNED_POLICY, RECOMMENDED_POLICY, shipped_policies

    names = shipped_policies()
    assert RECOMMENDED_POLICY in names and LEARNED_POLICY in names and len(names) <= 3
    assert load_policy(RECOMMENDED_POLICY).spec()["kind"] == "heuristic"
    assert load_policy(LEARNED_POLICY).spec()["kind"] == "trained"


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.name)
def test_shipped_policy_is_small_and_complete(path):
    """One layout: policy, config, REPORT.md, eval_report.json (+ model.zip for a network)."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 2 * 1024 * 1024
    trained = yaml.safe_load((path / "policy.yaml").read_text())["kind"] == "trained"
    for name in ("policy.yaml", "config.yaml", "REPORT.md", "eval_report.json") + (("model.zip",) if trained else ()):
        assert (path / name).exists(), name
    assert load_policy(path.name).spec() == load_policy(path).spec()  # loads by name too


def _shipped_reports() -> list[tuple[Path, Path]]:
    """(policy, its report) of every shipped policy directory."""
    return [(p, p / "eval_report.json") for p in _shipped()]


@pytest.mark.parametrize("path,report_path", _shipped_reports(), ids=lambda p: p.name)
def test_shipped_policy_reproduces_its_report(path, report_path):
    """Re-run two seeds of the report's first two cells: simulation is deterministic, so the
    per-seed goodput must match the report (to float noise)."""
    from envs.sim.cells import Cell
    from training.evaluate import evaluate

    report = json.loads(report_path.read_text())
    for cell in report["cells"][:2]:
        c = {k: cell["cell"][k] for k in ("trace", "cluster", "rate_qps", "load", "slo_scale", "queries", "generated")}
        c["prefix_cache"] = cell["cell"].get("prefix_cache", False)  # reports from before the cache ran without one
        seeds = report["seeds"][:2]
        res = evaluate(str(path), [], [Cell(**c)], seeds)
        got = res["cells"][0]["policies"][res["policy"]]["metrics"]["goodput_qps"]["per_seed"]
        want = cell["policies"][report["policy"]]["metrics"]["goodput_qps"]["per_seed"][:2]
        assert all(math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-9) for g, w in zip(got, want)), (got, want)


def test_knobs_policy_sets_knobs_every_interval(tmp_path):
    """A (seeded, untrained) Knobs-v0 PPO policy saved and loaded runs in simulate: it picks knobs
    at the first decision and at every control tick, and the run is reproducible."""
    from training.config import TrainConfig
    from training.envs import make_vec_env
    from training.train import build_model, policy_meta, save_policy_dir

    cfg = TrainConfig.parse({"name": "kn", "env_id": "agentsched/Knobs-v0", "algo": "ppo", "n_envs": 1,
                             "vec_env": "dummy", "scenarios": [{"queries": 6}],
                             "env_kwargs": {"control_interval_s": 20.0},
                             "normalize": {"norm_obs": True}, "hyperparams": {"n_steps": 32, "batch_size": 32}})
    venv = make_vec_env(cfg)
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(venv)
    model = build_model(cfg, venv, None)
    out = save_policy_dir(tmp_path / "knobs", model, cfg, policy_meta(cfg, venv), venv)
    policy = load_policy(out)
    assert policy.interval_s == 20.0 and (out / "obs_rms.npz").exists()
    spec = RunSpec(cluster="paper", rate_qps=0.05, queries=8, seed=1)
    first, _ = _decisions(policy, spec)
    history = list(policy.knob_history)
    assert len(history) >= 3 and all(0.0 <= h["alpha"] <= 1.0 and 0.0 <= h["weight"] <= 1.0 for h in history)
    again, _ = _decisions(load_policy(out), spec)
    assert first == again

    # "both": a dispatch network's engines with this controller's knobs in the engines' queues
    (tmp_path / "both.yaml").write_text("kind: combined\nname: both\ndispatch: rr\nlocal: knobs\n")
    both = load_policy(tmp_path / "both.yaml")
    engines, _ = _decisions(both, spec)
    counts = np.bincount(engines, minlength=4)
    assert counts.max() - counts.min() <= 1  # dispatch is rr's (its order of ready calls is the controller's)
    assert len(both.local_policy.knob_history) >= 3  # the controller ran its intervals
    assert both.spec() == {"kind": "combined", "name": "both", "dispatch": "rr", "local": "knobs"}


def test_combined_policy_is_its_parts(tmp_path):
    """dispatch from one policy, queue order from the other: same run as the equivalent heuristic."""
    (tmp_path / "c.yaml").write_text("kind: combined\ndispatch: least-work\nlocal: rr+urgency\n")
    (tmp_path / "h.yaml").write_text("dispatch: {name: least-work}\nlocal: {name: urgency}\n")
    spec = RunSpec(cluster="paper", rate_qps=0.1, queries=12, seed=3)
    combined, _ = simulate(spec, load_policy(tmp_path / "c.yaml"))
    plain, _ = simulate(spec, load_policy(tmp_path / "h.yaml"))
    assert combined["slo_attainment"] == plain["slo_attainment"]
    assert combined["latency_p95_s"] == plain["latency_p95_s"] and combined["n_finished"] == plain["n_finished"]
    (tmp_path / "bad.yaml").write_text("kind: combined\ndispatch: rr\n")
    with pytest.raises(PolicyError, match="local: must name a policy"):
        load_policy(tmp_path / "bad.yaml")
