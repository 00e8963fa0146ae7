#!/usr/bin/env python3
"""Per-kernel time of one kiln step on the H100, from Nsight Compute (run on the GPU machine).

Makes a two-layer random-weight checkpoint of a config (the per-layer kernels are those of the
full model), builds a kiln engine, and runs `kiln bench` under `ncu --clock-control none` (the
clocks are left alone) for a decode step (batch 1) and a prefill step (one prompt), kernel by
kernel (no CUDA graphs). Prints, per phase, each kernel's count and total and mean duration. ncu
runs kernels one at a time, so the sum is the step without launch overlap: compare it with the
graph-replayed step of `kiln bench` to see what launches and boundaries cost.

Usage: python3 bench/profile_kernels.py [--kiln .dev/bin/kiln] [--model llama2-7b]
       [--prefill 2048] [--ncu ncu]
"""
import argparse, collections, csv, io, os, shutil, subprocess, sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import CONFIGS, init_range  # noqa: E402


def ncu_times(ncu, cmd):
    """[(kernel name, µs)] of every kernel `cmd` launches."""
    p = subprocess.run([ncu, "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv",
                        "--print-units", "base"] + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ncu failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    text = p.stdout[p.stdout.index('"ID"'):]
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            out.append((row["Kernel Name"], float(row["Metric Value"].replace(",", "")) / 1e3))
    return out


def short(name):
    n = name.split("(")[0]
    return n if len(n) < 60 else n[:57] + "..."


def table(title, times, steps):
    by = collections.OrderedDict()
    for n, us in times:
        c, t = by.get(short(n), (0, 0.0))
        by[short(n)] = (c + 1, t + us)
    total = sum(t for _, t in by.values())
    print(f"\n{title}: {len(times)} kernels, {total:.1f} µs in all ({total / steps:.1f} µs per step)")
    print("| kernel | launches per step | µs per step | mean µs |")
    print("|---|---:|---:|---:|")
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| `{n}` | {c / steps:g} | {t / steps:.1f} | {t / c:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=".dev/bin/kiln")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    conf = dict(CONFIGS[args.model], num_hidden_layers=2)
    cfg = LlamaConfig(**conf, torch_dtype="bfloat16", initializer_range=init_range("width-scaled", conf["hidden_size"]))
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ckpt, engine = os.path.join(args.work, "prof-ckpt"), os.path.join(args.work, "prof.kiln")
    model.save_pretrained(ckpt)
    del model
    torch.cuda.empty_cache()
    subprocess.run([args.kiln, "build", ckpt, "-o", engine, "--target", "cuda"], check=True, capture_output=True)
    shutil.rmtree(ckpt)
    n = args.decode_steps
    # `kiln bench` runs a warm-up pass, then the measured one: each is one prefill and n-1 decode
    # steps, so a run with output n has 2 prefills and 2(n-1) decode steps.
    dec = ncu_times(args.ncu, [args.kiln, "bench", engine, "--batch", "1", "--io", f"128:{n}", "--no-cuda-graphs"])
    pre = ncu_times(args.ncu, [args.kiln, "bench", engine, "--batch", "1", "--io", f"{args.prefill}:1", "--no-cuda-graphs"])
    # Decode kernels: everything the decode run launched beyond its two prefills.
    pre_128 = ncu_times(args.ncu, [args.kiln, "bench", engine, "--batch", "1", "--io", "128:1", "--no-cuda-graphs"])
    print(f"model {args.model} with 2 layers; per-layer kernels are those of the full model")
    table(f"decode (batch 1, context 128..{128 + n})", strip_prefills(dec, len(pre_128) // 2), 2 * (n - 1))
    table(f"prefill ({args.prefill} tokens)", pre, 2)


def strip_prefills(launches, per_prefill):
    """Drops the two prefill steps (each `per_prefill` launches) from a bench run's launches:
    the run is [prefill, decode × (n-1)] twice."""
    half = len(launches) // 2
    return launches[per_prefill:half] + launches[half + per_prefill:]


if __name__ == "__main__":
    main()
