#!/usr/bin/env bash
# The test command: fetches the demo model (cached, checksum-verified), then runs the whole
# test suite. Tests on the real model read it through KILN_DEMO_GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_DEMO_GGUF=$(scripts/fetch-demo-model.sh)
export KILN_DEMO_GGUF
cargo test --workspace "$@"
