"""Training: a short end-to-end run (TensorBoard events, loadable policy), the warm start's agreement
with HexGen, config validation, evaluate's CIs and ratios, and tune-rl's seed protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from envs.sim.errors import UserError
from training.config import TEST_SEED_BASE, TUNE_SEED_BASE, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY_SCENARIO = {"trace": "chess_trace1", "cluster": "paper", "queries": 8, "rate_qps": 0.08}


def tiny_config(**overrides) -> TrainConfig:
    raw = {
        "name": "tiny", "algo": "maskable_ppo", "policy": "EngineScoringPolicy", "total_timesteps": 512,
        "n_envs": 1, "vec_env": "dummy", "scenarios": [TINY_SCENARIO],
        "env_kwargs": {"max_engines": 6},
        "hyperparams": {"n_steps": 128, "batch_size": 64, "n_epochs": 2, "learning_rate": 1e-4},
        "eval": {"freq_steps": 256, "seeds": [100_000], "baseline": "hexgen"},
        "checkpoint_freq_steps": 256,
        "warm_start": {"expert": "hexgen", "episodes": 2, "epochs": 2, "dagger_rounds": 1, "holdout_episodes": 1},
    }
    raw.update(overrides)
    return TrainConfig.parse(raw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from training.train import train

    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_config(), out, progress=False)
    return out, summary


def test_short_training_run_end_to_end(tiny_run):
    from envs.sim.scenario import RunSpec, simulate
    from policies import load_policy

    out, summary = tiny_run
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard events written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/goodput_qps", "baseline/goodput_qps", "eval/slo_attainment", "eval/latency_p95_s"} <= tags
    steps = [e.step for e in acc.Scalars("eval/goodput_qps")]
    assert steps[0] == 0 and steps[-1] >= 512  # evaluated before RL (warm-start level) and at the end
    assert list((out / "checkpoints").glob("*.zip"))
    policy = load_policy(out / "policy")
    result, _ = simulate(RunSpec(cluster="paper", rate_qps=0.05, queries=6, seed=200_000), policy)
    assert result["n_finished"] == 6
    assert summary["warm_start"]["holdout_agreement"] > 0.3


def test_warm_start_reproduces_hexgen_on_most_states():
    """BC on 3 HexGen episodes: the clone picks HexGen's engine on >= 75% of held-out states
    (measured: ~0.82 after 20 epochs; the shipped run, 12 episodes + DAgger: ~0.88)."""
    import torch

    from policies.loader import load_policy
    from training import bc
    from training.envs import make_single_env, make_vec_env
    from training.train import build_model

    torch.manual_seed(0)
    cfg = tiny_config(scenarios=[{**TINY_SCENARIO, "queries": 60, "rate_qps": 0.06}], env_kwargs={"max_engines": 4})
    venv = make_vec_env(cfg)
    model = build_model(cfg, venv, None)
    env = make_single_env(cfg)
    expert = load_policy("hexgen")
    data, _ = bc.collect(env, expert, [1, 2, 3], 0.99)
    holdout, _ = bc.collect(env, expert, [500], 0.99)
    bc.fit(model.policy, data, epochs=20, batch_size=64, learning_rate=3e-3, seed=0, value_pretrain=False)
    agreement = bc.agreement(model.policy, holdout)
    assert agreement >= 0.75, agreement


def test_scenario_experts_label_each_scenario_with_its_own_expert(monkeypatch):
    """`warm_start.scenario_experts`: every state of scenario i (here told apart by its number of
    queries) is labelled by expert i, in the expert episodes and in the DAgger rounds."""
    from policies.loader import load_policy
    from training import bc
    from training.envs import make_single_env, make_vec_env
    from training.train import build_model

    scenarios = [{**TINY_SCENARIO, "queries": 5}, {**TINY_SCENARIO, "queries": 7}]
    experts = ["rr", "least-work+workflow"]
    cfg = tiny_config(scenarios=scenarios, env_kwargs={"max_engines": 4},
                      warm_start={"scenario_experts": experts, "episodes": 4, "epochs": 1, "dagger_rounds": 1,
                                  "holdout_episodes": 2})
    seen = []
    real_collect = bc.collect

    def spy(env, expert, seeds, *args, **kwargs):
        data, metrics = real_collect(env, expert, seeds, *args, **kwargs)
        seen.extend((m["n_workflows"], expert.name) for m in metrics)
        return data, metrics

    monkeypatch.setattr(bc, "collect", spy)
    model = build_model(cfg, make_vec_env(cfg), None)
    report = bc.warm_start(model, lambda i: make_single_env(cfg, i), [load_policy(e) for e in experts], scenarios=2,
                           seeds=[1, 2, 3, 4], holdout_seeds=[5, 6], epochs=1, batch_size=64, learning_rate=1e-3,
                           dagger_rounds=1, value_pretrain=False, seed=0)
    assert report["expert"] == experts
    assert {n for n, _ in seen} == {5, 7} and len(seen) == 4 + 2 + 2
    assert all(name == experts[0 if n == 5 else 1] for n, name in seen), seen
    with pytest.raises(UserError, match="scenario_experts has 1 entries for 2 scenarios"):
        tiny_config(scenarios=scenarios, warm_start={"scenario_experts": ["rr"]})


def test_eval_seeds_must_not_overlap_training_seeds():
    with pytest.raises(UserError, match="overlap"):
        tiny_config(eval={"seeds": [5]})
    assert not {TUNE_SEED_BASE, TEST_SEED_BASE} & set(range(0, 100_000))


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: sac\nenv_id: agentsched/Dispatch-v0\n")
    with pytest.raises(UserError, match="does not fit"):
        TrainConfig.load(bad)
    with pytest.raises(UserError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_shipped_configs_parse():
    paths = sorted((ROOT / "training" / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        TrainConfig.load(path)


def test_evaluate_cli_writes_cis_and_ratios(tmp_path):
    from typer.testing import CliRunner

    from agentsched.cli import _register_all, app

    _register_all()
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["evaluate", "--policy", "hexgen", "--baselines", "rr,least-work", "--cluster", "paper",
                                   "--rate", "0.05", "--load", "constant,burst", "--seeds", "200000-200002",
                                   "--queries", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 2
    cell = results["cells"][0]
    m = cell["policies"]["hexgen"]["metrics"]["goodput_qps"]
    assert m["lo"] <= m["mean"] <= m["hi"] and len(m["per_seed"]) == 3
    r = cell["ratios"]["hexgen"]["rr"]["goodput_qps"]
    assert r["lo"] <= r["mean"] <= r["hi"]
    assert set(cell["ratios"]["hexgen"]) == {"rr", "least-work"}
    assert (out / "goodput_qps.png").exists() and (out / "table.md").exists()


def test_bootstrap_ratio_is_paired():
    from training.evaluate import bootstrap_ratio

    rng = np.random.default_rng(0)
    den = rng.uniform(0.1, 1.0, size=20)  # large seed-to-seed spread ...
    mean, lo, hi = bootstrap_ratio(1.2 * den, den, 0.95, rng)  # ... but an exact 20% gain on every seed
    assert mean == pytest.approx(1.2) and hi - lo < 1e-9


def test_bootstrap_mean_interval_follows_skew():
    """BCa (scipy.stats.bootstrap) bends the interval toward the long tail of right-skewed
    per-seed values, more than a plain percentile bootstrap does (on this sample: upper/lower
    half-widths 3.2 for BCa, 1.6 for percentile); one seed gives a point."""
    from training.evaluate import bootstrap_mean

    values = np.random.default_rng(3).lognormal(0.0, 1.0, size=30)
    mean, lo, hi = bootstrap_mean(values, 0.95, np.random.default_rng(0))
    assert lo < mean < hi and hi - mean > 2.0 * (mean - lo)
    assert bootstrap_mean(np.array([0.7]), 0.95, np.random.default_rng(0)) == (0.7, 0.7, 0.7)


def test_tune_rl_trial_config_uses_tuning_seeds():
    from training.tune import trial_config

    cfg = trial_config(tiny_config(), {"learning_rate": 3e-4, "n_steps": 64, "batch_size": 256}, 256,
                       [TUNE_SEED_BASE], "t")
    assert cfg.eval.seeds == [TUNE_SEED_BASE] and cfg.hyperparams["batch_size"] == 64


def test_train_cli_smoke_config(tmp_path):
    """`agentsched train` end to end through the CLI (flags override the config)."""
    from typer.testing import CliRunner

    from agentsched.cli import _register_all, app

    _register_all()
    out = tmp_path / "smoke"
    res = CliRunner().invoke(app, ["train", "--config", str(ROOT / "training" / "configs" / "smoke.yaml"), "--total-timesteps", "256",
                                   "--warm-start", "none", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "policy:" in res.output and (out / "policy" / "model.zip").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert "warm_start" not in summary and summary["total_timesteps"] == 256


@pytest.mark.slow
def test_dagger_with_a_lookahead_expert_distils_and_round_trips(tmp_path):
    """Expert iteration from the simulator-in-the-loop planner: DAgger rounds where the learner
    drives and `lookahead` labels the states it visits (tiny episodes: the planner costs tens of ms
    per decision); the distilled network saves and loads with identical decisions."""
    from envs.sim.scenario import RunSpec, simulate
    from policies.loader import load_policy
    from training import bc
    from training.envs import make_single_env, make_vec_env
    from training.train import build_model, policy_meta, save_policy_dir

    cfg = tiny_config(scenarios=[{**TINY_SCENARIO, "queries": 3, "rate_qps": 0.2}], env_kwargs={"max_engines": 4},
                      warm_start=None)
    venv = make_vec_env(cfg)
    model = build_model(cfg, venv, None)
    expert = load_policy("lookahead:least-work+workflow@horizon_s=5,samples=1,top_k=2")
    labels = []
    real_collect = bc.collect

    def spy(env, exp, seeds, *args, **kwargs):
        data, metrics = real_collect(env, exp, seeds, *args, **kwargs)
        learner = kwargs.get("learner", args[1] if len(args) > 1 else None)  # collect(env, expert, seeds, gamma, learner)
        labels.append((exp is expert, learner is not None, len(data)))
        return data, metrics

    bc.collect = spy
    try:
        report = bc.warm_start(model, lambda i: make_single_env(cfg, i), expert, scenarios=1, seeds=[1, 2],
                               holdout_seeds=[3], epochs=2, batch_size=32, learning_rate=3e-3, dagger_rounds=1,
                               value_pretrain=False, seed=0)
    finally:
        bc.collect = real_collect
    assert all(is_expert for is_expert, _, _ in labels)
    assert [learner_drove for _, learner_drove, _ in labels] == [False, False, False, True]  # 2 + holdout, DAgger
    assert report["rounds"][1]["samples"] > report["rounds"][0]["samples"]
    out = save_policy_dir(tmp_path / "distilled", model, cfg, policy_meta(cfg, venv), None)
    spec = RunSpec(cluster="paper", rate_qps=0.1, queries=5, seed=9)
    a, b = load_policy(out), load_policy(out)
    da = [c.engine_id for c in simulate(spec, a)[1].calls]
    assert da == [c.engine_id for c in simulate(spec, b)[1].calls]


@pytest.mark.slow
def test_planner_overrides_are_marked_and_weight_up_in_the_clone():
    """Distilling a planner: the states where `lookahead` overrode its base policy are marked (exactly
    those where its label is not the base's own choice on the same state), and `override_weight`
    makes the clone follow the planner on them more often than an unweighted fit does."""
    import torch

    from policies.loader import load_policy
    from training import bc
    from training.envs import make_single_env, make_vec_env
    from training.train import build_model

    # tight SLOs at a load the paper cluster cannot keep up with: placements change who meets them
    cfg = tiny_config(scenarios=[{**TINY_SCENARIO, "queries": 20, "rate_qps": 1.0, "slo_scale": 1.5}],
                      env_kwargs={"max_engines": 6}, warm_start=None)
    env = make_single_env(cfg)
    expert = load_policy("lookahead:least-work+workflow@horizon_s=60,samples=1,top_k=2,margin=0")
    base = load_policy("least-work+workflow")
    base_actions: list[int] = []
    label = env.unwrapped.heuristic_action

    def label_with_base_too(policy):
        base_actions.append(label(base))
        return label(policy)

    env.unwrapped.heuristic_action = label_with_base_too
    data, _ = bc.collect(env, expert, [1], 0.99)  # one episode: `changed` counts per episode
    overrides = [a != b for a, b in zip(data.actions, base_actions)]
    assert data.overrides == overrides and 0 < sum(overrides) < len(data) and sum(overrides) == expert.changed

    recall = {}
    for weight in (1.0, 20.0):
        torch.manual_seed(0)
        model = build_model(cfg, make_vec_env(cfg), None)
        bc.fit(model.policy, data, epochs=8, batch_size=64, learning_rate=3e-3, seed=0, value_pretrain=False,
               override_weight=weight)
        recall[weight], n = bc.agreement_on_overrides(model.policy, data)
        assert n == sum(overrides)
    assert recall[20.0] > recall[1.0], recall  # measured: 0.13 unweighted, 0.47 at 20x


def test_admission_training_run_with_schedules(tmp_path):
    """Dispatch-v1 end to end, tiny: BC warm start from an admission heuristic, then MaskablePPO with
    the entropy schedule (ent_coef decays to its final value) and the episode-length curriculum."""
    from policies.loader import load_policy
    from policies.trained import TrainedAdmissionPolicy
    from training.train import train

    expert = ROOT / "training" / "configs" / "experts" / "least-work+admit-paper.yaml"
    cfg = tiny_config(env_id="agentsched/Dispatch-v1", scenarios=[{**TINY_SCENARIO, "queries": 10, "rate_qps": 0.3}],
                      env_kwargs={"max_engines": 4, "local_order": "workflow-first", "differential": True},
                      hyperparams={"n_steps": 64, "batch_size": 32, "n_epochs": 1, "ent_coef": 0.02},
                      total_timesteps=256, ent_coef_final=0.0, curriculum_queries=[4], curriculum_fraction=0.5,
                      eval={"freq_steps": 256, "seeds": [100_000], "baseline": None},
                      warm_start={"expert": str(expert), "episodes": 1, "epochs": 1, "dagger_rounds": 0,
                                  "holdout_episodes": 1})
    summary = train(cfg, tmp_path, progress=False)
    assert "holdout_defer_agreement" in summary["warm_start"]
    for name in ("policy", "warm_start_policy", "final_policy"):
        assert isinstance(load_policy(tmp_path / name), TrainedAdmissionPolicy)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "tb" / "progress.csv")))
    ent = [float(r["train/ent_coef_scheduled"]) for r in rows if r.get("train/ent_coef_scheduled")]
    queries = [float(r["train/episode_queries"]) for r in rows if r.get("train/episode_queries")]
    assert ent[0] > ent[-1] and ent[-1] < 0.02
    assert queries[0] == 4 and queries[-1] == 10
    with pytest.raises(UserError, match="curriculum_queries"):
        train(tiny_config(curriculum_queries=[4], warm_start=None), tmp_path / "v0", progress=False)
