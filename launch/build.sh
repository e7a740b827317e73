#!/usr/bin/env bash
# Configures and builds klt into ${KLT_BUILD_DIR:-build} (Release). Extra arguments go to cmake,
# e.g. launch/build.sh -DKLT_CUDA=OFF.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KLT_BUILD_DIR:-$root/build}
jobs=${KLT_JOBS:-$(nproc)}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build" -j "$jobs"
