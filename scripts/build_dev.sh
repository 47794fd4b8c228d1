#!/usr/bin/env bash
# Developer build without pip: configure + build with CMake into build/dev and copy the
# extension next to the Python sources, so `PYTHONPATH=$PWD` imports it.
# Usage: scripts/build_dev.sh [AUTO|ON|OFF]   (JPA_CUDA, default OFF for a fast CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-OFF}"
cmake -S . -B "build/dev-$mode" -G Ninja -DJPA_CUDA="$mode" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "build/dev-$mode" -j"$(nproc)"
cp "build/dev-$mode"/_jpa_ffi*.so jax_paged_attn/
