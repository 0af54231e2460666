"""Mean SLO-goodput of a policy on the benchmark ids' test episodes and its paired ratios to the
tuned baselines of envs/data/benchmark_scores.json (experiments/learned-tuned-experts/README.md).

    PYTHONPATH=. .venv/bin/python experiments/learned-tuned-experts/evaluate_ids.py POLICY
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks.headroom import TUNED_ADMIT, TUNED_LEAST_WORK, run_policy
from envs.gym.benchmark import BENCHMARK_CELLS, SCORES_PATH, TEST_SEEDS
from training.evaluate import bootstrap_ratio


def goodput(job: tuple[str, str, int]) -> float:
    name, env_id, seed = job
    return run_policy(name, BENCHMARK_CELLS[env_id], seed)["goodput_qps"]


if __name__ == "__main__":
    policy = sys.argv[1]
    table = json.loads(SCORES_PATH.read_text())
    rng = np.random.default_rng(0)
    with ProcessPoolExecutor(2) as pool:
        for env_id in BENCHMARK_CELLS:
            values = np.array(list(pool.map(goodput, [(policy, env_id, s) for s in TEST_SEEDS])))
            scores = table["envs"][env_id]["policies"]
            parts = [f"{env_id} {values.mean():.4f}"]
            for base in (TUNED_LEAST_WORK, TUNED_ADMIT):
                ratio, lo, hi = bootstrap_ratio(values, np.array(scores[base]["per_seed"]), 0.95, rng)
                parts.append(f"/ {base} {ratio:.2f} [{lo:.2f}, {hi:.2f}]")
            print("  ".join(parts), flush=True)
