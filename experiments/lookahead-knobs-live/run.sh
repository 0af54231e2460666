#!/usr/bin/env bash
# lookahead-knobs vs fixed least-work+workflow in front of the two live vLLM CPU engines, on the
# same replay with a load step (see README.md). Run from the repository root, under the engine lock:
#   flock /tmp/agentsched-engines.lock bash experiments/lookahead-knobs-live/run.sh OUT_DIR
set -euo pipefail
OUT=${1:-runs/lookahead-knobs-live}
BASE_RATE=${BASE_RATE:-0.4}       # q/s for the whole run
BASE_QUERIES=${BASE_QUERIES:-48}  # about 120 s of base load
STEP_RATE=${STEP_RATE:-1.6}       # q/s added by the step (base + step: 5x the base)
STEP_QUERIES=${STEP_QUERIES:-48}  # about 30 s of step
STEP_AT_S=${STEP_AT_S:-40}        # the step starts this long after the base
SEED=${SEED:-7}
PORT=${PORT:-18300}
LOOKAHEAD=${LOOKAHEAD:-lookahead-knobs:least-work+workflow@interval_s=5,horizon_s=20,samples=1,margin=0.25}
FIXED=${FIXED:-least-work+workflow}
ORDER=${ORDER:-fixed lookahead}   # which policy's replay runs first (the shared machine's load drifts)
AGENTSCHED=(env PYTHONPATH="$PWD" .venv/bin/python -m agentsched.cli)
mkdir -p "$OUT"

# a private copy of deploy/clusters/local-cpu.yaml: own ports and workdir (a developer's engines on 8101/8102 stay alone)
.venv/bin/python - "$OUT/cluster.yaml" <<'PY'
import sys, pathlib, yaml
root = pathlib.Path.cwd()
data = yaml.safe_load((root / "deploy/clusters/local-cpu.yaml").read_text())
out = pathlib.Path(sys.argv[1]).resolve()
data["workdir"] = str(out.parent / "engines")
for engine, port in zip(data["engines"], (18201, 18202)):
    engine["launch"]["port"] = port
    engine["profile"] = str(root / engine["profile"])
    engine["launch"]["model_dir"] = str(root / engine["launch"]["model_dir"])
out.write_text(yaml.safe_dump(data))
PY

"${AGENTSCHED[@]}" engines up --cluster "$OUT/cluster.yaml"
trap '"${AGENTSCHED[@]}" engines down --cluster "$OUT/cluster.yaml"' EXIT

run_one() {  # $1: label, $2: policy
  local label=$1 policy=$2 gw_pid
  "${AGENTSCHED[@]}" serve --cluster "$OUT/cluster.yaml" --policy "$policy" --port "$PORT" --log-level info \
      2> "$OUT/$label-gateway.log" &
  gw_pid=$!
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 0.5; done
  uptime > "$OUT/$label-load.txt"
  local common=(--gateway "http://127.0.0.1:$PORT" --trace chess_trace1 --slo-scale 3 --token-scale 0.05 --no-stream)
  "${AGENTSCHED[@]}" replay "${common[@]}" --rate "$BASE_RATE" --queries "$BASE_QUERIES" --seed "$SEED" \
      --out "$OUT/$label-base.json" > /dev/null &
  local base_pid=$!
  sleep "$STEP_AT_S"
  "${AGENTSCHED[@]}" replay "${common[@]}" --rate "$STEP_RATE" --queries "$STEP_QUERIES" --seed "$((SEED + 1))" \
      --out "$OUT/$label-step.json" > /dev/null
  wait "$base_pid"
  curl -sf "http://127.0.0.1:$PORT/v1/agentsched/info" > "$OUT/$label-info.json"
  curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/$label-metrics.txt"
  uptime >> "$OUT/$label-load.txt"
  kill -TERM "$gw_pid"
  wait "$gw_pid" || true
}

for label in $ORDER; do
  if [ "$label" = fixed ]; then run_one fixed "$FIXED"; else run_one lookahead "$LOOKAHEAD"; fi
done
.venv/bin/python experiments/lookahead-knobs-live/summarize.py "$OUT"
