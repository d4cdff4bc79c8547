#!/bin/bash
# kvmesh bench serve and AIPerf, alternating, on the same server and workload (bench/RESULTS.md).
# Needs a running mesh on 127.0.0.1:18000 (kvmesh up --grpc-port 52051 --http-port 18000, SmolLM2) and AIPerf in
# its own venv: python3 -m venv AIPERF && AIPERF/bin/pip install aiperf (see ../shared/PEERS.md).
# Usage: bench/serve_vs_aiperf.sh AIPERF_VENV OUT_DIR
set -e
AIPERF=${1:?the AIPerf venv}; OUT=${2:?an output folder}; MODEL_DIR=${MODEL_DIR:-$HOME/.cache/kvmesh/models/SmolLM2-135M-Instruct}
KVMESH=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/kvmesh
mkdir -p "$OUT" && cd "$OUT"
# the server's own TTFT and ITL sums and counts, to compare each tool with what the gateway measured
snap() { curl -s 127.0.0.1:18000/metrics | grep -E "^kvmesh:(time_to_first_token|inter_token_latency)_seconds_(sum|count)" | awk '{print $2}' | tr '\n' ' '; echo; }
for i in 1 2 3 4; do
  rm -rf aiperf_$i
  snap > server_aiperf_$i.before
  timeout 500 "$AIPERF/bin/aiperf" profile --model-names SmolLM2-135M-Instruct --url http://127.0.0.1:18000 --endpoint-type completions --streaming --concurrency 4 --request-count 32 --prompt-input-tokens-mean 256 --prompt-input-tokens-stddev 0 --prompt-output-tokens-mean 64 --prompt-output-tokens-stddev 0 --extra-inputs ignore_eos:true --tokenizer "$MODEL_DIR" --random-seed $i --output-artifact-dir "$OUT/aiperf_$i" --ui-type none > aiperf_$i.log 2>&1
  snap > server_aiperf_$i.after
  snap > server_kvmesh_$i.before
  "$KVMESH" bench serve --base-url http://127.0.0.1:18000 --max-concurrency 4 --num-prompts 32 --input-len 256 --output-len 64 --seed $((i+10)) --no-progress --out "$OUT/kvmesh_$i.json" > kvmesh_$i.log 2>&1
  snap > server_kvmesh_$i.after
done
