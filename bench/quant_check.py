#!/usr/bin/env python3
"""Quantized GPU engines (run on the H100 machine): the W8A16 / W4A16 kernels (gemv_q.cu) against
kiln's CPU executor on the same engine, and their decode speed against the bf16 engine.

For each model shape (random weights drawn as gpu_check.py draws them) it builds a bf16 engine
and one per `--quant` format, then for each engine:
- `kiln diff` (models with `--diff`): every GPU buffer of a 40-token prefill (weights
  dequantized to bf16, then cuBLAS) and of one decode step (the quantized GEMV at M = 1) against
  the CPU executor running the engine's own graph and packed weights in f32;
- teacher-forced logits on the GPU, batch 1 and batch 4 of unequal lengths, against the CPU
  executor on the same engine (two-layer and SmolLM2 shapes) and against transformers' bf16 model
  (the quantization's own error, with top-1 agreement);
- greedy tokens through `kiln serve`, each prompt alone and all together (quantized GEMV at
  M = 1 and M > 1 must agree; `--serve`);
- `kiln bench`: decode step at batch 1 and 8, weight bytes and achieved bandwidth (`--bench`),
  and the per-kernel times of a batch-1 decode step (`--timeline`).

Usage: python3 bench/quant_check.py [--kiln .dev/bin/kiln] [--models smollm2-135m,llama3-8b-2l]
       [--quant int8,int4,int4-sym] [--diff] [--serve] [--bench "--batch 1,8 --io 128:256"]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import (ARCHS, CONFIGS, hf_greedy, hf_teacher, init_range, rel_l2, run,  # noqa: E402
                       serve_agreement, write_word_tokenizer)


def teacher(kiln, engine, prompts, conts, device, work):
    inp, out = os.path.join(work, "tf_in.json"), os.path.join(work, f"tf_{device}.json")
    json.dump({"sequences": [{"prompt": p, "continuation": c} for p, c in zip(prompts, conts)]}, open(inp, "w"))
    run([kiln, "teacher-force", engine, "--input", inp, "--output", out, "--device", device])
    return json.load(open(out))


def top1(a, b):
    n = sum(len(x) for x in b)
    return sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=".dev/bin/kiln")
    ap.add_argument("--models", default="smollm2-135m,llama3-8b-2l")
    ap.add_argument("--quant", default="int8,int4,int4-sym")
    ap.add_argument("--cont", type=int, default=32)
    ap.add_argument("--diff", action="store_true")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--work", default=tempfile.gettempdir())
    ap.add_argument("--bench", action="append", default=[], help="`kiln bench` arguments for every engine")
    ap.add_argument("--timeline", action="store_true", help="per-kernel times of a batch-1 decode step of every engine")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        spec = dict(CONFIGS[name])
        config_cls, model_cls = (getattr(transformers, c) for c in ARCHS[spec.pop("arch", "llama")])
        cfg = config_cls(**spec, torch_dtype="bfloat16", initializer_range=init_range("width-scaled", spec["hidden_size"]))
        with torch.device("cuda"):
            model = model_cls(cfg).to(torch.bfloat16).eval()
        ckpt = os.path.join(args.work, f"ckpt-{name}")
        model.save_pretrained(ckpt, safe_serialization=True)
        write_word_tokenizer(ckpt, cfg.vocab_size)
        g = torch.Generator().manual_seed(1)
        lengths = [[97], [31, 64, 100, 128]]
        cases = []
        for lens in lengths:
            prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
            conts = [hf_greedy(model, p, args.cont) for p in prompts]
            cases.append((prompts, conts, [hf_teacher(model, p, c) for p, c in zip(prompts, conts)]))
        small = name == "smollm2-135m" or cfg.num_hidden_layers <= 4
        for fmt in ["bf16"] + [q for q in args.quant.split(",") if q]:
            engine = os.path.join(args.work, f"{name}-{fmt}.kiln")
            quant = [] if fmt == "bf16" else ["--quant", fmt]
            _, build_s = run([args.kiln, "build", ckpt, "-o", engine, "--target", "cuda", *quant])
            row = dict(model=name, format=fmt, build_s=round(build_s, 1))
            if args.diff:
                ids = torch.randint(1, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(5)).tolist()
                p = subprocess.run([args.kiln, "diff", engine, "--ids", ",".join(map(str, ids)), "--json"],
                                   capture_output=True, text=True)
                if p.returncode not in (0, 1) or not p.stdout.strip():
                    sys.exit(f"kiln diff failed ({p.returncode}): {p.stderr}")
                d = json.loads(p.stdout)
                errs = [b for b in d["buffers"] if b["rel_l2"] is not None]
                for step in ("prefill", "decode"):
                    e = [b["rel_l2"] for b in errs if b["step"] == step]
                    row[f"diff_{step}_max"] = max(e) if e else None
                worst = max(errs, key=lambda b: b["rel_l2"])
                row["diff_worst"] = f"{worst['step']} {worst['buffer']}"
                row["diff_first_over"] = d["first_over"]
            for (prompts, conts, ref), lens in zip(cases, lengths):
                got = teacher(args.kiln, engine, prompts, conts, "cuda", args.work)
                b = len(lens)
                row[f"b{b}_vs_hf_bf16"] = max(rel_l2(got["last_logits"][i], ref[i][0]) for i in range(b))
                row[f"b{b}_top1_vs_hf"] = top1(got["predictions"], [r[1] for r in ref])
                if small:
                    cpu = teacher(args.kiln, engine, prompts, conts, "cpu", args.work)
                    row[f"b{b}_gpu_vs_cpu"] = max(rel_l2(got["last_logits"][i], cpu["last_logits"][i]) for i in range(b))
                    row[f"b{b}_top1_gpu_vs_cpu"] = top1(got["predictions"], cpu["predictions"])
            if args.serve:
                prompts, conts, _ = cases[1]
                s = serve_agreement(args.kiln, engine, prompts, conts)
                row["served_together_equal_alone"] = s["served_together_equal_alone"]
                row["served_divergences"] = s["served_divergences"]
            for extra in args.bench:
                out, _ = run([args.kiln, "bench", engine, *extra.split(), "--json"])
                for r in json.loads(out):
                    row[f"bench_b{r['batch']}_{r['input']}:{r['output']}"] = dict(
                        step_ms=round(r["decode_step_ms"], 3), weight_gb=round(r["weight_bytes"] / 1e9, 3),
                        gb_s=round(r["weight_gb_per_s"], 1), ttft_ms=round(r["ttft_ms"], 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.timeline:
                out, _ = run([args.kiln, "bench", engine, "--batch", "1", "--io", "128:16", "--timeline"])
                print(f"timeline {name} {fmt}:\n{out[out.find('decode step'):]}", flush=True)
            os.remove(engine)
        shutil.rmtree(ckpt)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
