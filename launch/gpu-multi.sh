#!/bin/bash
# On a machine with several GPUs, from the repository root: builds klt with the CUDA backend, runs the
# NCCL equivalence test (tests/mpi/test_data_parallel_cuda.c: np ranks against one GPU), then the small
# config for STEPS steps at a per-GPU batch of 4 x 4096 tokens on the layouts asked for (GPUs:ep), and
# prints a table: tokens/s per GPU, MFU, NCCL gradient reduction, all-to-all and weight all-gather ms per step
# (KLT_PROFILE_COMM: each collective synchronized). Logs go to $KLT_LOG_DIR (default gpu-logs/).
#   launch/gpu-multi.sh [NP [STEPS [LAYOUT...]]]   defaults: all GPUs, 20 steps, layouts 1:1 NP:1 NP:2
#                                                  (LAYOUT - : the test only)
#   KLT_TEST_NPS="2 4" sets the test's rank counts (default NP).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KLT_BUILD_DIR:-/tmp/klt-build}
logs=${KLT_LOG_DIR:-$root/gpu-logs}
gpus=$(nvidia-smi -L | grep -c GPU)
np=${1:-$gpus}
steps=${2:-20}
shift $(($# > 2 ? 2 : $#))
layouts=("$@")
[[ ${#layouts[@]} -eq 0 ]] && layouts=(1:1 "$np:1" "$np:2")
[[ ${layouts[0]} == - ]] && layouts=()  # tests only
mkdir -p "$logs"
cd "$root"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
cmake -S . -B "$build" -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$logs/cmake.log" 2>&1 || { cat "$logs/cmake.log"; exit 1; }
start=$(date +%s)
cmake --build "$build" -j "$(nproc)" --target klt-train klt-data test_data_parallel_cuda > "$logs/build.log" 2>&1 ||
  { grep -E "error" -A3 "$logs/build.log" | head -60; exit 1; }
echo "built in $(($(date +%s) - start)) s"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
nvidia-smi topo -m > "$logs/topo.txt" 2>&1
mpirun="mpirun --bind-to none -x NCCL_NVLS_ENABLE -x OPENBLAS_NUM_THREADS=1 -x KLT_SOURCE_DIR=$root"

for n in ${KLT_TEST_NPS:-$np}; do
  echo "== equivalence test, np $n ($(date +%T))"
  timeout 90 $mpirun -np "$n" "$build/test_data_parallel_cuda" 2>&1 | tee "$logs/test-np$n.log" | grep -v "^  step" |
    tail -20
done

[[ -f data/sample/shards/shard_00000.h5 ]] ||
  "$build/klt-data" prep --format text --output data/sample/shards data/sample/*.txt > "$logs/prep.log" 2>&1

# One run: ranks, ep; the table line from its step lines (mean of steps 6.., the first ones warm up).
bench() {
  local ranks=$1 ep=$2 log="$logs/small-np$1-ep$2.log"
  KLT_BENCH=1 KLT_PROFILE_COMM=1 timeout 80 $mpirun -x KLT_BENCH -x KLT_PROFILE_COMM -np "$ranks" \
    "$build/klt-train" configs/small.ini --set stage.steps="$steps" --set log.every=1 --set train.val_every=0 \
    --set parallel.dp="$ranks" --set parallel.ep="$ep" --set stage.global_batch=$((4 * ranks)) \
    --set train.run_dir=/tmp/klt-bench-run > "$log" 2>&1
  local rc=$?
  echo "$(date +%T) np $ranks ep $ep done (rc $rc)" >> "$logs/times.txt"
  awk -v ranks="$ranks" -v ep="$ep" -v rc="$rc" '
    /^step/ { n++; nf = split($0, f, "|"); ms = f[nf]; sub(/ ms.*/, "", ms);
              if (n > 5) { sum += ms; k++ } if (match($0, /MFU [0-9.]+%/)) mfu = substr($0, RSTART + 4, RLENGTH - 5);
              if (n > 5) msum += mfu; loss = f[2] }
    /NCCL all-reduce/ { ar = $5; a2a = $8; ag = $14 }
    END { if (k == 0) { printf "| %d | %d | failed (rc %d) | | | | | | |\n", ranks, ep, rc; exit }
          t = sum / k; printf "| %d | %d | %.1f | %.0f | %.1f | %s | %s | %s | %s |\n", ranks, ep, t,
            4 * 4096 / (t / 1000), msum / k, ar == "" ? "-" : ar, a2a == "" ? "-" : a2a, ag == "" ? "-" : ag, loss }' "$log"
}
echo "| GPUs | ep | step ms (mean of steps 6-$steps) | tokens/s per GPU | MFU % | gradient reduce ms/step | all-to-all ms/step | weight all-gather ms/step | last loss |"
echo "|---|---|---|---|---|---|---|---|---|"
for layout in "${layouts[@]}"; do
  bench "${layout%%:*}" "${layout##*:}"
done
