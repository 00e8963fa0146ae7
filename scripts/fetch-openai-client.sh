#!/usr/bin/env bash
# Installs the official `openai` Python package (1.109.1, with its dependencies, from PyPI) into a
# folder of the cache, once, and prints that folder (put it on PYTHONPATH). Used by
# tests/serve_http.rs (KILN_OPENAI_PY): a real OpenAI client talks to `kiln serve`.
# Cache folder: $KILN_CACHE, else .cache/ in the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KILN_CACHE:-$here/.cache}
version=1.109.1
out=$cache/python/openai-$version
if [ -f "$out/.complete" ]; then echo "$out"; exit 0; fi
echo "installing the openai Python package $version (pip, from PyPI) into $out" >&2
rm -rf "$out"
mkdir -p "$out"
python3 -m pip install --quiet --disable-pip-version-check --no-input --target "$out" "openai==$version" >&2
python3 -c "import sys; sys.path.insert(0, '$out'); import openai; assert openai.__version__ == '$version'" >&2
touch "$out/.complete"
echo "$out"
