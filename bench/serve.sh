#!/usr/bin/env bash
# Serving benchmarks on the GPU machine (issue 15), Llama-3-8B shape, bf16 random weights:
#   1. offline throughput through the scheduler (`kiln bench --throughput`, like trtllm-bench):
#      128/128 and 2048/128 with $REQUESTS requests, 128/2048 with $LONG_REQUESTS;
#   2. `kiln serve` measured by `kiln loadtest` (like `vllm bench serve`), 128/128: 256 concurrent
#      streaming clients; Poisson arrivals at 1 and 10 requests/s; saturation (all at once).
# Each result is a JSON file in the output folder (default /tmp/kiln-serve; $OUT on the device).
# Usage: bench/serve.sh [out-dir]
#   env: KILN (.dev/bin/kiln), MODEL (llama3-8b), REQUESTS (1000), LONG_REQUESTS (256),
#        RATE_REQUESTS (100: requests per Poisson run)
set -euo pipefail
cd "$(dirname "$0")/.."
kiln=${KILN:-.dev/bin/kiln}
model=${MODEL:-llama3-8b}
out=${1:-/tmp/kiln-serve}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
engine=$work/$model.kiln
python3 bench/make_engine.py --kiln "$kiln" --model "$model" --out "$engine"

echo "## offline throughput" >&2
"$kiln" bench "$engine" --throughput --io 128:128,2048:128 --requests "${REQUESTS:-1000}" --json \
  | tee "$out/throughput.json"
"$kiln" bench "$engine" --throughput --io 128:2048 --requests "${LONG_REQUESTS:-256}" --json \
  | tee "$out/throughput-long.json"

echo "## where a step's time goes at batch 256 (per-kernel timeline of one prefill and one decode step)" >&2
"$kiln" bench "$engine" --batch 256 --io 128:128 --timeline > "$out/timeline-b256.txt" 2>&1 || true

echo "## kiln serve + kiln loadtest" >&2
port=8431
"$kiln" serve "$engine" --port "$port" 2> "$out/serve.log" &
server=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.5
done
url=http://127.0.0.1:$port
lt() { "$kiln" loadtest --url "$url" --input-len 128 --output-len 128 --json "$@"; }
lt --requests 1024 --concurrency 256 | tee "$out/serve-c256.json"
lt --requests "${RATE_REQUESTS:-100}" --rate 1 | tee "$out/serve-rate1.json"
lt --requests "${RATE_REQUESTS:-100}" --rate 10 | tee "$out/serve-rate10.json"
lt --requests 1024 | tee "$out/serve-saturation.json"
curl -s "$url/metrics" > "$out/metrics.txt"
kill -TERM "$server"
wait "$server"
