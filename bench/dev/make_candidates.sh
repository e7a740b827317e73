#!/bin/bash
# Makes the candidate kernel files bench/dev/kda_ab.sh tests: one per argument, each argument a patch or
# several joined by commas (applied in order) on this tree's kernels/kda_chunk.cu -> .deps/kda_chunk_D1.cu, D2, ...
# Usage (repo root, kernels/kda_chunk.cu unmodified):
#   bench/dev/make_candidates.sh bench/dev/a.patch bench/dev/b.patch bench/dev/a.patch,bench/dev/b.patch
set -euo pipefail
git diff --quiet -- kernels/kda_chunk.cu || { echo "make_candidates: kernels/kda_chunk.cu has changes" >&2; exit 1; }
rm -f .deps/kda_chunk_D*.cu
n=0
for group in "$@"; do
  n=$((n + 1))
  IFS=, read -ra patches <<< "$group"
  restore() { for p in "${patches[@]}"; do git checkout -q -- $(git apply --numstat "$p" | cut -f3); done; }  # every file they touch
  for p in "${patches[@]}"; do git apply "$p" || { restore; exit 1; }; done
  cp kernels/kda_chunk.cu .deps/kda_chunk_D$n.cu
  restore
  echo "D$n: ${patches[*]}"
done
