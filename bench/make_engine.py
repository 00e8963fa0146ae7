#!/usr/bin/env python3
"""Makes a kiln GPU engine of a model shape with random weights (gpu_check.py's width-scaled
initialization, bf16) and a word tokenizer (token i is `w{i}`), for benchmarks that need a served
model (bench/serve.sh). The checkpoint is removed once the engine is built.

Usage: python3 bench/make_engine.py --model llama3-8b --out /tmp/llama3-8b.kiln [--kiln .dev/bin/kiln]
       [--quant fp8]  (also /tmp/llama3-8b-fp8.kiln from the same weights)
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import ARCHS, CONFIGS, init_range, write_word_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=".dev/bin/kiln")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quant", help="also build a `--quant` engine of the same weights, at OUT with the format before `.kiln`")
    args = ap.parse_args()
    conf = dict(CONFIGS[args.model])
    config_cls, model_cls = (getattr(transformers, c) for c in ARCHS[conf.pop("arch", "llama")])
    cfg = config_cls(**conf, torch_dtype="bfloat16",
                     initializer_range=init_range("width-scaled", conf["hidden_size"]))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_cls(cfg).to(torch.bfloat16)
    ckpt = tempfile.mkdtemp(prefix=f"{args.model}-ckpt-", dir=os.path.dirname(os.path.abspath(args.out)))
    model.save_pretrained(ckpt)
    write_word_tokenizer(ckpt, cfg.vocab_size)
    del model
    torch.cuda.empty_cache()
    t0 = time.time()
    subprocess.run([args.kiln, "build", ckpt, "-o", args.out, "--target", "cuda"], check=True,
                   stdout=subprocess.DEVNULL)
    if args.quant:
        quant_out = args.out.removesuffix(".kiln") + f"-{args.quant}.kiln"
        subprocess.run([args.kiln, "build", ckpt, "-o", quant_out, "--target", "cuda", "--quant", args.quant],
                       check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(ckpt)
    print(f"{args.out}: {args.model} engine built in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
