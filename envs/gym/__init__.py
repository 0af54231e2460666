"""Gymnasium environments over the cluster simulator (registered by `import envs`).

- `agentsched/Dispatch-v0` (`DispatchEnv`): one decision per ready LLM call, which engine gets it.
- `agentsched/Knobs-v0` (`KnobsEnv`): one decision per control interval, the knobs of the paper's
  hierarchical heuristic (alpha, urgency weight) for the next interval.

Both draw episodes from a `Scenario`; `Scenario.run_spec(seed)` gives the `RunSpec` of an episode
so heuristics can be evaluated on exactly the same episodes with `envs.sim.scenario.simulate`.
"""

from envs.gym.dispatch_env import DispatchEnv, InvalidActionError
from envs.gym.knobs_env import Knob, KnobsEnv
from envs.gym.scenario import RandomClusterSpec, Randomization, Scenario

__all__ = ["DispatchEnv", "InvalidActionError", "Knob", "KnobsEnv", "RandomClusterSpec", "Randomization", "Scenario"]
