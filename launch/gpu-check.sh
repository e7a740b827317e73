#!/bin/bash
# On a GPU machine, from the repository root: builds klt with the CUDA backend, runs the GPU tests
# (the op tests also under compute-sanitizer), the kernel benchmarks, and the small config for a
# number of steps. Logs go to $KLT_LOG_DIR (default gpu-logs/).
#   launch/gpu-check.sh [tests] [sanitize] [bench] [small STEPS] [default]
# With no arguments it does all of them, with 200 steps of the small config.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KLT_BUILD_DIR:-/tmp/klt-build}
logs=${KLT_LOG_DIR:-$root/gpu-logs}
mkdir -p "$logs"
cd "$root"
want=("$@")
[[ ${#want[@]} -eq 0 ]] && want=(tests sanitize bench small 200 default)
has() { local w; for w in "${want[@]}"; do [[ $w == "$1" ]] && return 0; done; return 1; }

cmake -S . -B "$build" -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$logs/cmake.log" 2>&1 || { cat "$logs/cmake.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" > "$logs/build.log" 2>&1 || { grep -E "error" -A3 "$logs/build.log" | head -60; exit 1; }
echo "built in $build"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

if has tests; then
  (cd "$build" && ctest -L "^gpu$" --output-on-failure --timeout 300) 2>&1 | tee "$logs/gpu-tests.log" | tail -40
fi
if has sanitize; then
  for t in "$build"/test_*_cuda; do
    [[ $(basename "$t") == test_model_cuda ]] && continue
    if compute-sanitizer --error-exitcode 9 "$t" --jobs 1 > "$logs/sanitize-$(basename "$t").log" 2>&1; then
      echo "compute-sanitizer clean: $(basename "$t")"
    else
      echo "compute-sanitizer FAILED: $(basename "$t")"; tail -20 "$logs/sanitize-$(basename "$t").log"
    fi
  done
fi
if has bench; then
  for b in "$build"/bench_*; do
    [[ -x $b ]] && "$b" 2>&1 | tee -a "$logs/bench.log"
  done
fi
if has small || has default; then
  [[ -f data/sample/shards/shard_00000.h5 ]] ||
    "$build/klt-data" prep --format text --output data/sample/shards data/sample/*.txt > "$logs/prep.log" 2>&1
fi
if has small; then
  steps=200
  for ((i = 0; i < ${#want[@]}; i++)); do [[ ${want[$i]} == small ]] && [[ ${want[$((i + 1))]:-} =~ ^[0-9]+$ ]] && steps=${want[$((i + 1))]}; done
  rm -rf runs/small
  "$build/klt-train" configs/small.ini --set stage.steps="$steps" 2>&1 | tee "$logs/small.log" | tail -30
fi
if has default; then
  rm -rf runs/default-gpu
  "$build/klt-train" configs/default.ini --set train.device=cuda --set train.run_dir=runs/default-gpu 2>&1 |
    tee "$logs/default-gpu.log" | tail -8
fi
