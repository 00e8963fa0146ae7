#!/usr/bin/env bash
# Perplexity of the demo model's GPU engines (run on the H100 machine): bf16 (`--quant none`:
# the GGUF's blocks dequantized), the GGUF's own format kept (no flag: Q4_1 as `int4g32m`) and
# each weight format kiln's GPU kernels read, built from one GGUF, `kiln eval --device cuda` on
# the shipped corpus (llama.cpp's protocol, context 512). The CPU f32 figure it is compared with
# comes from `kiln eval` of the f32 engine on the development machine (bench/RESULTS.md).
# With BENCH=1 each engine's decode speed too (`kiln bench --batch 1,8 --io 128:128`).
# ONLY="bf16 gguf-kept" limits the run to the engines named.
# Usage: [BENCH=1] [ONLY="name ..."] bench/quant_ppl.sh <model.gguf> [kiln]   (prints one JSON line per engine)
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$1
kiln=${2:-.dev/bin/kiln}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
while IFS='|' read -r name flags; do
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  engine=$work/$name.kiln
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$kiln" build "$gguf" --target cuda -o "$engine" $flags > "$work/build.log" 2>&1 \
    || { echo "{\"engine\": \"$name\", \"build_failed\": true}"; tail -3 "$work/build.log"; continue; }
  build_s=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  "$kiln" eval "$engine" --device cuda --json \
    | python3 -c "import json,sys; r=json.load(sys.stdin); r.update(engine='$name', flags='$flags', build_s=$build_s, engine_mb=round($(stat -c %s "$engine")/1e6, 1)); print(json.dumps(r))"
  if [ "${BENCH:-0}" = 1 ]; then
    "$kiln" bench "$engine" --batch 1,8 --io 128:128 --json \
      | python3 -c "import json,sys; print(json.dumps({'engine': '$name', 'bench': [dict(batch=r['batch'], step_ms=round(r['decode_step_ms'], 4), gb_s=round(r['weight_gb_per_s'], 1)) for r in json.load(sys.stdin)]}))"
  fi
  rm -f "$engine"
done <<'LIST'
bf16|--quant none
gguf-kept|
q8_0|--quant q8_0
int8|--quant int8
fp8|--quant fp8
fp8-skip-ends|--quant fp8 --quant-skip layers.0,layers.29
int4-g128|--quant int4
int4-sym-g128|--quant int4-sym
int4-g32|--quant int4 --group 32
int4-gptq-g128|--quant int4-gptq
LIST
