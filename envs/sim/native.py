"""The simulator's hot modules as mypyc-compiled extensions, and the guard against stale ones.

`make compile` (part of `make install`, so of `make run` and `make test`) compiles
`COMPILED_MODULES` with mypyc (`envs/sim/build_native.py`) into extension modules next to their
sources; Python imports an extension module before a `.py` file of the same name, so the compiled
code is used wherever the build was made, and the pure-Python modules wherever it was not (a fresh
worktree run with PYTHONPATH). Both give identical results (tests/test_compiled.py).

An extension module does not know that its source changed: the build records the SHA-256 of each
compiled source in `MANIFEST_PATH`, and importing `envs.sim` (`check_compiled_sources`) refuses to
go on with an extension whose source no longer matches, rather than silently running old code.
This module itself is never compiled, and imports nothing of the simulator.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# the modules mypyc compiles, in import order (a module only imports earlier ones of the list)
COMPILED_MODULES = ("envs.sim.prefix_cache", "envs.sim.engine", "envs.sim.cluster")
# written by the build: {"sources": {module: sha256 of its .py}}
MANIFEST_PATH = PACKAGE_DIR / "_compiled.json"
# mypyc's shared library of the group (runtime and every module's code), named by the build
GROUP_NAME = "envs.sim._native"
REBUILD_HINT = "run `make compile` (or `make clean-compiled` to run the pure-Python modules)"


class StaleCompiledModule(ImportError):
    """A compiled simulator module is older than its source."""


def source_path(module: str) -> Path:
    """The `.py` file of a compiled module (`envs.sim.engine` -> envs/sim/engine.py)."""
    return PACKAGE_DIR / (module.rpartition(".")[2] + ".py")


def extension_paths(module: str) -> list[Path]:
    """The compiled extension files of a module present on disk, for any interpreter."""
    stem = module.rpartition(".")[2]
    return sorted(p for p in PACKAGE_DIR.glob(stem + ".*") if p.suffix in (".so", ".pyd"))


def loadable_extension(module: str) -> Path | None:
    """The extension file of `module` this interpreter would import instead of its `.py`, if any."""
    stem = module.rpartition(".")[2]
    for suffix in EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / (stem + suffix)
        if path.is_file():
            return path
    return None


def source_sha256(module: str) -> str:
    return hashlib.sha256(source_path(module).read_bytes()).hexdigest()


def recorded_sources() -> dict[str, str]:
    """The source hashes the last build recorded (empty: no build, or an unreadable record)."""
    try:
        record = json.loads(MANIFEST_PATH.read_text())
    except (OSError, ValueError):
        return {}
    sources = record.get("sources") if isinstance(record, dict) else None
    return dict(sources) if isinstance(sources, dict) else {}


def stale_modules() -> list[str]:
    """Compiled modules this interpreter would import whose source differs from the one compiled."""
    recorded = recorded_sources()
    return [m for m in COMPILED_MODULES
            if loadable_extension(m) is not None and recorded.get(m) != source_sha256(m)]


def check_compiled_sources() -> None:
    """Raise `StaleCompiledModule` (one line, naming the fix) if a compiled module is stale."""
    stale = stale_modules()
    if stale:
        names = ", ".join(str(source_path(m).relative_to(PACKAGE_DIR.parent.parent)) for m in stale)
        raise StaleCompiledModule(f"{names} changed since it was compiled with mypyc: {REBUILD_HINT}")


def compiled_modules_in_use() -> list[str]:
    """The `COMPILED_MODULES` imported so far from compiled extensions (not from `.py` files)."""
    used = []
    for name in COMPILED_MODULES:
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else None
        if spec is not None and spec.origin is not None and not spec.origin.endswith(".py"):
            used.append(name)
    return used
