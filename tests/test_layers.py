"""The package layers the README promises: the simulator core loads no RL, CLI or HTTP stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_envs_import_no_training_serving_or_cli_code() -> None:
    """The envs (simulator, observations, Gymnasium wrappers, benchmark ids) sit below training,
    deploy and the CLI: `import envs.gym` must not pull in the trainer (nor its scipy)."""
    for path in sorted((REPO / "envs").rglob("*.py")):
        if path.name == "cli.py":  # the envs' own subcommands of the CLI: the top layer
            continue
        roots = _imported_roots(path)
        higher = roots & {"training", "deploy", "agentsched"}
        assert not higher, f"{path.relative_to(REPO)} imports {sorted(higher)} (a higher layer)"


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


@pytest.mark.slow  # a subprocess per run: make test runs it, the fast tier does not
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


OURS = ("envs", "heuristics", "policies", "training", "deploy", "agentsched")
# function-level imports of our own modules that stay there, and why; CLI modules (cli.py) import
# their command's machinery inside the command so that `--help` is instant and the base install
# (no [train]/[serve] extra) runs the commands it has
LAZY_IMPORTS_ALLOWED = {
    "training/tune.py": "the Ray Tune trainable runs in a Ray worker process and imports there",
    "training/envs.py": "`import envs.gym` registers the env ids in SubprocVecEnv worker processes",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for root in OURS:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports_of(path: Path, mods: dict[str, Path], name: str) -> set[str]:
    """Our modules `path` imports anywhere (module top or inside functions), as the deepest module named."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in mods:
                    if candidate != name and not name.startswith(candidate + "."):
                        found.add(candidate)
                    break
    return found


def test_no_import_cycles_even_through_function_level_imports() -> None:
    mods = _modules()
    graph = {name: _imports_of(path, mods, name) for name, path in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_of_our_modules_are_at_module_top() -> None:
    misplaced = []
    for path in sorted(p for root in OURS for p in (REPO / root).rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if path.name == "cli.py" or rel in LAZY_IMPORTS_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if module and module.split(".")[0] in OURS and node.level == 0:
                    misplaced.append(f"{rel}:{node.lineno} {module}")
    assert not misplaced, misplaced
