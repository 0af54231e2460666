"""CLI: `agentsched train`, `agentsched tune-rl`, `agentsched evaluate`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from agentsched.options import (
    LIST_METAVAR,
    Backend,
    FloatList,
    IntList,
    OnOff,
    TextList,
    backend_option,
    parse_float_list,
    parse_int_list,
    parse_text_list,
    positive_float,
    prefix_cache_option,
    writable_dir,
)
from envs.cli import check_run


class TuneBackend(str, Enum):
    """Where tune-rl runs its trials."""

    optuna = "optuna"
    ray = "ray"


class TuneSearch(str, Enum):
    """How tune-rl searches (training/tune.py): Optuna TPE + pruning, or a population (Ray Tune)."""

    optuna = "optuna"
    pbt = "pbt"
    pb2 = "pb2"


def _console():
    from rich.console import Console

    return Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: str = typer.Option(..., "--config", help="training config YAML (or a name in training/configs/)"),
        total_timesteps: Optional[int] = typer.Option(None, "--total-timesteps", min=1, help="override the config's total env steps"),
        seed: Optional[int] = typer.Option(None, "--seed", min=0, help="override the config's seed"),
        out: Optional[Path] = typer.Option(None, "--out", parser=writable_dir, help="run directory (default runs/<config name>)"),
        warm_start: Optional[str] = typer.Option(None, "--warm-start",
                                                 help="behaviour-clone this heuristic before RL (e.g. hexgen); 'none' disables"),
        n_envs: Optional[int] = typer.Option(None, "--n-envs", min=1, help="override the number of parallel envs"),
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
        trials: int = typer.Option(10, "--trials", min=1, help="number of trials"),
        timesteps: Optional[int] = typer.Option(None, "--timesteps", min=1, help="env steps per trial (default: the config's)"),
        out: Optional[Path] = typer.Option(None, "--out", parser=writable_dir, help="run directory (default runs/tune-rl-<config name>)"),
        backend: TuneBackend = typer.Option(TuneBackend.optuna, "--backend", help="optuna (in process) or ray (Ray Tune; RAY_ADDRESS to use a cluster)"),
        tune_seeds: int = typer.Option(4, "--tune-seeds", min=1, help="episodes of the tuning seed block each trial is scored on"),
        test_seeds: int = typer.Option(8, "--test-seeds", min=1, help="episodes of the (disjoint) test seed block for the report"),
        sampler_seed: int = typer.Option(0, "--sampler-seed", help="seed of the sampler (Optuna's, or the population's starting points)"),
        search: TuneSearch = typer.Option(TuneSearch.optuna, "--search",
                                          help="optuna (TPE + pruning), pbt (population-based training) or pb2 "
                                               "(PBT with a GP bandit); pbt/pb2 run on Ray Tune with --trials as the population"),
    ) -> None:
        """Tune RL hyper-parameters on tuning seeds (Optuna/ASHA, PBT or PB2); report on separate test seeds."""
        from training.config import TrainConfig
        from training.tune import tune_rl

        cfg = TrainConfig.load(config)
        out_dir = out or Path("runs") / f"tune-rl-{cfg.name}"
        report = tune_rl(cfg, out_dir, trials=trials, timesteps=timesteps, backend=backend.value, n_tune_seeds=tune_seeds,
                         n_test_seeds=test_seeds, sampler_seed=sampler_seed, console=_console(), search=search.value)
        print(f"best hyperparams: {report['best_params']}")
        print(f"test seeds: {report['test']}")
        print(f"report: {out_dir / 'report.json'}")

    @app.command("evaluate")
    def evaluate_cmd(
        policy: str = typer.Option(..., "--policy", help="policy to evaluate: heuristic name, policy file or trained policy path"),
        baselines: TextList = typer.Option("rr,hexgen", "--baselines", parser=parse_text_list, metavar=LIST_METAVAR,
                                           help="comma-separated baselines (names, policy files, trained policies)"),
        trace: TextList = typer.Option("chess_trace1", "--trace", parser=parse_text_list, metavar=LIST_METAVAR,
                                       help="trace(s) or YAML workflow template(s), comma-separated"),
        cluster: TextList = typer.Option("paper", "--cluster", parser=parse_text_list, metavar=LIST_METAVAR,
                                         help="cluster(s), comma-separated"),
        rate: FloatList = typer.Option("0.1", "--rate", parser=parse_float_list, metavar=LIST_METAVAR,
                                       help="mean arrival rate(s) q/s, comma-separated"),
        load: TextList = typer.Option("constant", "--load", parser=parse_text_list, metavar=LIST_METAVAR,
                                      help="load shape(s): constant, step (0.5x -> 1.5x rate), burst (3x for a sixth of the run)"),
        slo_scale: float = typer.Option(3.0, "--slo-scale", parser=positive_float, help="SLO scale"),
        seeds: IntList = typer.Option("200000-200009", "--seeds", parser=parse_int_list, metavar=LIST_METAVAR,
                                      help="test seeds: 'a-b' or 'a,b,c' (keep them disjoint from training seeds)"),
        queries: int = typer.Option(60, "--queries", min=1, help="queries per run"),
        generated: bool = typer.Option(False, "--generated", help="all queries from the generator fitted to the trace"),
        out: Optional[Path] = typer.Option(None, "--out", parser=writable_dir,
                                           help="output directory (results.json, table, plots); without it nothing is written"),
        confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.999, help="bootstrap confidence level"),
        workers: int = typer.Option(1, "--workers", min=1, help="worker processes"),
        prefix_cache: OnOff = prefix_cache_option(),
        backend: Backend = backend_option(),
    ) -> None:
        """Evaluate a policy against baselines on test seeds: bootstrap CIs, ratios, a table and plots."""
        from envs.sim.cells import Cell
        from training.evaluate import evaluate, load_cached_policy, print_table

        for name in [policy, *baselines]:
            load_cached_policy(name)  # a bad name or file: one line, before any simulation
        cells = [Cell(trace=t, cluster=c, rate_qps=r, load=shape, slo_scale=slo_scale, queries=queries, generated=generated,
                      prefix_cache=prefix_cache is OnOff.on)
                 for c in cluster for t in trace for r in rate for shape in load]
        for cell in cells:
            for seed in seeds:
                check_run(cell.run_spec(seed))
        results = evaluate(policy, baselines, cells, seeds, confidence=confidence, out_dir=out, workers=workers,
                           backend=backend.value)
        print_table(results)
        if out:
            print(f"results: {out / 'results.json'}, {out / 'table.md'}, plots in {out}")
        else:
            print("nothing written: pass --out DIR to keep results.json, table.md and the plots")
