#!/usr/bin/env bash
# The measured comparison of training/README.md ("Input-dependent baseline"): same config, same
# warm start, same budget, baseline value vs input_dependent; then both end-of-training policies and
# their (shared) warm start on held-out test seeds. Run from the repository root; ~15 min on 2 cores.
set -euo pipefail
export PYTHONPATH=$PWD
A="flock /tmp/agentsched-cpu.lock nice -n 10 .venv/bin/agentsched"
for b in value input; do
  $A train --config experiments/decima-baseline/$b.yaml --out runs/decima-baseline/$b --no-progress
done
P=runs/decima-baseline
for cell in "paper 0.2" "mixed-16 1.2"; do
  set -- $cell
  $A evaluate --policy $P/input/final_policy --baselines $P/value/final_policy,$P/value/warm_start_policy \
    --cluster $1 --rate $2 --load constant,step --queries 240 --seeds 200000-200005 --workers 2 --out $P/eval-$1
done
