#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf with their .inp/.out
# cases, read by llama.cpp's tests/test-tokenizer-0.cpp) from the PyPI sdist of
# llama-cpp-python 0.3.36, which vendors llama.cpp; verifies its sha256 and caches the extracted
# files. Prints the folder holding them. Used by tests/llama_vocab.rs (KILN_LLAMA_VOCAB).
# Cache folder: $KILN_CACHE, else .cache/ in the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KILN_CACHE:-$here/.cache}
# PyPI's file host, then the same path through pypi.org (what this project's machines' index serves).
file=ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz
urls="https://files.pythonhosted.org/packages/$file https://pypi.org/packages/packages/$file"
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
prefix=llama_cpp_python-0.3.36/vendor/llama.cpp/models
vocabs="gpt-2 llama-bpe qwen2 qwen35 mpt starcoder refact command-r deepseek-coder llama-spm phi-3 gemma-4"
out=$cache/llama-vocab
stamp=$out/.complete-$sha
if [ -f "$stamp" ]; then echo "$out"; exit 0; fi
mkdir -p "$out" "$cache/pip"
sdist=$cache/pip/llama_cpp_python-0.3.36.tar.gz
check() { echo "$sha  $1" | sha256sum --check --status; }
if ! { [ -f "$sdist" ] && check "$sdist"; }; then
  echo "fetching llama.cpp's tokenizer test vocabularies (llama-cpp-python 0.3.36 sdist, ~77 MB) from PyPI into $cache/pip" >&2
  for url in $urls; do
    python3 - "$url" "$sdist.part" <<'PY' && break
import sys, urllib.request, shutil
with urllib.request.urlopen(sys.argv[1], timeout=120) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    echo "could not fetch $url; trying the next address" >&2
  done
  if ! check "$sdist.part"; then rm -f "$sdist.part"; echo "checksum mismatch for the llama-cpp-python sdist" >&2; exit 1; fi
  mv "$sdist.part" "$sdist"
fi
echo "extracting the ggml-vocab files ($vocabs) into $out" >&2
members=()
for v in $vocabs; do
  for ext in gguf gguf.inp gguf.out; do members+=("$prefix/ggml-vocab-$v.$ext"); done
done
tar -xzf "$sdist" -C "$out" --strip-components=4 "${members[@]}"
touch "$stamp"
echo "$out"
