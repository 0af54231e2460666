"""Training callbacks: evaluation on held-out seeds against the heuristic, TensorBoard layout.

`SimEvalCallback` plays the role of SB3's `EvalCallback` (periodic deterministic evaluation, best
model kept) but evaluates through `envs.sim.scenario.simulate`, the code path of `agentsched
simulate` and `agentsched evaluate`, instead of `evaluate_policy` on an eval env: that gives the
full metrics dict (SLO attainment, goodput, p95 latency) rather than only the return, handles the
action masks, and lets the heuristic baseline be scored on *exactly* the same episodes (its
score is computed once, at the start). The gap between the two curves is the point of the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EventCallback

from envs.sim.scenario import RunSpec, simulate

LOGGED_METRICS = ("slo_attainment", "goodput_qps", "latency_p95_s")


def mean_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in LOGGED_METRICS:
        vals = [r[key] for r in results if r.get(key) is not None and not math.isnan(r[key])]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


def run_policy(policy: Any, specs: list[RunSpec]) -> list[dict[str, Any]]:
    return [simulate(spec, policy)[0] for spec in specs]


def custom_scalar_layout(baseline: str | None) -> dict[str, Any]:
    """TensorBoard "Custom Scalars" tab: each metric of the policy and of the baseline on one chart."""
    charts = {}
    for key in LOGGED_METRICS:
        tags = [f"eval/{key}"] + ([f"baseline/{key}"] if baseline else [])
        charts[key] = ["Multiline", tags]
    charts["goodput ratio to baseline"] = ["Multiline", ["eval/goodput_ratio_to_baseline"]]
    return {"agentsched": charts}


def write_custom_scalars(model: Any, baseline: str | None) -> None:
    from stable_baselines3.common.logger import TensorBoardOutputFormat
    from torch.utils.tensorboard.summary import custom_scalars

    for fmt in model.logger.output_formats:
        if isinstance(fmt, TensorBoardOutputFormat):
            fmt.writer.file_writer.add_summary(custom_scalars(custom_scalar_layout(baseline)))
            fmt.writer.flush()


class SimEvalCallback(EventCallback):
    """Every `eval_freq` env steps (summed over envs), run the current policy deterministically on
    the eval episodes and log their mean metrics next to the baseline's; save the best policy.

    `policy_factory(model)` turns the live model into a `Policy` (no copy of the weights).
    """

    def __init__(self, specs: list[RunSpec], policy_factory: Callable[[Any], Any], eval_freq: int,
                 baseline: Any = None, metric: str = "goodput_qps", best_model_save_path: str | Path | None = None,
                 on_new_best: Callable[[Any], None] | None = None, log_path: str | Path | None = None,
                 callback_on_new_best: BaseCallback | None = None,
                 on_evaluation: Callable[[int, dict[str, float]], bool] | None = None, verbose: int = 0):
        super().__init__(callback_on_new_best, verbose=verbose)
        self.specs = specs
        self.policy_factory = policy_factory
        self.eval_freq = int(eval_freq)
        self.baseline = baseline
        self.metric = metric
        self.best_model_save_path = Path(best_model_save_path) if best_model_save_path else None
        self.on_new_best = on_new_best
        self.log_path = Path(log_path) if log_path else None
        self.on_evaluation = on_evaluation  # (timesteps, metrics) -> keep training? (tuning: report + prune)
        self.stopped_early = False
        self.best_score = -math.inf
        self.baseline_metrics: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self._last_eval_step = -1

    def _init_callback(self) -> None:
        super()._init_callback()
        if self.baseline is not None:
            self.baseline_metrics = mean_metrics(run_policy(self.baseline, self.specs))

    def _on_training_start(self) -> None:
        self.evaluate()  # step 0: shows where the (warm-started) policy starts

    def _on_step(self) -> bool:
        if self.num_timesteps - max(self._last_eval_step, 0) >= self.eval_freq:
            metrics = self.evaluate()
            if self.on_evaluation is not None and not self.on_evaluation(self.num_timesteps, metrics):
                self.stopped_early = True
                return False
        return True

    def _on_training_end(self) -> None:
        if self._last_eval_step != self.num_timesteps:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        self._last_eval_step = self.num_timesteps
        policy = self.policy_factory(self.model)
        metrics = mean_metrics(run_policy(policy, self.specs))
        for key, value in metrics.items():
            self.logger.record(f"eval/{key}", value)
        record = {"timesteps": self.num_timesteps, **{f"eval/{k}": v for k, v in metrics.items()}}
        if self.baseline_metrics is not None:
            for key, value in self.baseline_metrics.items():
                self.logger.record(f"baseline/{key}", value)
                record[f"baseline/{key}"] = value
            base = self.baseline_metrics[self.metric]
            ratio = metrics[self.metric] / base if base > 0 else math.nan
            self.logger.record("eval/goodput_ratio_to_baseline" if self.metric == "goodput_qps"
                               else "eval/attainment_ratio_to_baseline", ratio)
            record["ratio_to_baseline"] = ratio
        self.logger.dump(self.num_timesteps)
        self.history.append(record)
        if self.log_path is not None:
            self.log_path.write_text(json.dumps(self.history, indent=2))
        score = metrics[self.metric]
        if not math.isnan(score) and score > self.best_score:
            self.best_score = score
            if self.on_new_best is not None:
                self.on_new_best(self.model)
            if self.callback is not None:
                self.callback.on_step()
        if self.verbose:
            print(f"eval @ {self.num_timesteps}: {metrics}")
        return metrics


class EntropyScheduleCallback(BaseCallback):
    """Linear decay of PPO's entropy coefficient from `start` to `end` over the run (Decima's entropy
    schedule: explore early, commit late); logged as train/ent_coef_scheduled."""

    def __init__(self, start: float, end: float, verbose: int = 0):
        super().__init__(verbose)
        self.start, self.end = float(start), float(end)

    def _on_rollout_start(self) -> None:
        progress = 1.0 - self.model._current_progress_remaining  # 0 at the start, 1 at the end
        self.model.ent_coef = self.start + (self.end - self.start) * min(max(progress, 0.0), 1.0)
        self.logger.record("train/ent_coef_scheduled", self.model.ent_coef)

    def _on_step(self) -> bool:
        return True


class CurriculumCallback(BaseCallback):
    """Curriculum over episode length: episodes of `stages[0]` workflows first, then each next stage,
    reaching `final` workflows after `fraction` of `total_timesteps` (Decima grows episode length
    the same way: short episodes give the value function a tractable start). Calls the envs'
    `set_queries` (Dispatch-v1); the new length applies from each env's next reset."""

    def __init__(self, stages: list[int], final: int, fraction: float, total_timesteps: int, verbose: int = 0):
        super().__init__(verbose)
        self.lengths = [int(q) for q in stages] + [int(final)]
        self.boundary = float(fraction) * int(total_timesteps)
        self.current = -1

    def _stage(self) -> int:
        steps = len(self.lengths) - 1
        if self.num_timesteps >= self.boundary or steps == 0:
            return steps
        return min(steps, int(self.num_timesteps / self.boundary * steps))

    def _apply(self) -> None:
        stage = self._stage()
        if stage != self.current:
            self.current = stage
            self.training_env.env_method("set_queries", self.lengths[stage])
        self.logger.record("train/episode_queries", self.lengths[self.current])

    def _on_training_start(self) -> None:
        self._apply()

    def _on_rollout_start(self) -> None:
        self._apply()

    def _on_step(self) -> bool:
        return True
