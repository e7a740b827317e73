#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs every CPU and multi-rank
# test; the GPU tests too when a GPU is present (nvidia-smi lists one).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/launch/setup.sh"
"$root/launch/build.sh" "$@"
build=${KLT_BUILD_DIR:-$root/build}
labels="^(cpu|mpi)$"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  labels="^(cpu|mpi|gpu)$"  # gpu-mpi (one GPU per rank) runs from launch/gpu-multi.sh
else
  echo "klt test: no GPU found, skipping the gpu tests"
fi
cd "$build"
ctest -L "$labels" --output-on-failure -j "${KLT_TEST_JOBS:-2}"
