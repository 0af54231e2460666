"""Compile the simulator's hot modules with mypyc, in place (`make compile` runs this).

Writes one extension module per entry of `envs.sim.native.COMPILED_MODULES` next to its source,
mypyc's shared library of the group (`envs/sim/_native__mypyc.*.so`), and the record of the
compiled sources' hashes that `envs.sim` checks on import (`envs.sim.native.MANIFEST_PATH`). The
C sources and objects go to `build/mypyc`. Not imported by the simulator; needs mypy (the `dev`
extra) and a C compiler.

Run: python -m envs.sim.build_native            (from the project root; `make compile` first removes
                                                 the old extensions, which `import envs.sim` refuses once stale)
     python -m envs.sim.build_native --clean    (remove the compiled modules: pure Python again)
"""

from __future__ import annotations

import argparse
import json
import os

from mypyc.build import mypycify
from setuptools import setup

from envs.sim.native import COMPILED_MODULES, GROUP_NAME, MANIFEST_PATH, PACKAGE_DIR, extension_paths, source_path, source_sha256

BUILD_DIR = "build/mypyc"


def remove_compiled() -> list[str]:
    """Delete every compiled extension of the group and the record; returns the removed files."""
    removed = [p for m in COMPILED_MODULES for p in extension_paths(m)]
    removed += sorted(PACKAGE_DIR.glob(GROUP_NAME.rpartition(".")[2] + "__mypyc.*"))
    if MANIFEST_PATH.exists():
        removed.append(MANIFEST_PATH)
    for path in removed:
        path.unlink()
    return [str(p) for p in removed]


def build() -> None:
    root = PACKAGE_DIR.parent.parent
    os.chdir(root)  # mypyc names modules by their path from the project root
    remove_compiled()  # a failed build leaves the pure-Python modules in charge, never a mix
    hashes = {m: source_sha256(m) for m in COMPILED_MODULES}
    paths = [str(source_path(m).relative_to(root)) for m in COMPILED_MODULES]
    extensions = mypycify(paths, opt_level="3", group_name=GROUP_NAME, target_dir=BUILD_DIR)
    setup(name="agentsched-native", ext_modules=extensions,
          script_args=["build_ext", "--inplace", "--build-temp", BUILD_DIR, "--build-lib", BUILD_DIR + "/lib", "--quiet"])
    if {m: source_sha256(m) for m in COMPILED_MODULES} != hashes:
        remove_compiled()
        raise SystemExit("a compiled source changed during the build: run `make compile` again")
    MANIFEST_PATH.write_text(json.dumps({"sources": hashes}, indent=1) + "\n")
    print(f"compiled with mypyc: {', '.join(COMPILED_MODULES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules instead")
    args = parser.parse_args()
    if args.clean:
        for path in remove_compiled():
            print(f"removed {path}")
    else:
        build()


if __name__ == "__main__":
    main()
