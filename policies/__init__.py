"""One policy interface for heuristics, tuned heuristics and trained networks.

`load_policy("hexgen")`, `load_policy("tuned.yaml")` and `load_policy("runs/x/policy")` all give
a `Policy`, usable by the simulator, the Gymnasium envs and the deploy gateway alike.
"""

from policies.base import Policy, PolicyError
from policies.loader import load_policy, policy_from_spec, save_policy

__all__ = ["Policy", "PolicyError", "load_policy", "policy_from_spec", "save_policy"]
