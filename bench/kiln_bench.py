#!/usr/bin/env python3
"""kiln alone on the H100: for each model config, a random-weight bf16 checkpoint (the same
width-scaled initialization as gpu_check.py), a kiln engine built from it, and `kiln bench` with
the given arguments (e.g. --timeline for per-kernel times). For quick A/B runs of kiln changes:
give --kiln twice (a previous binary, then the new one) and each builds its own engine from the
same checkpoint and benches it, in turns, in the same run. bench/side_by_side.py adds the
PyTorch baselines.

Usage: python3 bench/kiln_bench.py [--kiln .dev/bin/kiln]… [--models llama2-7b,llama3-8b]
       [--bench "--batch 1,8 --io 128:256,2048:128 --timeline"] [--bench "--no-pdl" …]
"""
import argparse, os, shlex, shutil, subprocess, sys, time

import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check import ARCHS, CONFIGS, init_range  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", action="append", default=[],
                    help="kiln binary; repeat to compare binaries (default .dev/bin/kiln)")
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--bench", action="append", default=[],
                    help="`kiln bench` arguments; repeat for several runs on one engine "
                         "(default: --batch 1,8 --io 128:256,2048:128)")
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    kilns = args.kiln or [".dev/bin/kiln"]
    for name in args.models.split(","):
        conf = dict(CONFIGS[name])
        config_cls, model_cls = (getattr(transformers, c) for c in ARCHS[conf.pop("arch", "llama")])
        cfg = config_cls(**conf, torch_dtype="bfloat16",
                         initializer_range=init_range("width-scaled", conf["hidden_size"]))
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = model_cls(cfg).to(torch.bfloat16)
        ckpt = os.path.join(args.work, f"{name}-ckpt")
        model.save_pretrained(ckpt)
        del model
        torch.cuda.empty_cache()
        engines = []
        for i, kiln in enumerate(kilns):
            engine = os.path.join(args.work, f"{name}-{i}.kiln")
            t0 = time.time()
            subprocess.run([kiln, "build", ckpt, "-o", engine, "--target", "cuda"], check=True,
                           stdout=subprocess.DEVNULL)
            print(f"\n## {name}: engine built by {kiln} in {time.time() - t0:.1f} s", flush=True)
            engines.append(engine)
        shutil.rmtree(ckpt)
        for b in args.bench or ["--batch 1,8 --io 128:256,2048:128"]:
            for kiln, engine in zip(kilns, engines):
                print(f"\n### {kiln} bench {b}", flush=True)
                subprocess.run([kiln, "bench", engine] + shlex.split(b), check=True)
        for engine in engines:
            os.remove(engine)


if __name__ == "__main__":
    main()
