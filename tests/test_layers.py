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


BASE_INSTALL = """
import importlib.abc, sys
BLOCKED = {"gymnasium", "stable_baselines3", "sb3_contrib", "torch", "tensorboard", "ray",
           "fastapi", "uvicorn", "starlette", "httpx", "prometheus_client", "aiohttp", "openai"}
class WithoutExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, WithoutExtras())
from agentsched.cli import main
main(sys.argv[1:])
"""


def _base_install(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a base install (no [train] or [serve] extra) would run it."""
    return subprocess.run([sys.executable, "-c", BASE_INSTALL, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_base_install_simulates_benches_and_tunes(tmp_path) -> None:
    for args in (["--help"], ["policies"],
                 ["simulate", "--policy", "least-work+workflow", "--queries", "4", "--out", str(tmp_path / "r.json")],
                 ["bench", "--policies", "rr,hexgen", "--rates", "0.05", "--slo-scales", "3", "--seeds", "0",
                  "--queries", "4", "--workers", "1", "--out", str(tmp_path / "bench")],
                 ["tune", "--policy", "hexgen", "--trials", "1", "--seeds", "0", "--test-seeds", "1", "--queries", "4",
                  "--workers", "1", "--out", str(tmp_path / "tuned.yaml")]):
        proc = _base_install(*args)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
    assert (tmp_path / "r.json").exists() and (tmp_path / "tuned.yaml").exists()


def test_base_install_names_the_extra_a_command_needs(tmp_path) -> None:
    for args, extra in ((["train", "--config", "smoke"], "train"),
                        (["serve", "--cluster", str(REPO / "deploy/clusters/local-cpu.yaml"), "--policy", "rr"], "serve")):
        proc = _base_install(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-2000:])
        assert f"agentsched[{extra}]" in lines[0] and "Traceback" not in proc.stderr
