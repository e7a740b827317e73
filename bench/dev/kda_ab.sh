#!/bin/bash
# Device-tool script (run from the repo root with .deps carried): builds this tree, links HEAD's kda_chunk.cu
# (.deps/kda_chunk_C.cu: git show main:kernels/kda_chunk.cu) and a phase-timed copy (bench/dev/phase_timers.py)
# into bench_kda, runs test_kda_cuda, both benches and the per-phase cycle counts.
# A: this tree (kda tests + bench); C: HEAD's kda_chunk.cu linked into A's bench; I: A with phase timers
set --
source .deps/setup.sh
set -o pipefail
python3 bench/dev/phase_timers.py kernels/kda_chunk.cu .deps/kda_chunk_I.cu
NV="nvcc -O3 -DNDEBUG -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -DKLT_HAVE_CUDA=1 -I."
for X in C I; do ($NV -c .deps/kda_chunk_$X.cu -o /tmp/$X.o > $OUT/nvcc_$X.log 2>&1 || echo "nvcc $X failed") & done
rm -rf /tmp/A
cmake -S . -B /tmp/A -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > $OUT/cmakeA.log 2>&1 || { tail -20 $OUT/cmakeA.log; exit 1; }
cmake --build /tmp/A -j 16 --target bench_kda test_kda_cuda > $OUT/buildA.log 2>&1 || { grep -E "error" -A3 $OUT/buildA.log | head -40; exit 1; }
wait; echo built $SECONDS s; nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp/A && for X in C I; do sh -c "$(sed "s# -o bench_kda # /tmp/$X.o -o /tmp/bench_$X #" CMakeFiles/bench_kda.dir/link.txt)" || echo "link $X failed"; done
echo "== test A ($SECONDS s)"; timeout 100 ./test_kda_cuda --jobs 8 --verbose > $OUT/testA.txt 2>&1; tail -1 $OUT/testA.txt; grep -E "relative error" $OUT/testA.txt | awk '{for(i=1;i<=NF;i++) if($i=="error") print $(i+1), $0}' | sort -g | tail -4 | cut -c1-150
grep -E "FAIL|expected|differs" $OUT/testA.txt | head -8
cd - > /dev/null
echo "== C ($SECONDS s)"; /tmp/bench_C 8 4096 16 2>&1 | grep -E "^\| [0-9]"
echo "== A"; /tmp/A/bench_kda 2>&1 | grep -E "^\| [0-9]"
/tmp/bench_I 2 4096 16 2>&1 | grep -E "PHASES"
echo "done $SECONDS s"
# Races and out-of-bounds accesses in the new shared-memory layouts (Cs over As/Bs, the pairwise tile):
echo "== sanitizers ($SECONDS s)"
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 /tmp/A/test_kda_cuda --jobs 1 --filter 'kda_cuda/k48*' > $OUT/race.log 2>&1; echo "racecheck rc $?"; tail -2 $OUT/race.log
timeout 150 compute-sanitizer --error-exitcode 9 /tmp/A/test_kda_cuda --jobs 1 --filter 'kda_cuda/k128_strong*' > $OUT/mem.log 2>&1; echo "memcheck rc $?"; tail -2 $OUT/mem.log
