"""The package layers the README promises: the simulator core loads no RL, CLI or HTTP stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_SIM = {"gymnasium", "stable_baselines3", "sb3_contrib", "torch", "click", "typer", "fastapi", "uvicorn",
                    "starlette", "ray", "optuna", "tensorboard", "httpx", "aiohttp"}

PROBE = """
import sys
from envs.sim.scenario import RunSpec, simulate
from policies import load_policy
for name in ("least-work+workflow", "hexgen", "llmd", "rr"):
    result, _ = simulate(RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.1, slo_scale=3.0, seed=0, queries=4),
                         load_policy(name))
    assert result["n_workflows"] == 4
print(" ".join(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))))
"""


def test_simulating_a_heuristic_loads_no_rl_cli_or_http_package() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, *sorted(FORBIDDEN_IN_SIM)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True).stdout
    assert out.strip() == "", f"importing envs.sim and simulating a heuristic loaded: {out.strip()}"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_simulator_core_sources_import_none_of_them() -> None:
    """Not even inside a function: envs/sim is usable without the training or serving extras."""
    ours = {"envs", "heuristics", "policies", "training", "deploy", "agentsched"}
    for path in sorted((REPO / "envs" / "sim").glob("*.py")):
        roots = _imported_roots(path)
        assert not roots & FORBIDDEN_IN_SIM, f"{path.name} imports {sorted(roots & FORBIDDEN_IN_SIM)}"
        assert not roots & (ours - {"envs"}), f"{path.name} imports {sorted(roots & (ours - {'envs'}))} (a higher layer)"
