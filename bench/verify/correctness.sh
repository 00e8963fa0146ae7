#!/usr/bin/env bash
# Verification only: the prefill grid and act_fp8 codes (kernel_check), and kiln diff of a mixed
# step (bf16) and of the fp8 cuBLASLt path against the CPU executor, Llama-3-8B shape, 2 layers.
cd "$(dirname "$0")/../.."
mkdir -p .dev/bin
gunzip -c .dev/gz/kiln.gz > .dev/bin/kiln
gunzip -c .dev/kc/kernel_check.gz > .dev/bin/kernel_check
chmod +x .dev/bin/*
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
IDS=5,17,99,1000,2000,3000,4000,5000,6000,7000,8000,9000,10000,11000,12000,13000,100,200,300,400
timeout 75 python3 bench/make_engine.py --model llama3-8b-2l --out /tmp/l2.kiln --quant fp8 2>&1 | tail -1
timeout 40 .dev/bin/kiln diff /tmp/l2.kiln --ids $IDS > $OUT/diff-bf16.txt 2>&1; echo "diff bf16 rc=$?"
timeout 40 .dev/bin/kiln diff /tmp/l2-fp8.kiln --ids $IDS --tolerance 0.3 > $OUT/diff-fp8.txt 2>&1; echo "diff fp8 rc=$?"
python3 - <<'PY'
import os
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
timeout 100 bash bench/kernels/run.sh run prefill quant > $OUT/kernels.txt 2>&1
echo "kernels rc=$?"; grep -i "fail\|act_fp8\|checks" $OUT/kernels.txt | tail -12
