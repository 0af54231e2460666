#!/usr/bin/env bash
# The measured comparison of training/README.md ("Input-dependent baseline"): one config, per training
# seed one warm start (bit-identical in both runs), then RL with baseline input_dependent and with
# baseline value. An input_dependent iteration is whole episodes, so its last one overshoots the
# budget; the value run of the same seed gets at least as many steps (the input run's count rounded
# up to a value iteration, 4 envs x 1024). Then every end-of-training policy and warm start on
# held-out test seeds. Run from the repository root; ~20 min on 2 quiet cores.
set -euo pipefail
export PYTHONPATH=$PWD
A="flock /tmp/agentsched-cpu.lock nice -n 10 .venv/bin/agentsched"
P=runs/decima-baseline
for seed in ${SEEDS:-0 1 2}; do
  [ -f $P/input-s$seed/summary.json ] || $A train --config experiments/decima-baseline/input.yaml --seed $seed --out $P/input-s$seed --no-progress
  steps=$(.venv/bin/python -c "import json; print(json.load(open('$P/input-s$seed/summary.json'))['eval_history'][-1]['timesteps'])")
  budget=$(( (steps + 4095) / 4096 * 4096 ))
  [ -f $P/value-s$seed/summary.json ] || $A train --config experiments/decima-baseline/value.yaml --seed $seed --out $P/value-s$seed --no-progress \
    --total-timesteps $budget
done
policies=""
for seed in ${SEEDS:-0 1 2}; do
  policies="$policies,$P/value-s$seed/final_policy,$P/value-s$seed/warm_start_policy"
  [ $seed != 0 ] && policies="$policies,$P/input-s$seed/final_policy"
done
for cell in "paper 0.2" "mixed-16 1.2"; do
  set -- $cell
  $A evaluate --policy $P/input-s0/final_policy --baselines ${policies#,},policies/pretrained/least-work+workflow \
    --cluster $1 --rate $2 --load constant,step --queries 240 --seeds 200000-200005 --workers 2 --out $P/eval-$1
done
.venv/bin/python experiments/decima-baseline/summarize.py $P > experiments/decima-baseline/results.md
