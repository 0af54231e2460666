"""agentsched environments: the discrete-event cluster simulator (`envs.sim`, which imports
nothing of Gymnasium) and the Gymnasium envs over it (`envs.gym`, which registers the ids below
when imported: `import envs.gym`, or Gymnasium's module form "envs.gym:agentsched/Dispatch-v0").
"""

DISPATCH_ENV_ID = "agentsched/Dispatch-v0"
KNOBS_ENV_ID = "agentsched/Knobs-v0"
ADMISSION_ENV_ID = "agentsched/Dispatch-v1"  # Dispatch-v0 + a workflow-level admission action (envs/gym/admission_env.py)
ENV_IDS = (DISPATCH_ENV_ID, KNOBS_ENV_ID)
