#!/usr/bin/env python3
"""Side-by-side benchmark on the H100, in one run, on the same random-weight bf16 checkpoint:

  * HF eager      transformers as shipped: `generate()` with its dynamic cache, sdpa attention;
  * HF compiled   the gpt-fast recipe written out by hand: a static KV cache, the one-token decode
                  step (forward + greedy argmax on the device) under
                  torch.compile(mode="reduce-overhead"), i.e. CUDA graphs, replayed step after step
                  with no host work but bumping the position; prefill eager with sdpa;
  * kiln          `kiln bench` on an engine built from the same checkpoint.

For every model, batch and input:output pair it prints ms per decode step, output tok/s, time to
first token (the prefill of the whole batch) and the ratios of kiln to each baseline and to the
weight-streaming roofline (weight bytes read per step / 2.84 TB/s copy bandwidth, DESIGN.md).
Every timed prefill of all three starts after --ttft-idle-ms of idle GPU (default 0: back to
back, where the GPU sits at its power limit; 500: a prompt arriving at an idle GPU).

Usage: python3 bench/side_by_side.py [--kiln .dev/bin/kiln] [--models llama2-7b,llama3-8b]
       [--batch 1,8] [--io 128:256,2048:128] [--kiln-args "--no-pdl"] [--ttft-idle-ms 500]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import CONFIGS, init_range  # noqa: E402

COPY_BW = 2.84e12


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, (time.perf_counter() - t0) * 1e3


def hf_eager(model, batch, inp, out, idle_s):
    """transformers' generate(): (TTFT ms, ms per decode step), medians of 3; each timed prefill
    after idle_s seconds of idle GPU."""
    ids = torch.randint(0, model.config.vocab_size, (batch, inp), device="cuda")
    n = min(out, 16)

    def gen(k):
        with torch.no_grad():
            return timed(lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                eos_token_id=None, pad_token_id=0))[1]

    gen(2)
    ttft = []
    for _ in range(3):
        time.sleep(idle_s)
        ttft.append(gen(1))
    step = [(gen(n) - gen(1)) / (n - 1) for _ in range(3)]
    return statistics.median(ttft), statistics.median(step)


def decode_one(model, tok, pos, cache):
    logits = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def hf_compiled(model, batch, inp, out, idle_s, reps=3):
    """gpt-fast style (see the module docstring): (TTFT ms, ms per decode step), medians; each
    timed prefill after idle_s seconds of idle GPU."""
    ids = torch.randint(0, model.config.vocab_size, (batch, inp), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=inp + out + 8)
    step = torch.compile(decode_one, mode="reduce-overhead")
    ttfts, steps = [], []
    with torch.no_grad():
        for r in range(reps + 1):  # the first round compiles and records the graphs
            cache.reset()
            pos0 = torch.arange(inp, device="cuda")
            torch.cuda.synchronize()
            time.sleep(idle_s)
            tok, ttft = timed(lambda: model(input_ids=ids, past_key_values=cache, cache_position=pos0,
                                            use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True))
            pos = torch.tensor([inp], device="cuda")

            def loop(tok=tok):
                for _ in range(out - 1):
                    torch.compiler.cudagraph_mark_step_begin()
                    tok = step(model, tok, pos, cache).clone()
                    pos.add_(1)
                return tok

            _, ms = timed(loop)
            if r > 0:
                ttfts.append(ttft)
                steps.append(ms / (out - 1))
    return statistics.median(ttfts), statistics.median(steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=".dev/bin/kiln")
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--io", default="128:256,2048:128")
    ap.add_argument("--kiln-args", default="", help="extra `kiln bench` arguments")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--ttft-idle-ms", type=int, default=0,
                    help="idle GPU time before each timed prefill (kiln bench --ttft-idle-ms)")
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    idle_s = args.ttft_idle_ms / 1e3
    batches = [int(b) for b in args.batch.split(",")]
    ios = [tuple(int(x) for x in p.split(":")) for p in args.io.split(",")]
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        std = init_range("width-scaled", CONFIGS[name]["hidden_size"])
        cfg = LlamaConfig(**CONFIGS[name], torch_dtype="bfloat16", initializer_range=std)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        # Bytes a decode step streams: every weight but the embedding table (a gather).
        step_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
        if cfg.tie_word_embeddings:
            step_bytes += model.model.embed_tokens.weight.numel() * 2
        roofline = step_bytes / COPY_BW * 1e3
        ckpt, engine = os.path.join(args.work, f"sbs-{name}"), os.path.join(args.work, f"sbs-{name}.kiln")
        model.save_pretrained(ckpt)
        subprocess.run([args.kiln, "build", ckpt, "-o", engine, "--target", "cuda"], check=True, capture_output=True)
        shutil.rmtree(ckpt)
        kiln = json.loads(subprocess.run([args.kiln, "bench", engine, "--batch", args.batch, "--io", args.io, "--json",
                                          "--ttft-idle-ms", str(args.ttft_idle_ms)] + args.kiln_args.split(), check=True, capture_output=True, text=True).stdout)
        os.remove(engine)
        for r in kiln:
            b, inp, out = r["batch"], r["input"], r["output"]
            eager = (None, None) if args.skip_eager else hf_eager(model, b, inp, out, idle_s)
            try:
                comp = hf_compiled(model, b, inp, out, idle_s)
            except Exception as e:  # report, do not hide
                print(f"torch.compile failed: {type(e).__name__}: {e}", flush=True)
                comp = (None, None)
            row = dict(model=name, batch=b, input=inp, output=out, kiln_ms=r["decode_step_ms"], kiln_ttft=r["ttft_ms"],
                       eager_ms=eager[1], eager_ttft=eager[0], compile_ms=comp[1], compile_ttft=comp[0],
                       roofline_ms=roofline)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()

    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    def ratio(base, k):
        return "-" if base is None else f"{base / k:.2f}×"

    print("\n| model | batch | in:out | kiln ms/step | kiln tok/s | kiln TTFT ms | HF eager ms/step | HF eager TTFT | "
          "HF compiled ms/step | HF compiled TTFT | kiln speed-up vs eager / compiled (step) | "
          "vs compiled (TTFT) | roofline ms (kiln % of it) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k = r["kiln_ms"]
        print(f"| {r['model']} | {r['batch']} | {r['input']}:{r['output']} | {k:.3f} | {1000 * r['batch'] / k:.0f} | "
              f"{r['kiln_ttft']:.1f} | {f(r['eager_ms'])} | {f(r['eager_ttft'], 1)} | {f(r['compile_ms'], 3)} | "
              f"{f(r['compile_ttft'], 1)} | {ratio(r['eager_ms'], k)} / {ratio(r['compile_ms'], k)} | "
              f"{ratio(r['compile_ttft'], r['kiln_ttft'])} | {r['roofline_ms']:.2f} ({100 * r['roofline_ms'] / k:.0f}%) |")


if __name__ == "__main__":
    main()
