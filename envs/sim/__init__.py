"""The discrete-event simulator core (no Gymnasium, SB3, torch, CLI or HTTP inside).

Its hot modules may be compiled with mypyc (`envs.sim.native`); importing the package refuses a
compiled module whose source changed since the build."""

from envs.sim.native import check_compiled_sources

check_compiled_sources()
