"""`agentsched tune-rl`: RL hyper-parameter search (Optuna/ASHA, PBT, PB2); report on separate test seeds.

Protocol ("Hyperparameters in RL and how to tune them", Eimer et al. 2023): trials are scored on
*tuning* seeds only (a block of episode seeds disjoint from the training episodes); the chosen
configuration is then reported on *test* seeds that no trial ever saw, so the figure is not
inflated by the search itself. Each trial is a short `training.train.train` run whose evaluation
callback reports the eval metric to the tuner after every evaluation, so a bad trial is pruned
early (Optuna's median pruner; ASHA with Ray Tune).

Searches (`--search`):
- optuna (default): TPE over `PPO_SPACE`, each trial a fresh run, bad trials pruned. Backends:
  optuna (trials one after another in this process; the study is stored in SQLite in the run
  directory, so an interrupted search resumes) or ray (Ray Tune trials, `OptunaSearch` + ASHA).
- pbt: population-based training (Jaderberg et al. 2017; Ray Tune's `PopulationBasedTraining`):
  `trials` runs train side by side; every `perturbation_interval` steps each reports its eval
  score on the tuning seeds, and the bottom quarter copies the weights of a top-quarter run
  (exploit) and perturbs its hyper-parameters (explore), kept within `PBT_BOUNDS`. So a run's
  hyper-parameters are a schedule, not a constant: the report gives each run's values in force
  at its best evaluation, and that evaluation's policy.
- pb2: the same, with the explore step chosen by a Gaussian-process bandit over the recent
  improvements of the population (Parker-Holder et al. 2020, "Provably Efficient Online
  Hyperparameter Optimization with Population-Based Bandits"; Ray Tune's `PB2`, which needs
  scikit-learn), designed for the small populations a single machine affords.
PBT and PB2 always run on Ray Tune (they need many trials alive at once); they change only the
hyper-parameters that can change in the middle of a run (`PBT_BOUNDS`: learning rate, entropy
coefficient, clip range); the rest stay at the base config's values. Locally `ray.init()` starts
a Ray instance on this machine; with `RAY_ADDRESS` set, the same command schedules the trials on
an existing Ray cluster. Ray's results go to `<out>/ray`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from envs.sim.errors import UserError
from policies.loader import load_policy
from policies.trained import algorithm_class
from training.callbacks import mean_metrics, run_policy
from training.config import TEST_SEED_BASE, TUNE_SEED_BASE, TrainConfig
from training.envs import make_vec_env
from training.train import build_model, eval_specs, in_memory_policy, policy_meta, save_policy_dir, train

SEARCHES = ("optuna", "pbt", "pb2")

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


# What PBT/PB2 may change in the middle of a run (a new value takes effect at the next update):
# (low, high), searched log-uniformly.
PBT_BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "ppo": {"learning_rate": (1e-5, 1e-3), "ent_coef": (1e-6, 1e-2), "clip_range": (0.05, 0.3)},
    "sac": {"learning_rate": (1e-5, 1e-3)},
}
PBT_BOUNDS["maskable_ppo"] = PBT_BOUNDS["ppo"]
# Evaluations (= chances to exploit and explore) per PBT/PB2 trial.
PBT_ROUNDS = 4


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


def clip_to_bounds(config: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """PBT's explore step multiplies a value by 0.8 or 1.2, which can leave its range; keep it inside."""
    for name, (lo, hi) in bounds.items():
        if name in config:
            config[name] = min(hi, max(lo, float(config[name])))
    return config


def _load_model(config: TrainConfig, path: Path, venv: Any, params: dict[str, Any]) -> Any:
    """A checkpointed model with this trial's (possibly perturbed) hyper-parameters."""
    # replaced before SB3 rebuilds its schedules, so the new learning rate and clip range take effect
    return algorithm_class(config.algo).load(path, env=venv, device="cpu", custom_objects=dict(params))


