"""Mean SLO-goodput of policies on the benchmark ids' cells and their paired ratios to the tuned
baselines (experiments/learned-tuned-experts/README.md). `--seeds test`: the ids' test episodes,
baselines read from envs/data/benchmark_scores.json; `--seeds validation`: seeds 160000-160009
(neither tuning nor test seeds), baselines run here too: what to choose among training runs by.

    PYTHONPATH=. .venv/bin/python experiments/learned-tuned-experts/evaluate_ids.py [--seeds validation] POLICY...
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks.headroom import TUNED_ADMIT, TUNED_LEAST_WORK, run_policy
from envs.gym.benchmark import BENCHMARK_CELLS, SCORES_PATH, TEST_SEEDS
from training.evaluate import bootstrap_ratio

VALIDATION_SEEDS = tuple(range(160000, 160010))
BASELINES = (TUNED_LEAST_WORK, TUNED_ADMIT)


def goodput(job: tuple[str, str, int]) -> float:
    name, env_id, seed = job
    return run_policy(name, BENCHMARK_CELLS[env_id], seed)["goodput_qps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+")
    parser.add_argument("--seeds", choices=("test", "validation"), default="test")
    args = parser.parse_args()
    seeds = TEST_SEEDS if args.seeds == "test" else VALIDATION_SEEDS
    table = json.loads(SCORES_PATH.read_text())
    rng = np.random.default_rng(0)
    with ProcessPoolExecutor(2) as pool:
        def run(name: str, env_id: str) -> np.ndarray:
            return np.array(list(pool.map(goodput, [(name, env_id, s) for s in seeds])))

        for env_id in BENCHMARK_CELLS:
            if args.seeds == "test":
                base = {b: np.array(table["envs"][env_id]["policies"][b]["per_seed"]) for b in BASELINES}
            else:
                base = {b: run(b, env_id) for b in BASELINES}
            for policy in args.policies:
                values = run(policy, env_id)
                parts = [f"{env_id} {policy} {values.mean():.4f}"]
                for b, den in base.items():
                    ratio, lo, hi = bootstrap_ratio(values, den, 0.95, rng)
                    parts.append(f"/ {b} {ratio:.2f} [{lo:.2f}, {hi:.2f}]")
                print("  ".join(parts), flush=True)


if __name__ == "__main__":
    main()
