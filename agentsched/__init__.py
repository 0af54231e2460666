"""agentsched: schedule multi-tenant agentic LLM workflows on heterogeneous GPU clusters.

The code lives in the top-level packages `envs` (simulator and Gymnasium envs), `heuristics`,
`policies`, `training` and `deploy`; this package only holds the command-line entry point.
"""

__version__ = "0.1.0"
