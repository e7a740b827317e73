#!/bin/bash
# Device-tool script, run from the repo root with .deps carried: whole-tree candidates (changes beyond
# kernels/kda_chunk.cu, which kda_ab.sh compares), each a patch applied to a copy of this tree, in one call.
# A: this tree. For each candidate (T1, T2, .. in argument order): build, test_kda_cuda, ctest of test_model_cuda and test_resume_cuda (the
# layer's GPU tests through the model), then bench_kda (every kind of inputs) for A and every candidate
# beside one another at each shape of SHAPES, and per-kernel times (ncu) at each shape of NCU_SHAPES (8 4096 16;
# none: no ncu), op rows.
# Usage: bash bench/dev/kda_trees_ab.sh bench/dev/a_next.patch bench/dev/b_next.patch bench/dev/a_next.patch,bench/dev/c.patch
# (a candidate of several patches: commas, applied in order). SANITIZE="filter ..": racecheck and memcheck of T1's
# test_kda_cuda on those cases (Criterion filters such as 'kda_cuda/k128_segments').
PATCHES=("$@")
set --  # .deps/setup.sh reads $1
exec > >(tee -a $OUT/trees_log.txt) 2>&1  # everything printed also lands in $OUT, even if the command is cut off
source .deps/setup.sh > /dev/null 2>&1
SHAPES=${SHAPES:-"8 4096 16;1 65536 16"}
n=0; TREES=(A); PIDS=()
cmake -S . -B /tmp/tree_A -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake_A.log 2>&1
(cmake --build /tmp/tree_A -j 4 --target bench_kda test_kda_cuda > /tmp/build_A.log 2>&1 || echo "A: build failed") &
PIDS+=($!)
for p in "${PATCHES[@]}"; do
  n=$((n + 1)); X=T$n; TREES+=($X)
  echo "$X: $p"
  rm -rf /tmp/src_$X && mkdir -p /tmp/src_$X
  tar --exclude='./build*' --exclude=./.deps --exclude=./.git -cf - . | tar -xf - -C /tmp/src_$X
  IFS=, read -ra group <<< "$p"  # a,b: b applied after a
  for q in "${group[@]}"; do (cd /tmp/src_$X && git apply "$OLDPWD/$q") || { echo "$X: $q does not apply"; exit 1; }; done
  (cmake -S /tmp/src_$X -B /tmp/tree_$X -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake_$X.log 2>&1 &&
   cmake --build /tmp/tree_$X -j 6 > /tmp/build_$X.log 2>&1 || { echo "$X: build failed"; grep -E "error" -A3 /tmp/build_$X.log | head -20; }) &
  PIDS+=($!)
done
wait "${PIDS[@]}"
echo "built $SECONDS s; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
for X in "${TREES[@]:1}"; do
  echo "== $X ($SECONDS s)"
  timeout 100 /tmp/tree_$X/test_kda_cuda --jobs 8 --verbose > /tmp/test_$X.txt 2>&1; echo "test_kda_cuda rc $?: $(tail -1 /tmp/test_$X.txt)"
  grep -E "relative error" /tmp/test_$X.txt | awk '{for(i=1;i<=NF;i++) if($i=="error") print $(i+1), $0}' | sort -g | tail -2 | cut -c1-160
  grep -E "FAIL|expected|differs" /tmp/test_$X.txt | head -6; cp /tmp/test_$X.txt $OUT/
  (cd /tmp/tree_$X && timeout 150 ctest -R 'test_model_cuda|test_resume_cuda' > /tmp/ctest_$X.txt 2>&1
   echo "ctest (the layer through the model) rc $?: $(grep 'tests passed' /tmp/ctest_$X.txt)")
done
IFS=';' read -ra SH <<< "$SHAPES"
for S in "${SH[@]}"; do for X in "${TREES[@]}"; do
  echo "-- $X $S"; /tmp/tree_$X/bench_kda $S 2>&1 | grep -E "^\| [0-9]"
done; done
IFS=';' read -ra NSH <<< "${NCU_SHAPES:-8 4096 16}"
[[ ${NCU_SHAPES:-} == none ]] && NSH=()
for S in "${NSH[@]}"; do for X in "${TREES[@]}"; do  # per kernel, op rows: the 6th.. launches of fwd+bwd after the forward's 23 calls
  echo "-- ncu $X $S: $(timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum -k regex:kda_ -s 46 -c 6 \
    /tmp/tree_$X/bench_kda --op $S 2>&1 | grep -E "^  [a-z]|gpu__time" |
    sed -E 's/^  (void )?([a-z_]+).*/\2/; s/ +gpu__time_duration.sum +/ /' | paste -sd' ')"
done; done
for f in ${SANITIZE:-}; do
  timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 /tmp/tree_T1/test_kda_cuda --jobs 1 --filter "$f" > /tmp/race.log 2>&1
  echo "T1 racecheck $f rc $? ($SECONDS s): $(tail -1 /tmp/race.log)"
  timeout 60 compute-sanitizer --error-exitcode 9 /tmp/tree_T1/test_kda_cuda --jobs 1 --filter "$f" > /tmp/mem.log 2>&1
  echo "T1 memcheck $f rc $? ($SECONDS s): $(tail -1 /tmp/mem.log)"
done
echo "done $SECONDS s"
