"""Gymnasium environments over the cluster simulator (registered by `import envs.gym`).

- `agentsched/Dispatch-v0` (`DispatchEnv`): one decision per ready LLM call, which engine gets it
  (`Discrete(max_engines)`, masked; `info["action_mask"]`, `action_masks()` for MaskablePPO).
- `agentsched/Dispatch-v1` (`AdmissionDispatchEnv`): Dispatch-v0 plus a workflow-level admission
  action (`Discrete(max_engines + 1)`, the last one defers the call's workflow; see admission_env.py).
- `agentsched/Knobs-v0` (`KnobsEnv`): one decision per control interval, the knobs of the paper's
  hierarchical heuristic (alpha, urgency weight) for the next interval (`Box(-1, 1)`).
- `agentsched/Dispatch-{paper,mixed16}-{heavy,step,burst}-v1` (`BenchmarkDispatchEnv`): Dispatch-v0
  on one fixed sustained-load cell each, with fixed test seeds and reference scores
  (`envs.gym.benchmark`).

Both draw episodes from a `Scenario` (pydantic, YAML; shipped: `default`, `train-randomized`,
`test-heldout` in envs/gym/scenarios/). Reward: `envs.gym.reward`. Typical use:

    import gymnasium as gym, envs.gym
    env = gym.make("agentsched/Dispatch-v0", scenario="train-randomized")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())  # a valid engine

    # the paper's heuristic as an action, e.g. for imitation or as a baseline on equal terms
    from policies import load_policy
    hexgen = load_policy("hexgen")
    action = env.unwrapped.heuristic_action(hexgen)

    # the same episodes in the simulator, for heuristics
    from envs.sim.scenario import simulate
    scenario = env.unwrapped.scenario
    for seed in scenario.evaluation_seeds(10):
        env.reset(options={"episode_seed": seed})       # env episode ...
        result, _ = simulate(scenario.run_spec(seed), hexgen)  # ... and the identical simulator run

Subprocess vector envs that start fresh interpreters (SB3's `SubprocVecEnv` uses forkserver) must
import `envs.gym` to see the ids: pass `"envs.gym:agentsched/Dispatch-v0"` (Gymnasium's module:id form) or
the class `DispatchEnv` to `make_vec_env`. `make_vec_env` asks for render_mode="rgb_array", which
these envs ignore (add `"render_mode": None` to env_kwargs to silence Gymnasium's warning).

A trained Dispatch-v0 policy outside the env (in `simulate`, in the gateway) builds the identical
observation with `envs.observation.dispatch.DispatchObservation(max_engines).build(call, cluster)`, which
reads only the view protocols; `valid_actions(cluster)` is the mask.
"""

from gymnasium.envs.registration import register, registry

from envs import ADMISSION_ENV_ID, DISPATCH_ENV_ID, KNOBS_ENV_ID
from envs.gym.benchmark import BENCHMARK_ENV_IDS, BenchmarkDispatchEnv, reference_scores, registration_kwargs
from envs.gym.dispatch_env import DispatchEnv
from envs.gym.knobs_env import KnobsEnv
from envs.gym.scenario import RandomClusterSpec, Randomization, Scenario
from envs.observation import InvalidActionError
from envs.observation.dispatch import DispatchObservation
from envs.observation.knobs import Knob, KnobsObservation

for _env_id, _entry in ((DISPATCH_ENV_ID, "envs.gym.dispatch_env:DispatchEnv"),
                        (KNOBS_ENV_ID, "envs.gym.knobs_env:KnobsEnv"),
                        (ADMISSION_ENV_ID, "envs.gym.admission_env:AdmissionDispatchEnv")):
    if _env_id not in registry:
        # no TimeLimit: episodes end with their workload or at the scenario's simulated horizon
        register(id=_env_id, entry_point=_entry, disable_env_checker=False)
for _env_id in BENCHMARK_ENV_IDS:  # the benchmark cells (envs/gym/benchmark.py)
    if _env_id not in registry:
        register(id=_env_id, entry_point="envs.gym.benchmark:BenchmarkDispatchEnv",
                 kwargs=registration_kwargs(_env_id), disable_env_checker=False)

__all__ = ["BENCHMARK_ENV_IDS", "BenchmarkDispatchEnv", "DispatchEnv", "DispatchObservation", "InvalidActionError", "Knob",
           "KnobsEnv", "KnobsObservation", "RandomClusterSpec", "Randomization", "Scenario", "reference_scores"]
