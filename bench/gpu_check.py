#!/usr/bin/env python3
"""GPU check (run on the H100 machine): kiln against HF transformers on the same random-weight
checkpoints.

For each config (SmolLM2-135M, Llama-2-7B, Llama-3-8B, Llama-3.1-8B, Qwen2.5-7B, Mistral-7B
shapes and two-layer variants, bf16) it makes a random-weight checkpoint with transformers, builds a kiln GPU engine from it, and runs both on the same
prompts: batch 1, and batch 4 with unequal prompt lengths. It prints per model and batch:
relative L2 error of the last-prompt-token logits, teacher-forced top-1 agreement over a
transformers greedy continuation, and decode speed of both. With --cpu-agree it also checks that
the GPU engine agrees with kiln's CPU executor on the smallest model.

Random weights: `--init width-scaled` (the default) draws every matrix with standard deviation
0.02·sqrt(576/hidden), which is transformers' 0.02 at the SmolLM2 width and keeps the per-layer
gain of the wider models at the SmolLM2 shape's (gain ≈ std·sqrt(fan_in) < 1, like a trained
model); `--init hf` keeps transformers' 0.02 at every width, which at hidden 4096 gives each
projection a gain above 1: a chaotic 32-layer stack whose own bf16 run is 15% away from its
fp32 run, so no bf16 implementation can agree with it to 2e-2 (bench/RESULTS.md).

It also checks that a KV cache larger than the GPU is refused with how much memory it needs.

Usage: python3 bench/gpu_check.py [--kiln .dev/bin/kiln] [--models smollm2,llama2-7b,llama3-8b]
       [--init width-scaled|hf]
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time, urllib.request

import torch
import transformers

# Families by transformers class: a config entry's "arch" (default llama).
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}

CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=8192),
}


# Llama 3.1: Llama 3's shape with `llama3` RoPE scaling (frequencies below the original context's
# wavelengths divided by 8): kiln stores the frequency table the model file computes.
CONFIGS["llama31-8b"] = dict(
    {k: v for k, v in CONFIGS["llama3-8b"].items() if k != "rope_theta"}, max_position_embeddings=131072,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192))

# Qwen2.5-7B: q/k/v biases (one bias epilogue on the fused QKV), RoPE base 1e6, 28 heads over 4
# KV heads. transformers initializes biases to zero; the check draws them at random (below).
CONFIGS["qwen25-7b"] = dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            max_position_embeddings=32768)

# Mistral-7B (v0.1): Llama's layer with a sliding window of 4096 keys; the two-layer variant
# narrows the window to 64 so that the check's prompts (up to 128 tokens) and their
# continuations run past it, in prefill and in decode.
CONFIGS["mistral-7b"] = dict(arch="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             max_position_embeddings=32768, sliding_window=4096)

# Phi-3-mini: q/k/v and gate/up stored fused in the checkpoint, a sliding window of 2047 keys.
CONFIGS["phi3-mini"] = dict(arch="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            max_position_embeddings=4096, sliding_window=2047, pad_token_id=0)

# Gemma-7B: GeGLU MLP (tanh GELU), RMSNorm gain 1 + w, the embedding times sqrt(hidden), head
# size 256, tied embeddings; Gemma-2B has one KV head (MQA). transformers initializes the norm
# weights to zero (gain 1); the check draws them at random (below).
CONFIGS["gemma-7b"] = dict(arch="gemma", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000,
                           rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                           tie_word_embeddings=True, max_position_embeddings=8192)
CONFIGS["gemma-2b"] = dict(CONFIGS["gemma-7b"], hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                           num_attention_heads=8, num_key_value_heads=1)

# Two-layer variants: the same widths, heads and vocabularies, small enough for fp32 references.
CONFIGS["llama3-8b-2l"] = dict(CONFIGS["llama3-8b"], num_hidden_layers=2)
CONFIGS["llama2-7b-2l"] = dict(CONFIGS["llama2-7b"], num_hidden_layers=2)
CONFIGS["llama31-8b-2l"] = dict(CONFIGS["llama31-8b"], num_hidden_layers=2)
CONFIGS["qwen25-7b-2l"] = dict(CONFIGS["qwen25-7b"], num_hidden_layers=2)
CONFIGS["mistral-7b-2l"] = dict(CONFIGS["mistral-7b"], num_hidden_layers=2, sliding_window=64)
CONFIGS["phi3-mini-2l"] = dict(CONFIGS["phi3-mini"], num_hidden_layers=2, sliding_window=64)
CONFIGS["gemma-7b-2l"] = dict(CONFIGS["gemma-7b"], num_hidden_layers=2)
CONFIGS["gemma-2b-2l"] = dict(CONFIGS["gemma-2b"], num_hidden_layers=2)


def rel_l2(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_teacher(model, prompt, cont):
    """Last-prompt logits and argmax predictions at each continuation position (one forward)."""
    ids = torch.tensor([prompt + cont], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    last = logits[len(prompt) - 1]
    preds = logits[len(prompt) - 1: len(prompt) + len(cont) - 1].argmax(-1).tolist()
    return last.cpu(), preds


def hf_decode_speed(model, prompt, n=64):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def write_word_tokenizer(ckpt, vocab):
    """A WordLevel tokenizer.json whose token i is the word `w{i}` (0 is `<unk>`): random-weight
    checkpoints get one so that `kiln serve` runs on them, and served text maps back to ids."""
    words = {"<unk>": 0}
    words.update({f"w{i}": i for i in range(1, vocab)})
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}}
    with open(os.path.join(ckpt, "tokenizer.json"), "w") as f:
        json.dump(tok, f)


def word_ids(text):
    """Token ids of text written with a `write_word_tokenizer` tokenizer."""
    return [int(w[1:]) if w.startswith("w") else 0 for w in text.split()]


class Server:
    """`kiln serve` on an engine (GPU), on a free port, until closed (SIGTERM, then wait)."""

    def __init__(self, kiln, engine, *extra):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([kiln, "serve", engine, "--port", str(self.port), *extra],
                                     stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() - t0 > 300:
                    raise RuntimeError(f"kiln serve did not start: {self.proc.stderr.read()}")
                time.sleep(0.5)

    def complete(self, prompt, n):
        body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", body, {"content-type": "application/json"})
        return word_ids(json.loads(urllib.request.urlopen(req, timeout=600).read())["choices"][0]["text"])

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def serve_agreement(kiln, engine, prompts, conts):
    """Greedy tokens through `kiln serve` (the continuous-batching scheduler on the GPU): each
    prompt alone, then all together with copies sharing prefixes; against each other and against
    transformers' greedy continuation."""
    from concurrent.futures import ThreadPoolExecutor
    srv = Server(kiln, engine, "--max-num-seqs", "64")
    try:
        alone = [srv.complete(p, len(c)) for p, c in zip(prompts, conts)]
        # Together: every prompt, plus a copy extended by a few tokens (a shared prefix).
        jobs = [(p, len(c)) for p, c in zip(prompts, conts)] + [(p + p[:5], len(c)) for p, c in zip(prompts, conts)]
        with ThreadPoolExecutor(len(jobs)) as ex:
            together = list(ex.map(lambda j: srv.complete(*j), jobs))
    finally:
        rc = srv.close()

    def prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    # Where a sequence served together diverges from the same prompt alone: the logit margin
    # between the two tokens at that position (kiln's own logits, teacher-forced on the prompt
    # and the shared prefix). A margin within bf16 rounding of the logits means batch variance
    # (batched GEMMs round differently from M = 1 GEMVs), not a scheduling error.
    margins = []
    for i, (t, a) in enumerate(zip(together, alone)):
        n = prefix(t, a)
        if n < min(len(t), len(a)):
            work = tempfile.mkdtemp()
            inp, out = os.path.join(work, "in.json"), os.path.join(work, "out.json")
            json.dump({"sequences": [{"prompt": prompts[i] + a[:n], "continuation": [a[n]]}]}, open(inp, "w"))
            run([kiln, "teacher-force", engine, "--input", inp, "--output", out, "--device", "cuda"])
            logits = json.load(open(out))["last_logits"][0]
            top = sorted(logits, reverse=True)
            margins.append(dict(seq=i, position=n, alone_token_logit=logits[a[n]],
                                together_token_logit=logits[t[n]], margin=logits[a[n]] - logits[t[n]],
                                top1_top2_gap=top[0] - top[1], logit_scale=max(abs(v) for v in logits)))
            shutil.rmtree(work)
    return dict(
        served_together_equal_alone=sum(t == a for t, a in zip(together, alone)) / len(alone),
        served_alone_vs_hf_prefix=min(prefix(a, c) / len(c) for a, c in zip(alone, conts)),
        served_divergences=margins,
        served_exit=rc,
    )


