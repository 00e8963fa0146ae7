#!/usr/bin/env python3
"""Side-by-side decode benchmark on the H100, in one run: HF transformers eager, HF transformers
with a static cache (generate() then compiles the decode step with torch.compile,
mode="reduce-overhead", i.e. CUDA graphs: the gpt-fast recipe), and kiln,
on the same random-weight bf16 checkpoint. Prints ms per decode step, tok/s and the ratios, and
the weight-streaming roofline (weight bytes / 2.84 TB/s copy bandwidth, DESIGN.md).

Usage: python3 bench/side_by_side.py [--kiln .dev/bin/kiln] [--models llama3-8b] [--batch 1,8]
       [--io 128:256]
"""
import argparse, json, os, shutil, subprocess, sys, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import CONFIGS  # noqa: E402

COPY_BW = 2.84e12


def step_ms(model, batch, inp, out, **kw):
    """Per decode step: (time of out tokens - time of 1 token) / (out - 1), median of 3."""
    ids = torch.randint(0, model.config.vocab_size, (batch, inp), device="cuda")

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(out), gen(1)  # warm up (and compile)
    runs = sorted((gen(out) - gen(1)) / (out - 1) for _ in range(3))
    return runs[1] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=".dev/bin/kiln")
    ap.add_argument("--models", default="llama3-8b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--io", default="128:256")
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    inp, out = (int(x) for x in args.io.split(":"))
    rows = []
    for name in args.models.split(","):
        cfg = LlamaConfig(**CONFIGS[name], torch_dtype="bfloat16")
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = weight_bytes / COPY_BW * 1e3
        ckpt, engine = os.path.join(args.work, f"sbs-{name}"), os.path.join(args.work, f"sbs-{name}.kiln")
        model.save_pretrained(ckpt)
        subprocess.run([args.kiln, "build", ckpt, "-o", engine, "--target", "cuda"], check=True, capture_output=True)
        shutil.rmtree(ckpt)
        kiln = json.loads(subprocess.run([args.kiln, "bench", engine, "--batch", args.batch, "--io", args.io, "--json"],
                                         check=True, capture_output=True, text=True).stdout)
        os.remove(engine)
        eager = {b: step_ms(model, b, inp, min(out, 16)) for b in batches}
        compiled = {}
        try:
            # transformers compiles the decoding forward itself (torch.compile, mode
            # "reduce-overhead": CUDA graphs) when generate() runs with a static cache.
            compiled = {b: step_ms(model, b, inp, min(out, 64), cache_implementation="static") for b in batches}
        except Exception as e:  # report, do not hide
            print(f"torch.compile failed: {type(e).__name__}: {e}", flush=True)
        for r in kiln:
            b = r["batch"]
            row = dict(model=name, batch=b, kiln_ms=r["decode_step_ms"], eager_ms=eager[b],
                       compile_ms=compiled.get(b), roofline_ms=roofline)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\n| model | batch | kiln ms/step | kiln tok/s | HF eager ms | HF torch.compile ms | kiln vs eager | kiln vs compile | roofline ms (kiln % of it) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["compile_ms"]
        cs = f"{c:.3f}" if c else "failed"
        cr = f"{c / r['kiln_ms']:.2f}×" if c else "-"
        print(f"| {r['model']} | {r['batch']} | {r['kiln_ms']:.3f} | {1000 * r['batch'] / r['kiln_ms']:.0f} | "
              f"{r['eager_ms']:.2f} | {cs} | {r['eager_ms'] / r['kiln_ms']:.1f}× | {cr} | "
              f"{r['roofline_ms']:.2f} ({100 * r['roofline_ms'] / r['kiln_ms']:.0f}%) |")


if __name__ == "__main__":
    main()
