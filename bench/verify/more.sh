#!/usr/bin/env bash
# Second call on the warm machine: fp8 against bf16 (TTFT of 2048 tokens, batch-1 and batch-32
# steps), the long-output throughput and a 512-sequence batch, then Gemma and Mistral end to end.
cd "$(dirname "$0")/../.."
E=/tmp/llama3-8b.kiln
if [ ! -f .dev/bin/kiln ]; then mkdir -p .dev/bin; gunzip -c .dev/gz/kiln.gz > .dev/bin/kiln; chmod +x .dev/bin/kiln; fi
[ -f $E ] || timeout 170 python3 bench/make_engine.py --kiln .dev/bin/kiln --model llama3-8b --out $E --quant fp8 2>&1 | tail -1
for e in $E /tmp/llama3-8b-fp8.kiln; do
  echo "== bench $e"
  timeout 90 .dev/bin/kiln bench $e --batch 1,32 --io 2048:32 2>&1 | tail -4 | tee -a $OUT/fp8-bench.txt
done
echo "== kiln 128:2048 x256"
timeout 100 .dev/bin/kiln bench $E --throughput --io 128:2048 --requests 256 2>&1 | tail -2 | tee $OUT/tp-long.txt
echo "== kiln 128:128 x1024 --max-num-seqs 512"
timeout 60 .dev/bin/kiln bench $E --throughput --io 128:128 --requests 1024 --max-num-seqs 512 2>&1 | tail -2 | tee $OUT/tp-512.txt
timeout 200 python3 bench/gpu_check.py --models gemma-2b-2l,mistral-7b-2l --diff --cont 16 --work /tmp > $OUT/gpu_check.txt 2>&1
echo "gpu_check rc=$?"; grep "diff_max\|Error\|error" $OUT/gpu_check.txt | cut -c1-700 | tail -12
