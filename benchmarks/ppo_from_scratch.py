"""From-scratch PPO on a benchmark id: how far plain RL gets in a stated budget (no warm start).

MaskablePPO with the project's engine-scoring network (`training.networks`, the architecture of
the shipped dispatch configs) on `agentsched/Dispatch-<cluster>-<shape>-v1` training episodes
(`split="train"`), randomly initialised. Every `--eval-every` steps the current policy runs
deterministically on `--eval-seeds` episodes of the evaluation block (`envs.seeds`), next to the
best heuristic (least-work+workflow) on the same episodes (`training.callbacks.SimEvalCallback`);
TensorBoard logs in `<run>/tb`, the curve in `<run>/eval_history.json` (the layout of `agentsched
train`, so benchmarks/train_curves.py plots it). At the end the best policy (by eval goodput)
runs on the id's test episodes, and its mean is compared with the reference scores
(`envs.gym.benchmark.reference_scores`).

Run (the budget: minutes per 10k steps on a loaded 2-core machine):
    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/ppo_from_scratch.py \\
        --env-id agentsched/Dispatch-paper-heavy-v1 --timesteps 100000 --out runs/ppo-from-scratch-paper-heavy
    PYTHONPATH=. .venv/bin/python benchmarks/train_curves.py runs/ppo-from-scratch-paper-heavy \\
        --reference agentsched/Dispatch-paper-heavy-v1 --out experiments/ppo-from-scratch/paper-heavy.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import typer
from sb3_contrib import MaskablePPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import SubprocVecEnv

import envs.gym  # noqa: F401  (registers the benchmark ids)
from agentsched.cli import run_script
from envs import DISPATCH_ENV_ID
from envs.gym.benchmark import BENCHMARK_ENV_IDS, LOCAL_KNOBS, LOCAL_ORDER, reference_scores
from envs.seeds import EVAL_SEED_BASE
from policies import load_policy
from policies.trained import save_trained_policy
from training.callbacks import SimEvalCallback, run_policy, write_custom_scalars
from training.evaluate import bootstrap_mean
from training.networks import N_ENGINE_FEATURES, resolve_policy
from training.train import in_memory_policy

BASELINE = "least-work+workflow"
# The shipped dispatch configs' PPO settings (training/configs/dispatch-overload.yaml), with the
# from-scratch changes a random start needs: a larger learning rate, clip range and some entropy.
HYPERPARAMS: dict[str, Any] = {"learning_rate": 3e-4, "n_steps": 1024, "batch_size": 256, "n_epochs": 5,
                               "gamma": 0.995, "gae_lambda": 0.95, "clip_range": 0.2, "ent_coef": 0.01,
                               "vf_coef": 0.5}
POLICY_KWARGS: dict[str, Any] = {"scorer_hidden": 64, "scorer_context": 32, "engine_features": N_ENGINE_FEATURES}

app = typer.Typer(add_completion=False)


@app.command()
def main(
    env_id: str = typer.Option("agentsched/Dispatch-paper-heavy-v1", help="a benchmark id"),
    timesteps: int = typer.Option(100_000, min=1, help="env steps (the budget)"),
    n_envs: int = typer.Option(2, min=1, help="parallel envs (subprocesses)"),
    eval_every: int = typer.Option(20_000, min=1, help="env steps between evaluations"),
    eval_seeds: int = typer.Option(2, min=1, help="evaluation episodes (from the eval seed block)"),
    test_seeds: int = typer.Option(10, min=1, help="test episodes the best policy is reported on"),
    seed: int = typer.Option(0, help="seed of the network and the env draws"),
    out: Path = typer.Option(None, help="run directory (default runs/ppo-from-scratch-<id name>)"),
) -> None:
    """Train MaskablePPO from scratch on a benchmark id and report it against the reference scores."""
    if env_id not in BENCHMARK_ENV_IDS:
        raise typer.BadParameter(f"not a benchmark id (use one of {', '.join(BENCHMARK_ENV_IDS)})", param_hint="--env-id")
    out = out or Path("runs") / f"ppo-from-scratch-{env_id.split('/')[1].removeprefix('Dispatch-')}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.time()
    venv = make_vec_env(f"envs.gym:{env_id}", n_envs=n_envs, seed=seed, vec_env_cls=SubprocVecEnv if n_envs > 1 else None,
                        env_kwargs={"render_mode": None})
    probe = gym.make(env_id).unwrapped
    model = MaskablePPO(resolve_policy("EngineScoringPolicy", "maskable_ppo"), venv, seed=seed, device="cpu", verbose=0,
                        policy_kwargs=dict(POLICY_KWARGS), **HYPERPARAMS)
    model.set_logger(configure(str(out / "tb"), ["tensorboard", "csv"]))
    write_custom_scalars(model, BASELINE)
    local = {"name": LOCAL_ORDER, "knobs": dict(LOCAL_KNOBS)}
    meta = {"env_id": DISPATCH_ENV_ID, "algo": "maskable_ppo", "observation_shape": list(venv.observation_space.shape),
            "max_engines": probe.max_engines, "local": local}
    best_dir = out / "policy"

    def save(m: Any) -> None:
        save_trained_policy(best_dir, m, env_id=DISPATCH_ENV_ID, algo="maskable_ppo", max_engines=probe.max_engines,
                            observation_shape=meta["observation_shape"], local=local, name=out.name,
                            config={"benchmark_env_id": env_id, "hyperparams": HYPERPARAMS, "timesteps": timesteps},
                            extra={"selected": "best on eval seeds", "benchmark_env_id": env_id})

    specs = [probe.run_spec(EVAL_SEED_BASE + i) for i in range(eval_seeds)]
    callback = SimEvalCallback(specs, lambda m: in_memory_policy(m, meta), eval_freq=eval_every,
                               baseline=load_policy(BASELINE), on_new_best=save, log_path=out / "eval_history.json",
                               verbose=1)
    try:
        model.learn(total_timesteps=timesteps, callback=callback, progress_bar=False)
    finally:
        venv.close()
    train_wall_s = time.time() - started
    policy = load_policy(best_dir)
    test = [probe.run_spec(s) for s in probe.test_seeds[:test_seeds]]
    goodput = np.array([r["goodput_qps"] for r in run_policy(policy, test)])
    mean, lo, hi = bootstrap_mean(goodput, 0.95, np.random.default_rng(0))
    refs = reference_scores(env_id)
    best_heuristic = float(np.mean(refs[BASELINE]["per_seed"][:test_seeds]))
    summary = {"env_id": env_id, "timesteps": timesteps, "n_envs": n_envs, "seed": seed, "hyperparams": HYPERPARAMS,
               "warm_start": None, "train_wall_s": train_wall_s, "eval_seeds": [s.seed for s in specs],
               "eval_history": callback.history, "baseline_eval": callback.baseline_metrics,
               "test_seeds": list(probe.test_seeds[:test_seeds]),
               "test_goodput_qps": {"mean": mean, "lo": lo, "hi": hi, "per_seed": goodput.tolist()},
               "best_heuristic_test_goodput_qps": best_heuristic,
               "share_of_best_heuristic": mean / best_heuristic if best_heuristic > 0 else None,
               "share_of_bound": mean / refs["capacity-bound"]["goodput_qps"]["mean"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"{env_id}: PPO from scratch, {timesteps} steps ({train_wall_s / 60:.1f} min): test SLO-goodput {mean:.4f} "
          f"[{lo:.4f}, {hi:.4f}] = {summary['share_of_best_heuristic']:.2f} of {BASELINE} ({best_heuristic:.4f}); "
          f"tensorboard --logdir {out / 'tb'}")


if __name__ == "__main__":
    run_script(app)
