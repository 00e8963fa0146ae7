#!/usr/bin/env bash
# One device call: kernels (prefill grid, act_fp8 codes, quant), kiln diff of mixed steps (bf16) and
# of the fp8 cuBLASLt path, then offline throughput new vs the previous commit's binary.
cd "$(dirname "$0")/../.."
mkdir -p .dev/bin
gunzip -c .dev/gz/kiln.gz > .dev/bin/kiln
gunzip -c .dev/old/kiln.gz > .dev/bin/kiln-old
gunzip -c .dev/kc/kernel_check.gz > .dev/bin/kernel_check
chmod +x .dev/bin/*
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv | tee $OUT/gpu.txt
timeout 120 bash bench/kernels/run.sh run prefill quant > $OUT/kernels.txt 2>&1
echo "kernels rc=$?"; grep -i "fail\|act_fp8\|checks" $OUT/kernels.txt | tail -12
timeout 90 python3 bench/make_engine.py --model llama3-8b-2l --out /tmp/l2.kiln --quant fp8 2>&1 | tail -2
IDS=5,17,99,1000,2000,3000,4000,5000,6000,7000,8000,9000,10000,11000,12000,13000,100,200,300,400
timeout 60 .dev/bin/kiln diff /tmp/l2.kiln --ids $IDS > $OUT/diff-bf16.txt 2>&1; echo "diff bf16 rc=$?"
timeout 60 .dev/bin/kiln diff /tmp/l2-fp8.kiln --ids $IDS --tolerance 0.3 > $OUT/diff-fp8.txt 2>&1; echo "diff fp8 rc=$?"
python3 - <<'PY'
import os, re
for f in ("diff-bf16.txt", "diff-fp8.txt"):
    worst = {}
    for l in open(os.path.join(os.environ["OUT"], f)):
        p = l.split()
        if len(p) >= 5 and p[0] in ("prefill", "decode", "mixed"):
            try: e = float(p[4])
            except ValueError: continue
            if e > worst.get(p[0], (0, ""))[0]: worst[p[0]] = (e, p[2])
    print(f, worst)
PY
tail -1 $OUT/diff-bf16.txt; tail -1 $OUT/diff-fp8.txt
E=/tmp/llama3-8b.kiln
timeout 170 python3 bench/make_engine.py --kiln .dev/bin/kiln --model llama3-8b --out $E --quant fp8 2>&1 | tail -1
echo "== kiln 128:128,2048:128 x512"
timeout 100 .dev/bin/kiln bench $E --throughput --io 128:128,2048:128 --requests 512 2>&1 | tail -3 | tee $OUT/tp-kiln.txt
echo "== kiln-old 128:128,2048:128 x512"
timeout 100 .dev/bin/kiln-old bench $E --throughput --io 128:128,2048:128 --requests 512 2>&1 | tail -3 | tee $OUT/tp-kiln-old.txt
for e in $E /tmp/llama3-8b-fp8.kiln; do
  echo "== bench $e"
  timeout 45 .dev/bin/kiln bench $e --batch 1 --io 2048:16 2>&1 | tail -2 | tee -a $OUT/fp8-bench.txt
  timeout 45 .dev/bin/kiln bench $e --batch 32 --io 128:64 2>&1 | tail -2 | tee -a $OUT/fp8-bench.txt
done
# Whatever time the call has left: Gemma and Mistral (2 layers) end to end against transformers.
left=$((560 - SECONDS))
if [ $left -gt 60 ]; then
  timeout $left python3 bench/gpu_check.py --models gemma-2b-2l,mistral-7b-2l --diff --cont 16 --work /tmp > $OUT/gpu_check.txt 2>&1
  echo "gpu_check rc=$?"; grep "diff_max\|rel_l2\|Error\|error" $OUT/gpu_check.txt | cut -c1-600 | tail -10
fi
echo "elapsed ${SECONDS}s"
