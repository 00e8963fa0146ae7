#!/usr/bin/env bash
# Regenerates the seed corpus of the fuzz targets, fuzz/corpus/<target>/, from real files and the
# project's own writers (the test `write_seed_corpus` in tests/fuzz_corpus.rs):
#   model_ron               the shipped families (models/*.ron) and the toy family of
#                           docs/model-language.md
#   expr                    the expressions of models/*.ron (+ one using the functions)
#   gguf                    a tiny Llama GGUF (tokenizer, chat template, F32/F16/BF16 and quantized
#                           tensors) and a minimal one, written by fuzz/harness.rs's GGUF writer
#   gguf_tokenizer          random choice bytes for the target's decoder
#   safetensors_checkpoint  the tiny Llama's model.safetensors (F32, BF16; tests/tiny/mod.rs)
#   engine                  that checkpoint built by `kiln build`, with and without the rewriter
# Every file stays under 64 KiB and the corpus under 2 MiB (the test checks both). Files are
# overwritten by name; anything else in the folders is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_WRITE_FUZZ_SEEDS=1 cargo test -j1 --test fuzz_corpus write_seed_corpus -- --exact
du -sh fuzz/corpus
