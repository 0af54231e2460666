"""The mypyc-compiled simulator modules (`make compile`, `envs.sim.native`): the same results as the
pure-Python ones, and never used once their source has changed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from envs.sim import native

ROOT = Path(__file__).resolve().parent.parent

# a few runs that exercise admission, preemption, the prefix cache, eviction, failures and forks
RUNS = """
import json, sys
from envs.sim.native import compiled_modules_in_use
from envs.sim.scenario import RunSpec, simulate
from policies import load_policy
def without_wall_clock(x):  # the simulator's own wall time differs run to run
    if isinstance(x, dict):
        return {k: without_wall_clock(v) for k, v in x.items() if not k.endswith("wall_s")}
    return [without_wall_clock(v) for v in x] if isinstance(x, list) else x
out = {}
for policy in ("rr", "llmd-prefix", "least-work+workflow"):
    for cache in (True, False):
        spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.6, slo_scale=3.0, seed=3, queries=60,
                       prefix_cache=cache)
        result, sim = simulate(spec, load_policy(policy))
        out[f"{policy}/{cache}"] = without_wall_clock(result)
# the lookahead planner forks at every decision: the copies (`__deepcopy__` of calls, workflows, caches)
spec = RunSpec(trace="chess_trace1", cluster="paper", rate_qps=0.6, slo_scale=3.0, seed=3, queries=20)
result, sim = simulate(spec, load_policy("lookahead:least-work+workflow@horizon_s=10,samples=1,top_k=2"))
out["lookahead"] = without_wall_clock(result)
print(json.dumps({"compiled": compiled_modules_in_use(), "results": out}, sort_keys=True))
"""


def _copy_sources(dest: Path) -> Path:
    """The `envs` package as plain sources (no compiled extension, no build record) under `dest`."""
    shutil.copytree(ROOT / "envs", dest / "envs",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "_compiled.json", "__pycache__"))
    return dest


def _python(code: str, *path_first: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with `path_first` (then the project root) on its path; its
    working directory (first on the path with `-c`) is the first of them."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path_first), str(ROOT)]))
    cwd = path_first[0] if path_first else ROOT
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_the_makefile_compiles_exactly_the_listed_modules() -> None:
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^NATIVE_SOURCES := (.+)$", makefile, re.MULTILINE)
    assert listed is not None, "Makefile: NATIVE_SOURCES is gone"
    assert listed.group(1).split() == [str(native.source_path(m).relative_to(ROOT)) for m in native.COMPILED_MODULES]


def test_a_stale_compiled_module_stops_the_import_with_the_fix(tmp_path: Path) -> None:
    """A compiled extension beside a source that changed since the build: `import envs.sim` fails
    with one line naming the file and `make compile`; with the record matching, it imports."""
    pure = _copy_sources(tmp_path)
    sim_dir = pure / "envs" / "sim"
    # a stand-in for the compiled module: only its presence matters (the package is imported, not
    # the module, so it is never loaded)
    (sim_dir / ("engine" + EXTENSION_SUFFIXES[0])).write_bytes(b"not a real extension")
    check = "import envs.sim; print('imported')"

    no_record = _python(check, pure)
    assert no_record.returncode != 0
    assert no_record.stderr.strip().splitlines()[-1] == (
        "envs.sim.native.StaleCompiledModule: envs/sim/engine.py changed since it was compiled with mypyc: "
        + native.REBUILD_HINT)

    sources = {m: native.source_sha256(m) for m in native.COMPILED_MODULES}  # this checkout's sources = the copy's
    (sim_dir / "_compiled.json").write_text(json.dumps({"sources": sources}))
    assert _python(check, pure).stdout.strip() == "imported"

    engine_py = sim_dir / "engine.py"
    engine_py.write_text(engine_py.read_text() + "\n# edited after the build\n")
    edited = _python(check, pure)
    assert edited.returncode != 0 and "envs/sim/engine.py changed since it was compiled" in edited.stderr
    assert "perf.py" not in edited.stderr.splitlines()[-1]  # only the module whose source changed


def test_the_pure_python_modules_run_where_nothing_was_compiled(tmp_path: Path) -> None:
    pure = _copy_sources(tmp_path)
    proc = _python("import envs.sim.engine, envs.sim.native as n; print(n.compiled_modules_in_use(), n.stale_modules())", pure)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []"


@pytest.mark.slow  # a subprocess per run: make test runs it, the fast tier does not
def test_compiled_and_pure_python_give_identical_results(tmp_path: Path) -> None:
    if not any(native.loadable_extension(m) for m in native.COMPILED_MODULES):
        message = "the simulator is not compiled in this checkout (`make compile`)"
        if os.environ.get("CI") or os.environ.get("AGENTSCHED_REQUIRE_ENGINES"):
            pytest.fail(message)  # `make test` compiles first: here a missing build is a failure
        pytest.skip(message)
    compiled = _python(RUNS)
    assert compiled.returncode == 0, compiled.stderr
    pure = _python(RUNS, _copy_sources(tmp_path))
    assert pure.returncode == 0, pure.stderr
    compiled_out, pure_out = json.loads(compiled.stdout), json.loads(pure.stdout)
    assert compiled_out["compiled"] == list(native.COMPILED_MODULES)  # the build is the one imported
    assert pure_out["compiled"] == []
    # byte for byte, as the result JSON would be written (NaN included)
    assert json.dumps(compiled_out["results"], sort_keys=True) == json.dumps(pure_out["results"], sort_keys=True)
    assert compiled_out["results"]["rr/True"]["n_calls"] > 0