def _population_trainable(base_raw: dict[str, Any], timesteps: int, tune_seeds: list[int], trial_root: Path,
                          metric: str) -> Callable[[dict[str, Any]], None]:
    """A Ray Tune function trainable for PBT/PB2: trains in `PBT_ROUNDS` segments, and after each
    reports the eval score on the tuning seeds with a checkpoint (the weights) that a worse trial
    may restore with perturbed hyper-parameters."""

    def trainable(params: dict[str, Any]) -> None:
        import torch
        from ray import tune
        from stable_baselines3.common.vec_env import VecNormalize

        torch.set_num_threads(1)
        cfg = trial_config(TrainConfig.parse(base_raw), params, timesteps, tune_seeds, f"{base_raw['name']}-pbt")
        trial_dir = trial_root / f"pbt-trial-{tune.get_context().get_trial_id()}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        venv = make_vec_env(cfg)
        vecnorm = None
        if cfg.normalize is not None:
            venv = vecnorm = VecNormalize(venv, norm_obs=cfg.normalize.norm_obs, norm_reward=cfg.normalize.norm_reward,
                                          clip_obs=cfg.normalize.clip_obs)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                if vecnorm is not None:
                    venv = vecnorm = VecNormalize.load(str(Path(d) / "vecnormalize.pkl"), venv.venv)
                model = _load_model(cfg, Path(d) / "model.zip", venv, params)
        else:
            model = build_model(cfg, venv, None)
        meta = policy_meta(cfg, venv)
        specs = eval_specs(cfg)
        segment = max(1, timesteps // PBT_ROUNDS)
        try:
            while model.num_timesteps < timesteps:
                model.learn(total_timesteps=min(segment, timesteps - model.num_timesteps), reset_num_timesteps=False)
                score = mean_metrics(run_policy(in_memory_policy(model, meta, vecnorm), specs))[metric]
                policy_dir = save_policy_dir(trial_dir / f"policy-{model.num_timesteps}", model, cfg, meta, vecnorm,
                                             extra={"selected": f"{metric} on tuning seeds at {model.num_timesteps} steps"})
                with tempfile.TemporaryDirectory() as d:
                    model.save(Path(d) / "model.zip")
                    if vecnorm is not None:
                        vecnorm.save(str(Path(d) / "vecnormalize.pkl"))
                    tune.report({metric: 0.0 if math.isnan(score) else score, "timesteps": model.num_timesteps,
                                 "policy": str(policy_dir), **{k: float(params[k]) for k in params}},
                                checkpoint=tune.Checkpoint.from_directory(d))
        finally:
            venv.close()

    return trainable


def _run_population(base: TrainConfig, out: Path, trials: int, timesteps: int, tune_seeds: list[int],
                    sampler_seed: int, console: Any, search: str) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2
    from ray.tune.search.basic_variant import BasicVariantGenerator

    bounds = PBT_BOUNDS[base.algo]
    interval = max(1, timesteps // PBT_ROUNDS)
    if search == "pb2":
        scheduler = PB2(time_attr="timesteps", perturbation_interval=interval,
                        hyperparam_bounds={k: list(v) for k, v in bounds.items()}, quantile_fraction=0.25)
    else:
        scheduler = PopulationBasedTraining(
            time_attr="timesteps", perturbation_interval=interval, quantile_fraction=0.25, resample_probability=0.25,
            hyperparam_mutations={k: tune.loguniform(lo, hi) for k, (lo, hi) in bounds.items()},
            custom_explore_fn=lambda config: clip_to_bounds(config, bounds))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False)
    if console is not None:
        console.print(f"tune-rl: {search} over {trials} runs of {timesteps} steps ({PBT_ROUNDS} rounds), "
                      f"tuning seeds {tune_seeds}")
    metric = base.eval.metric
    trainable = _population_trainable(base.dump(), timesteps, tune_seeds, out.resolve(), metric)
    # every member of the population must be alive at once (exploit copies a live run's weights)
    cpu_per_trial = min(float(base.n_envs), max(0.1, (os.cpu_count() or 1) / trials))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpu_per_trial}),
        # the population's starting points: log-uniform draws, seeded
        param_space={k: tune.loguniform(lo, hi) for k, (lo, hi) in bounds.items()},
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler, num_samples=trials,
                                    search_alg=BasicVariantGenerator(random_state=sampler_seed)),
        run_config=tune.RunConfig(name=f"{base.name}-{search}", storage_path=str((out / "ray").resolve())),
    )
    results = tuner.fit()
    rows, best_row = [], None
    for r in results:
        history = r.metrics_dataframe
        if history is None or history.empty:
            continue
        top = history.loc[history[metric].idxmax()]
        # the hyper-parameters in force when the best score was reached (PBT/PB2 change them during a run)
        row = {"params": {k: float(top[k]) for k in bounds if k in top}, "value": float(top[metric]),
               "at_timesteps": int(top["timesteps"]), "policy": str(top["policy"]),
               "history": [{"timesteps": int(t), metric: float(v)} for t, v in zip(history["timesteps"], history[metric])]}
        rows.append(row)
        if best_row is None or row["value"] > best_row["value"]:
            best_row = row
    if best_row is None:
        raise UserError(f"--search {search}: no trial reported a score (see {out / 'ray'})")
    return best_row["params"], best_row["policy"], rows


def tune_rl(base: TrainConfig, out_dir: str | Path, trials: int = 10, timesteps: int | None = None,
            backend: str = "optuna", n_tune_seeds: int = 4, n_test_seeds: int = 8, sampler_seed: int = 0,
            console: Any = None, search: str = "optuna") -> dict[str, Any]:
    if search not in SEARCHES:
        raise UserError(f"--search: unknown search {search!r} (use {', '.join(SEARCHES)})")
    if search != "optuna" and base.warm_start is not None:
        raise UserError(f"--search {search}: the config's warm_start is not supported (population runs start from "
                        f"scratch); drop warm_start from the config or use --search optuna")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timesteps = timesteps or base.total_timesteps
    tune_seeds = [TUNE_SEED_BASE + i for i in range(n_tune_seeds)]
    test_seeds = [TEST_SEED_BASE + i for i in range(n_test_seeds)]
    assert not set(tune_seeds) & set(test_seeds)
    if search != "optuna":
        params, policy_dir, rows = _run_population(base, out, trials, timesteps, tune_seeds, sampler_seed, console,
                                                   search)
        backend = "ray"
    else:
        runner = _run_ray if backend == "ray" else _run_optuna
        params, policy_dir, rows = runner(base, out, trials, timesteps, tune_seeds, sampler_seed, console)
    report = {"search": search, "backend": backend, "trials": rows, "best_params": params, "best_policy": policy_dir,
              "tune_seeds": tune_seeds, "test_seeds": test_seeds, "timesteps_per_trial": timesteps,
              "test": evaluate_on_seeds(policy_dir, base, test_seeds)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    best_cfg = trial_config(base, params, base.total_timesteps, list(base.eval.seeds), f"{base.name}-tuned")
    (out / "best_config.yaml").write_text(yaml.safe_dump(best_cfg.dump(), sort_keys=False))
    return report


__all__ = ["tune_rl", "PBT_BOUNDS", "PPO_SPACE", "SAC_SPACE", "SEARCHES"]
