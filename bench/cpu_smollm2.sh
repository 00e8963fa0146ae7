#!/usr/bin/env bash
# CPU benchmark: SmolLM2-135M-Instruct (f32 engine from the Q4_1 GGUF) on this machine.
# Prefill and decode tokens/s from `kiln run --json`, median of 3 runs per prompt length.
# Usage: bench/cpu_smollm2.sh [engine]   (builds the engine if none is given)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
engine=${1:-.cache/engines/smollm2-135m-instruct.kiln}
if [ ! -f "$engine" ]; then
  mkdir -p "$(dirname "$engine")"
  target/release/kiln build "$(scripts/fetch-demo-model.sh)" -o "$engine"
fi
echo "| prompt tokens | new tokens | prefill tok/s | decode tok/s |"
echo "|---:|---:|---:|---:|"
for words in 16 128 480; do
  prompt=$(python3 -c "import sys; print(' '.join(['word%d' % (i % 50) for i in range($words)]))")
  for run in 1 2 3; do
    target/release/kiln run "$engine" --prompt "$prompt" --max-new-tokens 64 --ignore-eos --json
  done | python3 -c "
import json, sys, statistics
rs = [json.loads(l) for l in sys.stdin if l.strip()]
p = statistics.median(r['timings']['prefill_tokens_per_s'] for r in rs)
d = statistics.median(r['timings']['decode_tokens_per_s'] for r in rs)
print(f\"| {len(rs[0]['prompt_ids'])} | {len(rs[0]['generated_ids'])} | {p:.1f} | {d:.1f} |\")"
done
