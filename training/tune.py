"""`agentsched tune-rl`: RL hyper-parameter search with a pruner; report on separate test seeds.

Protocol ("Hyperparameters in RL and how to tune them", Eimer et al. 2023): trials are scored on
*tuning* seeds only (a block of episode seeds disjoint from the training episodes); the chosen
configuration is then reported on *test* seeds that no trial ever saw, so the figure is not
inflated by the search itself. Each trial is a short `training.train.train` run whose evaluation
callback reports the eval metric to the tuner after every evaluation, so a bad trial is pruned
early (Optuna's median pruner; ASHA with Ray Tune).

Backends:
- optuna (default): trials run one after another in this process; the study is stored in SQLite
  in the run directory, so an interrupted search resumes.
- ray: trials run as Ray Tune trials (`OptunaSearch` + ASHA). Locally `ray.init()` starts a Ray
  instance on this machine; with `RAY_ADDRESS` set (or `ray.init(address=...)`), the same command
  schedules the trials on an existing Ray cluster. Ray's results go to `<out>/ray`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from policies.loader import load_policy
from training.callbacks import mean_metrics, run_policy
from training.config import TEST_SEED_BASE, TUNE_SEED_BASE, TrainConfig
from training.train import train

# The search space over PPO / MaskablePPO hyper-parameters (SAC keys for Knobs-v0 with SAC).
PPO_SPACE: dict[str, tuple] = {
    "learning_rate": ("loguniform", 1e-5, 1e-3),
    "n_steps": ("categorical", [256, 512, 1024]),
    "batch_size": ("categorical", [64, 128, 256]),
    "n_epochs": ("categorical", [3, 5, 10]),
    "gamma": ("categorical", [0.99, 0.995, 0.999]),
    "clip_range": ("categorical", [0.05, 0.1, 0.2]),
    "ent_coef": ("loguniform", 1e-6, 1e-2),
}
SAC_SPACE: dict[str, tuple] = {
    "learning_rate": ("loguniform", 1e-5, 1e-3),
    "batch_size": ("categorical", [64, 128, 256]),
    "gamma": ("categorical", [0.95, 0.99, 0.995]),
    "tau": ("categorical", [0.005, 0.02]),
}


def space_for(config: TrainConfig) -> dict[str, tuple]:
    return SAC_SPACE if config.algo == "sac" else PPO_SPACE


def suggest(trial: Any, space: dict[str, tuple]) -> dict[str, Any]:
    out = {}
    for name, spec in space.items():
        if spec[0] == "loguniform":
            out[name] = trial.suggest_float(name, spec[1], spec[2], log=True)
        else:
            out[name] = trial.suggest_categorical(name, spec[1])
    return out


def trial_config(base: TrainConfig, params: dict[str, Any], timesteps: int, tune_seeds: list[int], name: str) -> TrainConfig:
    hyper = {**base.hyperparams, **params}
    if "n_steps" in hyper and "batch_size" in hyper:
        # PPO needs the rollout (n_steps x n_envs) to be a multiple of the minibatch
        hyper["batch_size"] = min(hyper["batch_size"], hyper["n_steps"] * base.n_envs)
    raw = base.dump()
    raw.update(name=name, hyperparams=hyper, total_timesteps=timesteps, checkpoint_freq_steps=None)
    raw["eval"] = {**raw["eval"], "seeds": tune_seeds, "freq_steps": max(1, timesteps // 4)}
    return TrainConfig.parse(raw, source=name)


def evaluate_on_seeds(policy_dir: str | Path, config: TrainConfig, seeds: list[int]) -> dict[str, Any]:
    """Mean metrics of a trained policy and of the config's baseline on these seeds."""

    specs = [s.run_spec(seed) for s in config.eval_scenarios() for seed in seeds]
    out = {"seeds": seeds, "policy": mean_metrics(run_policy(load_policy(policy_dir), specs))}
    if config.eval.baseline:
        out["baseline"] = {"name": config.eval.baseline,
                           **mean_metrics(run_policy(load_policy(config.eval.baseline), specs))}
    return out


