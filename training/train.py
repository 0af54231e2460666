"""`agentsched train`: one SB3 run from a `TrainConfig`, written to a run directory.

Run directory layout:
    config.yaml           the resolved config (flags applied)
    tb/                   TensorBoard events (+ progress.csv): rollout/*, train/*, eval/*, baseline/*,
                          warm_start/*, and a Custom Scalars layout putting policy and baseline on one chart
    checkpoints/          periodic model checkpoints
    policy/               the best policy on the eval seeds (a trained policy directory: load it with
                          --policy runs/NAME/policy)
    final_policy/         the policy at the end of training
    eval_history.json     every evaluation (policy and baseline metrics)
    summary.json          timings, warm-start report, best score
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from envs.gym.admission_env import DEFAULT_BASE_POLICY
from envs.observation.knobs import DEFAULT_CONTROL_INTERVAL_S
from envs.sim.errors import UserError
from policies.loader import load_policy
from policies.trained import (
    TrainedAdmissionPolicy,
    TrainedDispatchPolicy,
    TrainedKnobsPolicy,
    _Network,
    algorithm_class,
    save_trained_policy,
)
from training import bc
from training.callbacks import CurriculumCallback, EntropyScheduleCallback, SimEvalCallback, write_custom_scalars
from training.config import ADMISSION_ENV_ID, DISPATCH_ENV_ID, DISPATCH_ENV_IDS, TRAIN_SEED_BASE, TRAIN_SEED_COUNT, TrainConfig
from training.envs import make_single_env, make_vec_env, max_engines_for
from training.input_baseline import InputBaselineMaskablePPO
from training.networks import N_ENGINE_FEATURES, POLICY_CLASSES, resolve_policy


def _say(console: Any) -> Callable[[str], None]:
    if console is None:
        return lambda s: None
    return lambda s: console.print(s)


def build_model(config: TrainConfig, venv: Any, tensorboard_dir: Path | None) -> Any:
    cls = algorithm_class(config.algo)
    extra: dict[str, Any] = {}
    if config.baseline == "input_dependent":  # a MaskablePPO that trains the same network (input_baseline.py)
        cls, extra = InputBaselineMaskablePPO, {"rollouts_per_input": config.rollouts_per_input}
    policy_kwargs = dict(config.policy_kwargs)
    if config.policy in POLICY_CLASSES:  # the engine scorer needs the row width of this observation spec
        policy_kwargs.setdefault("engine_features", N_ENGINE_FEATURES)
        if config.env_id == ADMISSION_ENV_ID:
            policy_kwargs["scorer_admission"] = True  # the defer logit
    try:
        return cls(resolve_policy(config.policy, config.algo), venv, seed=config.seed, device="cpu", verbose=0,
                   policy_kwargs=policy_kwargs or None, **extra, **config.hyperparams)
    except TypeError as exc:
        raise UserError(f"config {config.name}: hyperparams: {exc} (see the {cls.__name__} documentation)") from None


def policy_meta(config: TrainConfig, venv: Any) -> dict[str, Any]:
    """The metadata `policies.trained` needs to rebuild the policy outside training."""

    meta: dict[str, Any] = {"env_id": config.env_id, "algo": config.algo,
                            "observation_shape": list(venv.observation_space.shape)}
    if config.env_id in DISPATCH_ENV_IDS:
        local = config.env_kwargs.get("local_order", "urgency")
        meta["max_engines"] = max_engines_for(config)
        meta["local"] = {"name": local if isinstance(local, str) else "urgency",
                         "knobs": dict(config.env_kwargs.get("local_knobs") or {})}
        if config.env_id == ADMISSION_ENV_ID:
            meta["base_policy"] = load_policy(config.env_kwargs.get("base_policy", DEFAULT_BASE_POLICY)).spec()
    else:
        meta["max_engines"] = None
        meta["heuristic"] = {"base": config.env_kwargs.get("policy", "hexgen")}
        meta["interval_s"] = float(config.env_kwargs.get("control_interval_s", DEFAULT_CONTROL_INTERVAL_S))
        meta["env_kwargs"] = {k: v for k, v in config.env_kwargs.items() if k in ("knobs", "policy")}
    return meta


def in_memory_policy(model: Any, meta: dict[str, Any], vecnorm: Any = None) -> Any:
    """The live model as a `Policy` (shares its weights), for evaluation during training."""

    obs_rms = None
    if vecnorm is not None and vecnorm.norm_obs:
        obs_rms = {"mean": vecnorm.obs_rms.mean.astype(np.float32), "var": vecnorm.obs_rms.var.astype(np.float32),
                   "clip_obs": np.float32(vecnorm.clip_obs), "epsilon": np.float32(vecnorm.epsilon)}
    net = _Network(model, obs_rms)
    cls = {DISPATCH_ENV_ID: TrainedDispatchPolicy, ADMISSION_ENV_ID: TrainedAdmissionPolicy}.get(meta["env_id"],
                                                                                         TrainedKnobsPolicy)
    return cls(Path("<training>"), {**meta, "name": "training"}, net)


def save_policy_dir(out: Path, model: Any, config: TrainConfig, meta: dict[str, Any], vecnorm: Any,
                    extra: dict[str, Any] | None = None) -> Path:
    if out.exists():
        shutil.rmtree(out)
    extra_meta = {k: v for k, v in meta.items() if k in ("heuristic", "interval_s", "env_kwargs", "base_policy")}
    extra_meta.update(extra or {})
    save_trained_policy(out, model, env_id=meta["env_id"], algo=meta["algo"], max_engines=meta.get("max_engines"),
                        observation_shape=meta["observation_shape"], local=meta.get("local"),
                        obs_rms=vecnorm if vecnorm is not None and vecnorm.norm_obs else None,
                        config=config.dump(), name=config.name, extra=extra_meta)
    return out


def eval_specs(config: TrainConfig) -> list[Any]:
    return [s.run_spec(seed) for s in config.eval_scenarios() for seed in config.eval.seeds]


def train(config: TrainConfig, out_dir: str | Path, progress: bool = True, console: Any = None,
          on_evaluation: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
    """Train per `config` into `out_dir`; returns the summary (also written to summary.json)."""
    import torch
    from stable_baselines3.common.callbacks import CheckpointCallback
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import VecNormalize


    say = _say(console)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(__import__("yaml").safe_dump(config.dump(), sort_keys=False))
    torch.set_num_threads(1)  # small MLPs; the env processes need the cores
    set_random_seed(config.seed)
    config.scenario_objects()  # validate scenarios before spawning processes
    if config.warm_start is not None and config.env_id not in DISPATCH_ENV_IDS:
        raise UserError("warm_start: behaviour cloning needs a discrete expert action; use it with agentsched/Dispatch-v0 "
                        "(Knobs-v0 starts at the heuristic's default knobs already)")
    if config.warm_start is not None and config.normalize is not None and config.normalize.norm_obs:
        raise UserError("warm_start with normalize.norm_obs: the cloned network would see shifting inputs; "
                        "drop norm_obs (Dispatch observations are already scaled) or the warm start")

    started = time.time()
    venv = make_vec_env(config)
    vecnorm = None
    if config.normalize is not None:
        gamma = config.normalize.gamma or float(config.hyperparams.get("gamma", 0.99))
        venv = vecnorm = VecNormalize(venv, norm_obs=config.normalize.norm_obs, norm_reward=config.normalize.norm_reward,
                                      clip_obs=config.normalize.clip_obs, gamma=gamma)
    model = build_model(config, venv, out / "tb")
    model.set_logger(configure(str(out / "tb"), ["tensorboard", "csv"]))
    write_custom_scalars(model, config.eval.baseline)
    meta = policy_meta(config, venv)
    summary: dict[str, Any] = {"name": config.name, "env_id": config.env_id, "algo": config.algo,
                               "total_timesteps": config.total_timesteps, "seed": config.seed}

    if config.warm_start is not None:
        ws = config.warm_start
        expert = [load_policy(e) for e in ws.scenario_experts] if ws.scenario_experts else load_policy(ws.expert)
        rng = np.random.default_rng([config.seed, 11])
        seeds = [int(s) for s in rng.choice(TRAIN_SEED_COUNT, size=ws.episodes + ws.holdout_episodes, replace=False)
                 + TRAIN_SEED_BASE]
        t0 = time.time()
        report = bc.warm_start(
            model, lambda i: make_single_env(config, i), expert, scenarios=len(config.scenarios),
            seeds=seeds[:ws.episodes], holdout_seeds=seeds[ws.episodes:], epochs=ws.epochs,
            batch_size=ws.batch_size, learning_rate=ws.learning_rate, dagger_rounds=ws.dagger_rounds,
            value_pretrain=ws.value_pretrain, seed=config.seed, log=None, progress=say, defer_weight=ws.defer_weight,
            override_weight=ws.override_weight)
        report["wall_s"] = time.time() - t0
        model.logger.record("warm_start/holdout_agreement", report["holdout_agreement"])
        model.logger.record("warm_start/samples", report["rounds"][-1]["samples"])
        summary["warm_start"] = report
        # the clone before any RL update, kept so the RL stage's own gain can be measured against it
        save_policy_dir(out / "warm_start_policy", model, config, meta, vecnorm, extra={"selected": "warm start (before RL)"})

    baseline = load_policy(config.eval.baseline) if config.eval.baseline else None
    best_dir = out / "policy"

    def on_new_best(m: Any) -> None:
        save_policy_dir(best_dir, m, config, meta, vecnorm, extra={"selected": "best on eval seeds"})

    eval_cb = SimEvalCallback(eval_specs(config), lambda m: in_memory_policy(m, meta, vecnorm),
                              eval_freq=config.eval.freq_steps, baseline=baseline, metric=config.eval.metric,
                              on_new_best=on_new_best, log_path=out / "eval_history.json", on_evaluation=on_evaluation)
    callbacks = [eval_cb]
    if config.ent_coef_final is not None:
        callbacks.append(EntropyScheduleCallback(float(config.hyperparams.get("ent_coef", 0.0)), config.ent_coef_final))
    if config.curriculum_queries:
        if config.env_id != ADMISSION_ENV_ID:
            raise UserError("curriculum_queries: the episode-length curriculum needs agentsched/Dispatch-v1 (set_queries)")
        final = [s.queries for s in config.scenario_objects()]
        callbacks.append(CurriculumCallback(config.curriculum_queries, max(final), config.curriculum_fraction,
                                            config.total_timesteps))
    if config.checkpoint_freq_steps:
        callbacks.append(CheckpointCallback(save_freq=max(1, config.checkpoint_freq_steps // config.n_envs),
                                            save_path=str(out / "checkpoints"), name_prefix="model",
                                            save_vecnormalize=vecnorm is not None))
    say(f"training {config.algo} on {config.env_id} for {config.total_timesteps} steps, {config.n_envs} envs "
        f"-> {out} (tensorboard --logdir {out / 'tb'})")
    t0 = time.time()
    try:
        model.learn(total_timesteps=config.total_timesteps, callback=callbacks, progress_bar=progress)
    finally:
        venv.close()
    summary["train_wall_s"] = time.time() - t0
    save_policy_dir(out / "final_policy", model, config, meta, vecnorm, extra={"selected": "end of training"})
    if not best_dir.exists():
        shutil.copytree(out / "final_policy", best_dir)
    summary["best_eval"] = {"metric": config.eval.metric, "score": eval_cb.best_score,
                            "baseline": eval_cb.baseline_metrics}
    summary["eval_history"] = eval_cb.history
    summary["stopped_early"] = eval_cb.stopped_early
    summary["wall_s"] = time.time() - started
    summary["policy"] = str(best_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
