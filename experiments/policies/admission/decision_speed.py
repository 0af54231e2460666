"""Decision time of a trained policy on a loaded 12-engine cluster state (benchmarks/decision_speed.py's
state and timer; that benchmark times the named heuristics on 64 engines, more than a policy trained
with max_engines 12 takes). A Dispatch-v1 policy's `dispatch` without `admit` runs the same
network forward pass as `admit` (one observation, one pass), so this is its per-decision cost.

    PYTHONPATH=. .venv/bin/python experiments/policies/admission/decision_speed.py POLICY [POLICY ...]
"""

from __future__ import annotations

import sys

from benchmarks.decision_speed import make_state, time_policy

if __name__ == "__main__":
    sim, calls = make_state(12)
    for ref in sys.argv[1:]:
        d_us, _ = time_policy(ref, sim, calls, decisions=2000)
        print(f"{ref}: {d_us / 1000:.3f} ms per decision (best of 5 rounds)")
