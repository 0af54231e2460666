"""agentsched environments: the discrete-event cluster simulator (envs.sim) and Gymnasium envs."""
