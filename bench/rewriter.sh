#!/usr/bin/env bash
# Rewriter benchmark: for SmolLM2-135M and Llama-3-8B (models/llama.ron with the configs in
# tests/fixtures), f32 and bf16: ops per decoder layer before rewriting, kernels per layer after,
# the estimated decode-step cost before and after, and the rewrite time (the whole graph, all
# layers; median of 5 runs of `kiln inspect --json`, release build). Prints a markdown section for
# bench/RESULTS.md. Usage: bench/rewriter.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
echo "## Rewriter (\`bench/rewriter.sh\`)"
echo
echo "$(date -u +%Y-%m-%d), $(nproc)-core development machine (no GPU), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + working tree'), release build."
echo "Ops = non-leaf nodes of decoder layer 0 as written in models/llama.ron; kernels = launches under"
echo "the cost model's definition (compiler/src/rewrite/cost.rs: views and KV-cache appends are not"
echo "kernels, weight-only nodes are folded at build time). Cost = estimated time of one decode step"
echo "(batch 1, 1023 cached tokens) on an H100-class GPU. Rewrite time: median of 5 runs, whole graph."
echo
echo "| model | dtype | layers | ops/layer before | kernels/layer before | kernels/layer after | kernels total before → after | est. decode step before → after | rewrite time | \`kiln inspect\` wall time |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for cfg in smollm2-135m llama-3-8b; do
  for dtype in f32 bf16; do
    python3 - "$cfg" "$dtype" <<'PY'
import json, statistics, subprocess, sys, time
cfg, dtype = sys.argv[1], sys.argv[2]
cmd = ["target/release/kiln", "inspect", "models/llama.ron", "--config",
       f"tests/fixtures/{cfg}/config.json", "--json", "--dtype", dtype]
runs, walls = [], []
for _ in range(5):
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    walls.append(time.perf_counter() - t0)
    runs.append(json.loads(out))
r = runs[0]
layers = json.load(open(f"tests/fixtures/{cfg}/config.json"))["num_hidden_layers"]
ms = statistics.median(x["rewrite_ms"] for x in runs)
wall = statistics.median(walls)
cb, ca = r["cost_before_detail"], r["cost_after_detail"]
print(f"| {cfg} | {dtype} | {layers} | {r['ops_per_layer_before']} | {r['kernels_per_layer_before']} "
      f"| {r['kernels_per_layer_after']} | {cb['kernels']} → {ca['kernels']} "
      f"| {cb['time_ns']/1e3:.0f} → {ca['time_ns']/1e3:.0f} µs | {ms:.0f} ms | {wall*1e3:.0f} ms |")
PY
  done
done
echo
python3 - <<'PY'
import json, subprocess
out = subprocess.run(["target/release/kiln", "inspect", "models/llama.ron", "--config",
                      "tests/fixtures/llama-3-8b/config.json", "--json"],
                     check=True, capture_output=True, text=True).stdout
r = json.loads(out)
k = ", ".join(f"{op} ×{n}" for op, n in r["layer_after"]["kernel_ops"].items())
print(f"Kernels of one Llama-3-8B layer after rewriting: {k} "
      f"({r['layer_after']['views']} views, {r['layer_after']['cache_appends']} cache appends). ")
print("Per phase (Llama-3-8B, f32): " + "; ".join(
    f"`{p['name']}` {p['iterations']} iterations, {'saturated' if p['saturated'] else p['stop']}, "
    f"e-graph {p['egraph_nodes']} nodes, {p['time_ms']:.0f} ms" for p in r["phases"]) + ".")
PY
