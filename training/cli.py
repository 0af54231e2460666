"""CLI: `agentsched train`, `agentsched tune-rl`, `agentsched evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from envs.sim.errors import UserError


def _console():
    from rich.console import Console

    return Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: str = typer.Option(..., "--config", help="training config YAML (or a name in training/configs/)"),
        total_timesteps: Optional[int] = typer.Option(None, "--total-timesteps", help="override the config's total env steps"),
        seed: Optional[int] = typer.Option(None, "--seed", help="override the config's seed"),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<config name>)"),
        warm_start: Optional[str] = typer.Option(None, "--warm-start",
                                                 help="behaviour-clone this heuristic before RL (e.g. hexgen); 'none' disables"),
        n_envs: Optional[int] = typer.Option(None, "--n-envs", help="override the number of parallel envs"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="rich progress bar"),
    ) -> None:
        """Train a policy with stable-baselines3 (PPO / MaskablePPO / SAC); TensorBoard logs in the run directory."""
        from training.config import TrainConfig, WarmStartConfig
        from training.train import train

        cfg = TrainConfig.load(config, total_timesteps=total_timesteps, seed=seed, n_envs=n_envs)
        if warm_start is not None:
            if warm_start.lower() == "none":
                cfg = cfg.model_copy(update={"warm_start": None})
            else:
                from policies.loader import load_policy

                load_policy(warm_start)  # fail early on a bad name
                ws = (cfg.warm_start.model_copy(update={"expert": warm_start, "scenario_experts": None}) if cfg.warm_start
                      else WarmStartConfig(expert=warm_start))
                cfg = cfg.model_copy(update={"warm_start": ws})
        out_dir = out or Path("runs") / cfg.name
        summary = train(cfg, out_dir, progress=progress, console=_console())
        best = summary["best_eval"]
        msg = f"policy: {summary['policy']}  best eval {best['metric']} {best['score']:.4f}"
        if best.get("baseline"):
            msg += f" (baseline {cfg.eval.baseline}: {best['baseline'][best['metric']]:.4f})"
        print(msg)
        print(f"tensorboard --logdir {out_dir / 'tb'}")

    @app.command("tune-rl")
    def tune_rl_cmd(
        config: str = typer.Option(..., "--config", help="training config YAML the trials start from"),
        trials: int = typer.Option(10, "--trials", help="number of trials"),
        timesteps: Optional[int] = typer.Option(None, "--timesteps", help="env steps per trial (default: the config's)"),
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/tune-rl-<config name>)"),
        backend: str = typer.Option("optuna", "--backend", help="optuna (in process) or ray (Ray Tune; RAY_ADDRESS to use a cluster)"),
        tune_seeds: int = typer.Option(4, "--tune-seeds", help="episodes of the tuning seed block each trial is scored on"),
        test_seeds: int = typer.Option(8, "--test-seeds", help="episodes of the (disjoint) test seed block for the report"),
        sampler_seed: int = typer.Option(0, "--sampler-seed", help="seed of the Optuna sampler"),
    ) -> None:
        """Tune RL hyper-parameters with Optuna (median pruner) on tuning seeds; report on separate test seeds."""
        from training.config import TrainConfig
        from training.tune import tune_rl

        if backend not in ("optuna", "ray"):
            raise UserError(f"--backend: {backend!r} is not optuna or ray")
        cfg = TrainConfig.load(config)
        out_dir = out or Path("runs") / f"tune-rl-{cfg.name}"
        report = tune_rl(cfg, out_dir, trials=trials, timesteps=timesteps, backend=backend, n_tune_seeds=tune_seeds,
                         n_test_seeds=test_seeds, sampler_seed=sampler_seed, console=_console())
        print(f"best hyperparams: {report['best_params']}")
        print(f"test seeds: {report['test']}")
        print(f"report: {out_dir / 'report.json'}")

    @app.command("evaluate")
    def evaluate_cmd(
        policy: str = typer.Option(..., "--policy", help="policy to evaluate: heuristic name, policy file or trained policy path"),
        baselines: str = typer.Option("rr,hexgen", "--baselines", help="comma-separated baselines (names, policy files, trained policies)"),
        trace: str = typer.Option("chess_trace1", "--trace", help="trace(s), comma-separated"),
        cluster: str = typer.Option("paper", "--cluster", help="cluster(s), comma-separated"),
        rate: str = typer.Option("0.1", "--rate", help="mean arrival rate(s) q/s, comma-separated"),
        load: str = typer.Option("constant", "--load", help="load shape(s): constant, step (0.5x -> 1.5x rate), burst (3x for a sixth of the run)"),
        slo_scale: float = typer.Option(3.0, "--slo-scale", help="SLO scale"),
        seeds: str = typer.Option("200000-200009", "--seeds", help="test seeds: 'a-b' or 'a,b,c' (keep them disjoint from training seeds)"),
        queries: int = typer.Option(60, "--queries", help="queries per run"),
        generated: bool = typer.Option(False, "--generated", help="all queries from the generator fitted to the trace"),
        out: Optional[Path] = typer.Option(None, "--out", help="output directory (results.json, table, plots)"),
        confidence: float = typer.Option(0.95, "--confidence", help="bootstrap confidence level"),
        workers: int = typer.Option(1, "--workers", help="worker processes (with --backend ray: local Ray CPUs)"),
        backend: str = typer.Option("process", "--backend", help="process (local pool) or ray (Ray tasks; RAY_ADDRESS to use a cluster)"),
    ) -> None:
        """Evaluate a policy against baselines on test seeds: bootstrap CIs, ratios, a table and plots."""
        from training.evaluate import Cell, evaluate, parse_seeds, print_table

        if backend not in ("process", "ray"):
            raise UserError(f"--backend: {backend!r} is not process or ray")
        seed_list = parse_seeds(seeds)
        cells = [Cell(trace=t, cluster=c, rate_qps=float(r), load=l, slo_scale=slo_scale, queries=queries, generated=generated)
                 for c in _split(cluster) for t in _split(trace) for r in _split(rate) for l in _split(load)]
        results = evaluate(policy, _split(baselines), cells, seed_list, confidence=confidence, out_dir=out,
                           workers=workers, backend=backend)
        print_table(results)
        if out:
            print(f"results: {out / 'results.json'}")


def _split(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"expected a comma-separated list, got {text!r}")
    return items
