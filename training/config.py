"""The training config: RL Baselines3 Zoo-style YAML, validated with pydantic.

One file says everything a run needs: the algorithm and its hyper-parameters, the env id and the
scenarios episodes are drawn from, how many envs run in parallel, normalisation, evaluation on
held-out seeds and the warm start. `agentsched train --config FILE` reads it; flags override a
few fields (total timesteps, seed, warm start).

Seeds: training episodes, evaluation episodes (during training), tuning and test episodes (after)
must never overlap. Training scenarios draw episode seeds from [seed_base, seed_base+seed_count);
evaluation uses explicit seeds; the validator refuses an overlap, so a reported curve is never
measured on episodes the agent trained on.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from envs import ADMISSION_ENV_ID, DISPATCH_ENV_ID, KNOBS_ENV_ID
from envs.gym.admission_env import AdmissionDispatchEnv
from envs.gym.dispatch_env import DispatchEnv
from envs.gym.knobs_env import KnobsEnv
from envs.gym.scenario import Scenario

# the seed blocks (envs/seeds.py), re-exported for training's importers
from envs.seeds import EVAL_SEED_BASE as EVAL_SEED_BASE
from envs.seeds import TEST_SEED_BASE as TEST_SEED_BASE
from envs.seeds import TRAIN_SEED_BASE as TRAIN_SEED_BASE
from envs.seeds import TRAIN_SEED_COUNT as TRAIN_SEED_COUNT
from envs.seeds import TUNE_SEED_BASE as TUNE_SEED_BASE
from envs.sim.errors import UserError, load_yaml_mapping, pydantic_error_text, validate_as

ALGOS_FOR_ENV = {DISPATCH_ENV_ID: ("ppo", "maskable_ppo"), KNOBS_ENV_ID: ("ppo", "sac"),
                 ADMISSION_ENV_ID: ("maskable_ppo",)}
# what `env_kwargs` are passed to
ENV_CLASSES = {DISPATCH_ENV_ID: DispatchEnv, KNOBS_ENV_ID: KnobsEnv, ADMISSION_ENV_ID: AdmissionDispatchEnv}
DISPATCH_ENV_IDS = (DISPATCH_ENV_ID, ADMISSION_ENV_ID)  # one decision per call, an engine (v1: or defer)


def _check_scenario(raw: dict[str, Any], where: str) -> None:
    """Validate one scenario mapping as an `envs.gym.Scenario` (field names and values, trace and
    cluster exist); the error names the scenario's field."""
    try:
        Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{where}.{pydantic_error_text(exc)}") from None


class NormalizeConfig(BaseModel):
    """VecNormalize settings. Observations are already scaled to ~[-5, 5] by the env, so
    normalisation mostly helps the value function (norm_reward) and Knobs' aggregate features."""

    model_config = ConfigDict(extra="forbid")
    norm_obs: bool = True
    norm_reward: bool = False
    clip_obs: float = 10.0
    gamma: float | None = None  # defaults to the algorithm's gamma


