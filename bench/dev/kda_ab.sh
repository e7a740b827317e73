#!/bin/bash
# Device-tool script, run from the repo root with .deps carried. A: this tree; C: a baseline kernel file
# (.deps/kda_chunk_C.cu, e.g. git show main:kernels/kda_chunk.cu); D: a candidate (.deps/kda_chunk_D.cu);
# I, ID: A and D with phase timers (bench/dev/phase_timers.py). Tests A and D, benches all, prints phases,
# then racecheck and memcheck.
set --
source .deps/setup.sh
python3 bench/dev/phase_timers.py kernels/kda_chunk.cu .deps/kda_chunk_I.cu
python3 bench/dev/phase_timers.py .deps/kda_chunk_D.cu .deps/kda_chunk_ID.cu
NV="nvcc -O3 -DNDEBUG -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -DKLT_HAVE_CUDA=1 -I."
for X in C I D ID; do ($NV -c .deps/kda_chunk_$X.cu -o /tmp/$X.o > /tmp/nvcc_$X.log 2>&1 || { echo "nvcc $X failed"; head -20 /tmp/nvcc_$X.log; }) & done
rm -rf /tmp/A
cmake -S . -B /tmp/A -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmakeA.log 2>&1 || { tail -20 /tmp/cmakeA.log; exit 1; }
cmake --build /tmp/A -j 16 --target bench_kda test_kda_cuda > $OUT/buildA.log 2>&1 || { grep -E "error" -A3 $OUT/buildA.log | head -40; exit 1; }
wait; echo built $SECONDS s; nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp/A
for X in C I D ID; do sh -c "$(sed "s# -o bench_kda # /tmp/$X.o -o /tmp/bench_$X #" CMakeFiles/bench_kda.dir/link.txt)" > /dev/null 2>&1 || echo "link bench $X failed"; done
sh -c "$(sed "s# -o test_kda_cuda # /tmp/D.o -o /tmp/test_D #" CMakeFiles/test_kda_cuda.dir/link.txt)" > /tmp/linkD.log 2>&1 || { echo "link test D failed"; head /tmp/linkD.log; }
summ() { tail -1 $1; grep -E "relative error" $1 | awk '{for(i=1;i<=NF;i++) if($i=="error") print $(i+1), $0}' | sort -g | tail -3 | cut -c1-160; grep -E "FAIL|expected|differs" $1 | head -6; }
echo "== test A ($SECONDS s)"; timeout 100 ./test_kda_cuda --jobs 8 --verbose > $OUT/testA.txt 2>&1; summ $OUT/testA.txt
echo "== test D ($SECONDS s)"; timeout 100 /tmp/test_D --jobs 8 --verbose > $OUT/testD.txt 2>&1; summ $OUT/testD.txt
cd - > /dev/null
echo "== C ($SECONDS s)"; /tmp/bench_C 8 4096 16 2>&1 | grep -E "^\| [0-9]"
echo "== A"; /tmp/A/bench_kda 2>&1 | grep -E "^\| [0-9]"
echo "== D"; /tmp/bench_D 2>&1 | grep -E "^\| [0-9]"
echo "== phases A, D"; /tmp/bench_I 2 4096 16 2>&1 | grep -E "PHASES"; /tmp/bench_ID 2 4096 16 2>&1 | grep -E "PHASES"
echo "== sanitizers ($SECONDS s)"
timeout 110 compute-sanitizer --tool racecheck --error-exitcode 9 /tmp/A/test_kda_cuda --jobs 1 --filter 'kda_cuda/k48*' > $OUT/race.log 2>&1; echo "racecheck A rc $?"; tail -2 $OUT/race.log
timeout 110 compute-sanitizer --error-exitcode 9 /tmp/A/test_kda_cuda --jobs 1 --filter 'kda_cuda/k128_strong*' > $OUT/mem.log 2>&1; echo "memcheck A rc $?"; tail -2 $OUT/mem.log
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 9 /tmp/test_D --jobs 1 --filter 'kda_cuda/k48*' > $OUT/raceD.log 2>&1; echo "racecheck D rc $?"; tail -2 $OUT/raceD.log
echo "done $SECONDS s"