def _objective(base: TrainConfig, out: Path, timesteps: int, tune_seeds: list[int]) -> Callable[[Any], float]:
    import optuna


    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space_for(base))
        cfg = trial_config(base, params, timesteps, tune_seeds, f"{base.name}-trial{trial.number}")

        def report(step: int, metrics: dict[str, float]) -> bool:
            value = metrics[base.eval.metric]
            trial.report(0.0 if math.isnan(value) else value, step)
            return not trial.should_prune()

        summary = train(cfg, out / f"trial{trial.number}", progress=False, on_evaluation=report)
        trial.set_user_attr("policy", summary["policy"])
        if summary["stopped_early"]:
            raise optuna.TrialPruned()
        return float(summary["best_eval"]["score"])

    return objective


def _run_optuna(base: TrainConfig, out: Path, trials: int, timesteps: int, tune_seeds: list[int],
                sampler_seed: int, console: Any) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=base.name, storage=f"sqlite:///{(out / 'optuna.db').resolve()}", load_if_exists=True,
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    remaining = max(0, trials - len(study.trials))
    if console is not None:
        console.print(f"tune-rl: {remaining} trials of {timesteps} steps, tuning seeds {tune_seeds}")
    study.optimize(_objective(base, out, timesteps, tune_seeds), n_trials=remaining)
    best = study.best_trial
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params} for t in study.trials]
    return best.params, best.user_attrs["policy"], rows


def _run_ray(base: TrainConfig, out: Path, trials: int, timesteps: int, tune_seeds: list[int],
             sampler_seed: int, console: Any) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    if not ray.is_initialized():
        # RAY_ADDRESS (if set) points ray.init() at an existing cluster; otherwise a local instance
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False)
    metric = base.eval.metric
    base_raw = base.dump()
    trial_root = out.resolve()

    def trainable(params: dict[str, Any]) -> None:
        from training.config import TrainConfig as _TC

        cfg = trial_config(_TC.parse(base_raw), params, timesteps, tune_seeds, f"{base.name}-ray")
        trial_dir = trial_root / f"ray-trial-{tune.get_context().get_trial_id()}"

        def report(step: int, metrics: dict[str, float]) -> bool:
            tune.report({metric: 0.0 if math.isnan(metrics[metric]) else metrics[metric], "timesteps": step,
                         "policy": str(trial_dir / "policy")})
            return True  # ASHA stops the trial from the outside

        train(cfg, trial_dir, progress=False, on_evaluation=report)

    space = {}
    for name, spec in space_for(base).items():
        space[name] = tune.loguniform(spec[1], spec[2]) if spec[0] == "loguniform" else tune.choice(spec[1])
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": base.n_envs}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=trials,
                                    search_alg=OptunaSearch(seed=sampler_seed),
                                    scheduler=ASHAScheduler(time_attr="timesteps", max_t=timesteps,
                                                            grace_period=max(1, timesteps // 4))),
        run_config=tune.RunConfig(name=base.name, storage_path=str((out / "ray").resolve())),
    )
    results = tuner.fit()
    best = results.get_best_result(metric=metric, mode="max", scope="all")
    rows = [{"params": r.config, "value": (r.metrics or {}).get(metric)} for r in results]
    return best.config, best.metrics["policy"], rows


def tune_rl(base: TrainConfig, out_dir: str | Path, trials: int = 10, timesteps: int | None = None,
            backend: str = "optuna", n_tune_seeds: int = 4, n_test_seeds: int = 8, sampler_seed: int = 0,
            console: Any = None) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timesteps = timesteps or base.total_timesteps
    tune_seeds = [TUNE_SEED_BASE + i for i in range(n_tune_seeds)]
    test_seeds = [TEST_SEED_BASE + i for i in range(n_test_seeds)]
    assert not set(tune_seeds) & set(test_seeds)
    runner = _run_ray if backend == "ray" else _run_optuna
    params, policy_dir, rows = runner(base, out, trials, timesteps, tune_seeds, sampler_seed, console)
    report = {"backend": backend, "trials": rows, "best_params": params, "best_policy": policy_dir,
              "tune_seeds": tune_seeds, "test_seeds": test_seeds,
              "test": evaluate_on_seeds(policy_dir, base, test_seeds)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    best_cfg = trial_config(base, params, base.total_timesteps, list(base.eval.seeds), f"{base.name}-tuned")
    (out / "best_config.yaml").write_text(__import__("yaml").safe_dump(best_cfg.dump(), sort_keys=False))
    return report


__all__ = ["tune_rl", "PPO_SPACE", "SAC_SPACE"]