class EvalConfig(BaseModel):
    """Evaluation during training, on held-out seeds, with a heuristic baseline on the same episodes."""

    model_config = ConfigDict(extra="forbid")
    freq_steps: PositiveInt = 20_000  # total env steps between evaluations (over all envs)
    seeds: list[int] = Field(default_factory=lambda: [EVAL_SEED_BASE + i for i in range(4)], min_length=1)
    scenarios: list[dict[str, Any]] | None = None  # default: the training scenarios (nominal values per seed)
    baseline: str | None = "hexgen"  # heuristic scored on the same episodes (the curve's reference line)
    metric: Literal["goodput_qps", "slo_attainment"] = "goodput_qps"  # picks the best model

    @field_validator("scenarios")
    @classmethod
    def _valid_scenarios(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, s in enumerate(v or []):
            _check_scenario(s, f"scenarios.{i}")
        return v


class WarmStartConfig(BaseModel):
    """Behaviour cloning on an expert heuristic's decisions before RL (plus optional DAgger)."""

    model_config = ConfigDict(extra="forbid")
    expert: str = "hexgen"
    # one expert per training scenario, in order (e.g. a heuristic tuned for each cluster): the
    # network learns to tell the scenarios apart from the state; replaces `expert`
    scenario_experts: list[str] | None = Field(None, min_length=1)
    episodes: PositiveInt = 16  # expert episodes collected (per DAgger round as well)
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    learning_rate: float = Field(3e-3, gt=0)
    dagger_rounds: int = Field(1, ge=0)
    value_pretrain: bool = True  # also regress the value head on the expert's discounted returns
    holdout_episodes: PositiveInt = 2  # expert episodes on other seeds, for the agreement figure
    # Dispatch-v1: weight of the "defer" action in the cloning loss (the expert defers on a few % of
    # the states; > 1 trades precision of the clone's deferrals for recall)
    defer_weight: float = Field(1.0, gt=0)
    # a lookahead expert (planner distillation): weight of the states where the planner overrode its
    # base policy's choice (few, and all that distilling the planner adds over cloning its base)
    override_weight: float = Field(1.0, gt=0)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    env_id: Literal["agentsched/Dispatch-v0", "agentsched/Knobs-v0", "agentsched/Dispatch-v1"] = DISPATCH_ENV_ID
    algo: Literal["ppo", "maskable_ppo", "sac"] = "maskable_ppo"
    policy: str = "MlpPolicy"
    total_timesteps: PositiveInt = 100_000
    seed: int = 0
    n_envs: PositiveInt = 2
    vec_env: Literal["subproc", "dummy"] = "subproc"
    normalize: NormalizeConfig | None = None
    # episodes: env i draws from scenarios[i % len(scenarios)] (envs.gym.Scenario fields)
    scenarios: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1, validate_default=True)
    env_kwargs: dict[str, Any] = {}  # DispatchEnv / KnobsEnv keyword arguments (max_engines, local_order, ...)
    hyperparams: dict[str, Any] = {}  # the algorithm's constructor arguments (learning_rate, n_steps, ...)
    policy_kwargs: dict[str, Any] = {}  # e.g. {net_arch: [128, 128]}
    eval: EvalConfig = EvalConfig()
    checkpoint_freq_steps: PositiveInt | None = 50_000
    warm_start: WarmStartConfig | None = None
    # schedules during RL (training/callbacks.py): ent_coef decays linearly from its hyperparams value
    # to `ent_coef_final`; episodes grow from `curriculum_queries[0]` workflows to the scenario's
    # `queries` over the first `curriculum_fraction` of the steps (Dispatch-v1 only)
    ent_coef_final: float | None = Field(None, ge=0)
    curriculum_queries: list[PositiveInt] | None = Field(None, min_length=1)
    curriculum_fraction: float = Field(0.5, gt=0, le=1)
    # what PPO's advantages are measured against (training/input_baseline.py): "value", the learned
    # value function (GAE, SB3's default); "input_dependent", Decima's baseline: the envs form groups
    # of `rollouts_per_input` that run the same episode (same seed), each iteration is one whole
    # episode per env (hyperparams.n_steps is not used), a step's advantage is its return to go
    # minus the group's mean return to go at the same simulated time (maskable_ppo on Dispatch only)
    baseline: Literal["value", "input_dependent"] = "value"
    rollouts_per_input: int = Field(2, ge=2)

    @field_validator("scenarios")
    @classmethod
    def _scenario_seeds(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Training episodes draw from the training seed block unless a scenario says otherwise;
        every scenario is validated here, at load time, not when the first env starts."""
        out = []
        for i, s in enumerate(v):
            s = {"seed_base": TRAIN_SEED_BASE, "seed_count": TRAIN_SEED_COUNT, **s}
            _check_scenario(s, f"scenarios.{i}")
            out.append(s)
        return out

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        allowed = ALGOS_FOR_ENV[self.env_id]
        if self.algo not in allowed:
            raise ValueError(f"algo {self.algo!r} does not fit {self.env_id} (use {' or '.join(allowed)})")
        env_class = ENV_CLASSES[self.env_id]
        accepted = set(inspect.signature(env_class.__init__).parameters) - {"self", "scenario"}
        unknown = sorted(set(self.env_kwargs) - accepted)
        if unknown:
            raise ValueError(f"env_kwargs.{unknown[0]}: {env_class.__name__} takes no such argument "
                             f"(it takes {', '.join(sorted(accepted))}; episodes come from `scenarios`)")
        for s in self.scenarios:
            lo, hi = s["seed_base"], s["seed_base"] + s["seed_count"]
            clash = [seed for seed in self.eval.seeds if lo <= seed < hi]
            if clash:
                raise ValueError(f"eval.seeds {clash[:3]} overlap the training seeds [{lo}, {hi}); "
                                 f"use seeds >= {hi} (evaluation must be on held-out episodes)")
        if self.baseline == "input_dependent":
            if self.algo != "maskable_ppo" or self.env_id not in DISPATCH_ENV_IDS:
                raise ValueError("baseline: input_dependent needs algo maskable_ppo on agentsched/Dispatch-v0 or -v1 "
                                 "(use baseline: value for other algorithms and envs)")
            groups, left = divmod(self.n_envs, self.rollouts_per_input)
            if left or groups < len(self.scenarios):
                need = self.rollouts_per_input * len(self.scenarios)
                raise ValueError(f"n_envs: {self.n_envs} envs do not form whole groups of rollouts_per_input="
                                 f"{self.rollouts_per_input} for each of the {len(self.scenarios)} scenarios "
                                 f"(use a multiple of {need})")
        experts = self.warm_start.scenario_experts if self.warm_start else None
        if experts is not None and len(experts) != len(self.scenarios):
            raise ValueError(f"warm_start.scenario_experts has {len(experts)} entries for {len(self.scenarios)} scenarios "
                             f"(give one expert per scenario, in the same order)")
        return self

    # ---- io -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            candidate = Path(__file__).parent / "configs" / f"{path.name}{'' if path.suffix else '.yaml'}"
            if not candidate.exists():
                raise UserError(f"--config: {path} not found (give a YAML file, or a name in training/configs/)")
            path = candidate
        raw = load_yaml_mapping(path, "--config", " of fields")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.parse(raw, source=path.name)

    @classmethod
    def parse(cls, raw: dict[str, Any], source: str = "config") -> "TrainConfig":
        return validate_as(cls, raw, "config", source)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    # ---- helpers ------------------------------------------------------------------------------
    def scenario_objects(self) -> list[Any]:
        try:
            return [Scenario.coerce(s) for s in self.scenarios]
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UserError(f"config {self.name}: scenarios.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None

    def eval_scenarios(self) -> list[Any]:
        raw = self.eval.scenarios if self.eval.scenarios is not None else self.scenarios
        return [Scenario.coerce(s) for s in raw]
