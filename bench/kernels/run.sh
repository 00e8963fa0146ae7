#!/usr/bin/env bash
# GPU check and benchmark of the kernel templates (compiler/examples/kernel_check/).
#
#   bench/kernels/run.sh build        here: release-build the example and copy it, stripped, to
#                                     .dev/bin/kernel_check (git-ignored; carry it to the GPU machine)
#   bench/kernels/run.sh run [STEP…]  on the GPU machine: run every step (or the ones named) in its
#                                     own process (a kernel that breaks the CUDA context cannot hide
#                                     the other results), then print the summary tables. NVRTC
#                                     compiles the kernels there once (headers from
#                                     /usr/local/cuda/include); logs go to $OUT when it is set.
#
# Device call: run(command="bash bench/kernels/run.sh run", carry=[".dev/bin"]).
# The summary tables go to bench/RESULTS.md, section "Kernels".
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  build)
    cargo build --release -p kiln-compiler --example kernel_check
    mkdir -p .dev/bin
    objcopy --strip-debug target/release/examples/kernel_check .dev/bin/kernel_check
    ls -la .dev/bin/kernel_check
    ;;
  run)
    shift
    steps=("$@")
    if [ ${#steps[@]} -eq 0 ]; then
      steps=(info embedding rmsnorm gemv elementwise quant rope decode prefill argmax sample bench-gemv bench-attention bench-sample)
    fi
    out=${OUT:-/tmp}
    log=$out/kernels.log
    : >"$log"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.mem,temperature.gpu --format=csv >>"$log" 2>&1 || true
    export KILN_KERNEL_CACHE=/tmp/kiln-kernel-cache
    for s in "${steps[@]}"; do
      rc=0
      timeout 180 .dev/bin/kernel_check "$s" >>"$log" 2>&1 || rc=$?
      [ $rc -eq 0 ] || echo "FAIL step $s: exit status $rc: rel err inf (tol 0e0)" >>"$log"
    done
    python3 - "$log" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
print("\n".join(l for l in lines if not re.match(r"(PASS|FAIL|TIME) ", l)))
print("\n| check | rel. L2 error | tolerance | result |\n|---|---:|---:|---|")
for l in lines:
    m = re.match(r"(PASS|FAIL) (.*): rel err (\S+) \(tol (\S+)\)", l)
    if m:
        print(f"| {m[2]} | {m[3]} | {m[4]} | {'pass' if m[1] == 'PASS' else '**FAIL**'} |")
print("\n| kernel | time |\n|---|---|")
for l in lines:
    m = re.match(r"TIME (.*): (.*)", l)
    if m:
        print(f"| {m[1]} | {m[2]} |")
fails = sum(1 for l in lines if l.startswith("FAIL"))
print(f"\n{sum(1 for l in lines if l.startswith(('PASS', 'FAIL')))} checks, {fails} failed")
PY
    ;;
  *)
    echo "usage: $0 build | run [STEP…]" >&2
    exit 2
    ;;
esac
