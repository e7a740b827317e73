#!/bin/bash
# Makes the candidate kernel files bench/dev/kda_ab.sh tests, from this tree's kernels/kda_chunk.cu and the
# patches given (each alone, then all together): .deps/kda_chunk_D1.cu, D2, ..., D<n+1>.
# Usage (repo root, clean kernels/kda_chunk.cu): bench/dev/make_candidates.sh bench/dev/*.patch
set -euo pipefail
rm -f .deps/kda_chunk_D*.cu
n=0
make_one() {  # patches... -> next candidate
  n=$((n + 1))
  cp kernels/kda_chunk.cu /tmp/kda_chunk_base.cu
  for p in "$@"; do git apply "$p"; done
  cp kernels/kda_chunk.cu .deps/kda_chunk_D$n.cu
  cp /tmp/kda_chunk_base.cu kernels/kda_chunk.cu
  echo "D$n: $*"
}
for p in "$@"; do make_one "$p"; done
[[ $# -gt 1 ]] && make_one "$@"
true
