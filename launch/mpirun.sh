#!/usr/bin/env bash
# Launches klt-train on N ranks with mpirun, one rank per GPU (or per core on a CPU machine):
#   launch/mpirun.sh N CONFIG.ini [klt-train arguments...]                 one node
#   KLT_HOSTFILE=hosts launch/mpirun.sh N CONFIG.ini [arguments...]        several nodes (Open MPI hostfile)
# Sets [parallel] dp = N unless the arguments set it (dp x cp must equal N). Extra mpirun options go in
# KLT_MPIRUN_ARGS. Each rank picks its GPU from its node-local rank.
set -euo pipefail
if (($# < 2)); then
  echo "usage: launch/mpirun.sh N CONFIG.ini [klt-train arguments...]" >&2
  exit 2
fi
ranks=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KLT_BUILD_DIR:-$root/build}
args=("$@")
[[ " ${args[*]} " == *"parallel.dp="* ]] || args+=(--set "parallel.dp=$ranks")
hostfile=()
[[ -n ${KLT_HOSTFILE:-} ]] && hostfile=(--hostfile "$KLT_HOSTFILE")
# Open MPI refuses root without these; NVLink multicast stays off on shared hosts.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
# One BLAS thread per rank: the ranks already share the cores.
exec mpirun -np "$ranks" "${hostfile[@]}" -x OPENBLAS_NUM_THREADS=1 -x NCCL_NVLS_ENABLE ${KLT_MPIRUN_ARGS:-} \
  "$build/klt-train" "${args[@]}"
