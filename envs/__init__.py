"""agentsched environments: the discrete-event cluster simulator (envs.sim) and Gymnasium envs
(envs.gym), registered here as `agentsched/Dispatch-v0` and `agentsched/Knobs-v0`.

Registration only records entry points (the env modules load on `gymnasium.make`), so importing
the simulator stays cheap.
"""

from gymnasium.envs.registration import register, registry

DISPATCH_ENV_ID = "agentsched/Dispatch-v0"
KNOBS_ENV_ID = "agentsched/Knobs-v0"

for _env_id, _entry in ((DISPATCH_ENV_ID, "envs.gym.dispatch_env:DispatchEnv"),
                        (KNOBS_ENV_ID, "envs.gym.knobs_env:KnobsEnv")):
    if _env_id not in registry:
        # no TimeLimit: episodes end with their workload or at the scenario's simulated horizon
        register(id=_env_id, entry_point=_entry, disable_env_checker=False)