def init_range(init, hidden):
    """Standard deviation of the random weights (see the module docstring)."""
    return 0.02 if init == "hf" else 0.02 * (576 / hidden) ** 0.5


def oom_message(kiln, engine):
    """`kiln run` with a KV cache far beyond the GPU must fail with a clear message, not a panic."""
    p = subprocess.run([kiln, "run", engine, "--device", "cuda", "-p", "hi", "--max-new-tokens", "1",
                        "--max-kv-tokens", "100000000"], capture_output=True, text=True)
    msg = (p.stderr.strip().splitlines() or [""])[-1]
    ok = p.returncode != 0 and "not enough GPU memory" in msg and "MiB" in msg and "panick" not in p.stderr
    return ok, msg


def run(cmd):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=".dev/bin/kiln")
    ap.add_argument("--models", default="smollm2-135m,llama2-7b,llama3-8b")
    ap.add_argument("--cont", type=int, default=128)
    ap.add_argument("--cpu-agree", action="store_true")
    ap.add_argument("--serve", action="store_true",
                    help="also serve the batch-4 prompts through `kiln serve` (alone and together)")
    ap.add_argument("--diff", action="store_true", help="run `kiln diff` on each engine (every GPU buffer against the CPU graph)")
    ap.add_argument("--init", choices=["width-scaled", "hf"], default="width-scaled")
    ap.add_argument("--work", default=tempfile.gettempdir())
    ap.add_argument("--bench", action="append", default=[], help="extra `kiln bench` arguments, e.g. '--batch 1,4,8 --io 128:256,2048:128'")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        std = init_range(args.init, CONFIGS[name]["hidden_size"])
        print(f"{name}: random weights, std {std:.4g} ({args.init})", flush=True)
        spec = dict(CONFIGS[name])
        config_cls, model_cls = (getattr(transformers, c) for c in ARCHS[spec.pop("arch", "llama")])
        cfg = config_cls(**spec, torch_dtype="bfloat16", initializer_range=std)
        with torch.device("cuda"):
            model = model_cls(cfg).to(torch.bfloat16).eval()
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname.endswith(".bias") or (cfg.model_type == "gemma" and pname.endswith("norm.weight")):
                        p.normal_(0.0, 0.1)
        ckpt = os.path.join(args.work, f"ckpt-{name}")
        engine = os.path.join(args.work, f"{name}.kiln")
        model.save_pretrained(ckpt, safe_serialization=True)
        write_word_tokenizer(ckpt, cfg.vocab_size)
        _, build_s = run([args.kiln, "build", ckpt, "-o", engine, "--target", "cuda"])
        shutil.rmtree(ckpt)
        ok, msg = oom_message(args.kiln, engine)
        print(json.dumps(dict(model=name, oom_refused_clearly=ok, message=msg)), flush=True)
        g = torch.Generator().manual_seed(1)
        vocab = cfg.vocab_size
        if args.diff:
            ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(5)).tolist()
            p = subprocess.run([args.kiln, "diff", engine, "--ids", ",".join(map(str, ids)), "--json"],
                               capture_output=True, text=True)
            d = json.loads(p.stdout)
            errs = [b["rel_l2"] for b in d["buffers"] if b["rel_l2"] is not None]
            worst = max(d["buffers"], key=lambda b: b["rel_l2"] or 0)
            rows.append(dict(model=name, diff_buffers=len(d["buffers"]), diff_compared=len(errs),
                             diff_max=max(errs), diff_worst=f"{worst['step']} {worst['buffer']}",
                             diff_first_over=d["first_over"], diff_exit=p.returncode,
                             diff_max_by_step={st: max((b["rel_l2"] for b in d["buffers"]
                                                        if b["step"] == st and b["rel_l2"] is not None),
                                                       default=None)
                                               for st in ("prefill", "decode", "mixed")}))
            print(json.dumps(rows[-1]), flush=True)
        lengths = [[97], [31, 64, 100, 128]]
        for lens in lengths:
            prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
            conts = [hf_greedy(model, p, args.cont) for p in prompts]
            ref = [hf_teacher(model, p, c) for p, c in zip(prompts, conts)]
            inp = os.path.join(args.work, "tf_in.json")
            out = os.path.join(args.work, "tf_out.json")
            json.dump({"sequences": [{"prompt": p, "continuation": c} for p, c in zip(prompts, conts)]}, open(inp, "w"))
            run([args.kiln, "teacher-force", engine, "--input", inp, "--output", out, "--device", "cuda"])
            got = json.load(open(out))
            errs = [rel_l2(got["last_logits"][i], ref[i][0]) for i in range(len(prompts))]
            agree = sum(a == b for i in range(len(prompts)) for a, b in zip(got["predictions"][i], ref[i][1]))
            total = sum(len(ref[i][1]) for i in range(len(prompts)))
            row = dict(model=name, batch=len(lens), logits_rel_l2=max(errs), top1_agreement=agree / total)
            if len(lens) == 1:
                # Where it fits, the precision floor: transformers in fp32 against its own bf16.
                m32 = model_cls(cfg).to("cuda", torch.float32).eval()
                m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
                last32, preds32 = hf_teacher(m32, prompts[0], conts[0])
                row["hf_bf16_vs_fp32"] = rel_l2(ref[0][0], last32)
                row["kiln_vs_fp32"] = rel_l2(got["last_logits"][0], last32)
                # Teacher-forced top-1 agreement with the fp32 run, of each bf16 implementation.
                row["hf_bf16_vs_fp32_top1"] = sum(a == b for a, b in zip(ref[0][1], preds32)) / len(preds32)
                row["kiln_vs_fp32_top1"] = sum(a == b for a, b in zip(got["predictions"][0], preds32)) / len(preds32)
                del m32
                torch.cuda.empty_cache()
            if args.cpu_agree and (name == "smollm2-135m" or cfg.num_hidden_layers <= 4) and len(lens) == 1:
                out_cpu = os.path.join(args.work, "tf_cpu.json")
                run([args.kiln, "teacher-force", engine, "--input", inp, "--output", out_cpu, "--device", "cpu"])
                cpu = json.load(open(out_cpu))
                row["gpu_vs_cpu_rel_l2"] = rel_l2(got["last_logits"][0], cpu["last_logits"][0])
                row["gpu_vs_cpu_top1"] = sum(a == b for a, b in zip(got["predictions"][0], cpu["predictions"][0])) / len(cpu["predictions"][0])
            if args.serve and len(lens) > 1:
                row.update(serve_agreement(args.kiln, engine, prompts, conts))
            rows.append(row)
            print(json.dumps(row), flush=True)
        bench, _ = run([args.kiln, "bench", engine, "--batch", "1", "--io", "128:128", "--json"])
        kiln_step = json.loads(bench)[0]["decode_step_ms"]
        hf_tps = hf_decode_speed(model, torch.randint(0, vocab, (128,), generator=g).tolist())
        rows.append(dict(model=name, build_s=round(build_s, 1), kiln_decode_tok_s=round(1000 / kiln_step, 1),
                         hf_eager_decode_tok_s=round(hf_tps, 1)))
        print(json.dumps(rows[-1]), flush=True)
        for extra in args.bench:
            table, _ = run([args.kiln, "bench", engine] + extra.split())
            print(f"kiln bench {name} {extra}:\n{table}", flush=True)
        os.remove(engine)
        del model
        torch.cuda.empty_cache()
    print("\n| model | batch | logits rel L2 | top-1 agreement | GPU vs CPU |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "batch" in r:
            cpu = f"{r['gpu_vs_cpu_rel_l2']:.2e} / {r['gpu_vs_cpu_top1']:.1%}" if "gpu_vs_cpu_rel_l2" in r else ""
            if "kiln_vs_fp32" in r:
                cpu += (f" (vs fp32: kiln {r['kiln_vs_fp32']:.2e} / {r['kiln_vs_fp32_top1']:.1%}, "
                        f"HF bf16 {r['hf_bf16_vs_fp32']:.2e} / {r['hf_bf16_vs_fp32_top1']:.1%})")
            print(f"| {r['model']} | {r['batch']} | {r['logits_rel_l2']:.2e} | {r['top1_agreement']:.1%} | {cpu} |")
    if args.diff:
        print("\n| model | buffers (compared) | max rel L2 | worst buffer | first over tolerance |")
        print("|---|---:|---:|---|---|")
        for r in rows:
            if "diff_max" in r:
                print(f"| {r['model']} | {r['diff_buffers']} ({r['diff_compared']}) | {r['diff_max']:.2e} | "
                      f"{r['diff_worst']} | {r['diff_first_over'] or 'none'} |")
    print("\n| model | build s | kiln decode tok/s (b=1) | HF eager decode tok/s (b=1) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        if "build_s" in r:
            print(f"| {r['model']} | {r['build_s']} | {r['kiln_decode_tok_s']} | {r['hf_eager_decode_tok_s']} |")


if __name__ == "__main__":
    main()
