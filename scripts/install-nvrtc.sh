#!/usr/bin/env bash
# Installs NVRTC 13.0 and the CUDA headers it needs (no GPU, no toolkit) from PyPI into
# .cache/cuda (a `pip install --target`), so `cargo test` can compile every kernel template.
# Idempotent: does nothing when the pinned versions are already there.
# Prints two lines: `lib=<dir with libnvrtc.so.13>` and `include=<dir with cuda_bf16.h>`.
# Cache folder: $KILN_CACHE, else .cache/ in the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KILN_CACHE:-$here/.cache}
target=$cache/cuda
lib=$target/nvidia/cu13/lib
inc=$target/nvidia/cu13/include
pkgs=("nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*")
stamp=$target/.installed-13.0
if [ ! -f "$stamp" ] || [ ! -e "$lib/libnvrtc.so.13" ] || [ ! -f "$inc/cuda_bf16.h" ]; then
  rm -rf "$target"
  mkdir -p "$target"
  echo "installing NVRTC 13.0 and the CUDA headers (PyPI: ${pkgs[*]}) into $target" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
    --target "$target" "${pkgs[@]}" >&2
  # cudarc dlopens `libnvrtc.so` first; the wheel ships only `libnvrtc.so.13`, which is also on
  # cudarc's candidate list. The extra link makes the first candidate hit this copy as well.
  ln -sf libnvrtc.so.13 "$lib/libnvrtc.so"
  touch "$stamp"
fi
echo "lib=$lib"
echo "include=$inc"
