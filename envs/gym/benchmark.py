"""Benchmark env ids: the sustained-load evaluation cells as fixed Dispatch envs one can cite.

One id per cluster x load shape, `agentsched/Dispatch-<cluster>-<shape>-v1`:

    import gymnasium as gym, envs.gym
    env = gym.make("agentsched/Dispatch-paper-burst-v1")                   # training episodes
    test = gym.make("agentsched/Dispatch-paper-burst-v1", split="test")     # the benchmark's episodes
    from envs.gym.benchmark import reference_scores
    reference_scores("agentsched/Dispatch-paper-burst-v1")["least-work+workflow"]

Each id is `DispatchEnv` (the Dispatch-v0 class: one decision per ready call, masked engine
index, the SLO reward) over one `training.evaluate.Cell`: the CHESS trace, the cluster, the heavy
arrival rate, the load shape (constant, step or burst, as `agentsched evaluate --load` defines
them), the SLO scale, prefix caching on, and the run length chosen by
`benchmarks/headroom.py --choose-length`. Everything is in the registered spec's kwargs
(`gym.spec(id).kwargs["cell"]`), so the id pins the scenario.

Seeds: `split="train"` (the default) draws episode seeds from the training block
(`envs.seeds`), `split="test"` walks the fixed `TEST_SEEDS` in order (restarting at each
`reset(seed=...)`), which are the episodes the reference scores were measured on: report a
policy as its mean SLO-goodput over those episodes (`info["metrics"]["goodput_qps"]` at the
end of each). `options={"episode_seed": s}` pins one episode on either split, and
`env.unwrapped.run_spec(s)` is the identical run for `envs.sim.scenario.simulate`.

The agent chooses engines; engines order their queues with least-work+workflow's local order
(workflow-first, margin 2), so dispatching as least-work+workflow does in the env gives exactly
its `simulate` score. The reference scores are the full policies (each with its own local
order: HexGen's urgency, rr's FCFS) run by `simulate` on the test episodes, i.e. what
`agentsched evaluate` reports for them there.

The cells are defined by `training.evaluate.Cell`, the same code that `agentsched evaluate` and
the headroom table use, so a benchmark episode and an evaluation run of the same seed are one run.
The reference table (`envs/data/benchmark_scores.json`) is written by
`benchmarks/reference_scores.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Sequence

import gymnasium as gym
import numpy as np

from envs.gym.dispatch_env import DispatchEnv
from envs.gym.scenario import Scenario
from envs.seeds import TEST_SEED_BASE, TRAIN_SEED_BASE, TRAIN_SEED_COUNT
from envs.sim.cells import Cell
from envs.sim.scenario import RunSpec

BENCHMARK_VERSION = 1
# The heavy arrival rates in the prefix-cache world, where the paper cluster and mixed-16 run
# past what least-work+workflow can keep within SLO (see benchmarks/headroom.py for how chosen).
HEAVY_RATES_QPS = {"paper": 0.2, "mixed-16": 1.2}
# Queries per episode: `benchmarks/headroom.py --choose-length` at these rates.
BENCHMARK_QUERIES = {"paper": 480, "mixed-16": 480}
# Short names in the ids: a load shape's name ("constant" is the heavy cell).
SHAPE_NAMES = {"constant": "heavy", "step": "step", "burst": "burst"}
CLUSTER_NAMES = {"paper": "paper", "mixed-16": "mixed16"}
TEST_SEEDS: tuple[int, ...] = tuple(TEST_SEED_BASE + i for i in range(10))
SCORES_PATH = Path(__file__).resolve().parents[1] / "data" / "benchmark_scores.json"


def benchmark_id(cluster: str, load: str) -> str:
    return f"agentsched/Dispatch-{CLUSTER_NAMES[cluster]}-{SHAPE_NAMES[load]}-v{BENCHMARK_VERSION}"


def benchmark_cell(cluster: str, load: str) -> Cell:
    return Cell(cluster=cluster, rate_qps=HEAVY_RATES_QPS[cluster], load=load, queries=BENCHMARK_QUERIES[cluster],
                slo_scale=3.0, prefix_cache=True)


# id -> the cell it pins, in table order (paper first, then mixed-16; constant, step, burst)
BENCHMARK_CELLS: dict[str, Cell] = {benchmark_id(c, load): benchmark_cell(c, load)
                                    for c in HEAVY_RATES_QPS for load in SHAPE_NAMES}
BENCHMARK_ENV_IDS: tuple[str, ...] = tuple(BENCHMARK_CELLS)


# Engines order their queues as the best heuristic (least-work+workflow) does, so an agent that
# dispatches as it does reaches exactly its reference score (a DispatchEnv agent picks engines only).
LOCAL_ORDER, LOCAL_KNOBS = "workflow-first", {"margin": 2.0}


def registration_kwargs(env_id: str) -> dict[str, Any]:
    """The kwargs registered with an id: the cell as plain data, the test seeds, the local order."""
    return {"cell": asdict(BENCHMARK_CELLS[env_id]), "test_seeds": list(TEST_SEEDS), "local_order": LOCAL_ORDER,
            "local_knobs": dict(LOCAL_KNOBS)}


class BenchmarkDispatchEnv(DispatchEnv):
    """`DispatchEnv` on one fixed cell (see the module docstring). `cell` is a `Cell`'s fields;
    other keyword arguments are DispatchEnv's (max_engines, local_order, ...)."""

    def __init__(self, cell: dict[str, Any] | Cell, test_seeds: Sequence[int] = TEST_SEEDS,
                 split: Literal["train", "test"] = "train", **kwargs: Any):
        if split not in ("train", "test"):
            raise ValueError(f"split: use 'train' or 'test', got {split!r}")
        self.cell = cell if isinstance(cell, Cell) else Cell(**cell)
        self.test_seeds = tuple(int(s) for s in test_seeds)
        if not self.test_seeds:
            raise ValueError("test_seeds: give at least one seed")
        self.split = split
        self._next_test = 0
        # the scenario fixes the cluster (the padding) and the nominal cell; episodes come from `run_spec`
        scenario = Scenario(name=f"benchmark-{self.cell.label}", trace=self.cell.trace, cluster=self.cell.cluster,
                            queries=self.cell.queries, rate_qps=self.cell.rate_qps, slo_scale=self.cell.slo_scale,
                            prefix_cache=self.cell.prefix_cache, seed_base=TRAIN_SEED_BASE,
                            seed_count=TRAIN_SEED_COUNT)
        super().__init__(scenario=scenario, **kwargs)

    def run_spec(self, episode_seed: int) -> RunSpec:
        """The episode of this seed as a `simulate` run (the cell's load shape included)."""
        return self.cell.run_spec(int(episode_seed))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        gym.Env.reset(self, seed=seed)  # seeds np_random before the episode is drawn from it
        if seed is not None:
            self._next_test = 0
        options = dict(options or {})
        if "run_spec" not in options:
            episode_seed = options.pop("episode_seed", None)
            if episode_seed is None:
                if self.split == "test":
                    episode_seed = self.test_seeds[self._next_test % len(self.test_seeds)]
                    self._next_test += 1
                else:
                    episode_seed = self.scenario.draw_episode_seed(self.np_random)
            options["run_spec"] = self.run_spec(int(episode_seed))
        return super().reset(seed=None, options=options)


def reference_scores(env_id: str, path: Path = SCORES_PATH) -> dict[str, dict[str, Any]]:
    """The reference SLO-goodput of each policy on a benchmark id's test episodes (mean, 95%
    interval, per seed; `benchmarks/reference_scores.py` writes the table)."""
    table = json.loads(Path(path).read_text())
    if env_id not in table["envs"]:
        raise KeyError(f"{env_id}: no reference scores (ids in the table: {', '.join(table['envs'])})")
    return table["envs"][env_id]["policies"]


__all__ = ["BENCHMARK_CELLS", "BENCHMARK_ENV_IDS", "BenchmarkDispatchEnv", "TEST_SEEDS", "benchmark_id",
           "reference_scores", "registration_kwargs"]
