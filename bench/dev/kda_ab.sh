#!/bin/bash
# Device-tool script, run from the repo root with .deps carried: tests and times candidate KDA kernel files
# beside this tree's, in one call. Candidates: .deps/kda_chunk_D*.cu (make them here with
# bench/dev/make_candidates.sh). A: this tree. For each candidate X: test_kda_cuda linked with it (every case
# against the fp64 reference), bench_kda at every shape, per-phase cycle counts (bench/dev/phase_timers.py)
# when its anchors are found; then racecheck, synccheck and memcheck of every candidate that passed (but D0, by
# convention a copy of this tree's file, for the phase times beside the candidates'). VARIANTS="NAME=VALUE ..."
# repeats each candidate's (or VARIANTS_ON's) tests and bench under those environment settings.
# Then every candidate's results bitwise against this tree's (BITWISE below; bench_kda --dump).
set --
exec > >(tee -a $OUT/ab_log.txt) 2>&1  # everything printed also lands in $OUT, even if the command is cut off
source .deps/setup.sh
NV="nvcc -O3 -DNDEBUG -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -DKLT_HAVE_CUDA=1 -I."
CANDS=$(cd .deps && ls kda_chunk_D*.cu 2>/dev/null | sed 's/kda_chunk_\(.*\)\.cu/\1/' | tr '\n' ' ')
echo "candidates: $CANDS"
PIDS=()  # a bare `wait` would also wait for the tee above, which never ends
for X in $CANDS; do
  ($NV -c .deps/kda_chunk_$X.cu -o /tmp/$X.o > /tmp/nvcc_$X.log 2>&1 || { echo "nvcc $X failed"; head -20 /tmp/nvcc_$X.log; }) &
  PIDS+=($!)
  (python3 bench/dev/phase_timers.py .deps/kda_chunk_$X.cu /tmp/kda_chunk_P$X.cu 2> /dev/null &&
   $NV -c /tmp/kda_chunk_P$X.cu -o /tmp/P$X.o > /dev/null 2>&1) &
  PIDS+=($!)
done
rm -rf /tmp/A
cmake -S . -B /tmp/A -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmakeA.log 2>&1 || { tail -20 /tmp/cmakeA.log; exit 1; }
cmake --build /tmp/A -j 16 --target bench_kda test_kda_cuda > /tmp/buildA.log 2>&1 || { grep -E "error" -A3 /tmp/buildA.log | head -40; exit 1; }
wait "${PIDS[@]}"; echo built $SECONDS s; nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp/A
for X in $CANDS; do
  for O in $X P$X; do
    [[ -f /tmp/$O.o ]] && sh -c "$(sed "s# -o bench_kda # /tmp/$O.o -o /tmp/bench_$O #" CMakeFiles/bench_kda.dir/link.txt)" > /dev/null 2>&1
  done
  [[ -f /tmp/$X.o ]] && sh -c "$(sed "s# -o test_kda_cuda # /tmp/$X.o -o /tmp/test_$X #" CMakeFiles/test_kda_cuda.dir/link.txt)" > /dev/null 2>&1
done
cd - > /dev/null
summ() { tail -1 $1; grep -E "relative error" $1 | awk '{for(i=1;i<=NF;i++) if($i=="error") print $(i+1), $0}' | sort -g | tail -2 | cut -c1-160; grep -E "FAIL|expected|differs" $1 | head -6; }
BENCH=${BENCH:---op}  # bench_kda arguments: the op alone; BENCH=" " for every kind of inputs
SHAPE=${SHAPE:-}      # "B T H": one shape (default: all three)
echo "== A (this tree)"; /tmp/A/bench_kda $BENCH $SHAPE 2>&1 | grep -E "^\| [0-9]"
[[ -z "${NO_A_TEST:-}" ]] && { timeout 100 /tmp/A/test_kda_cuda --jobs 8 --verbose > /tmp/test_A.txt 2>&1 || cp /tmp/test_A.txt $OUT/; summ /tmp/test_A.txt; }  # NO_A_TEST=1: skip
PASSED=
for X in $CANDS; do
  [[ -x /tmp/test_$X ]] || { echo "== $X: not built"; continue; }
  echo "== $X ($SECONDS s)"; timeout 100 /tmp/test_$X --jobs 8 --verbose > /tmp/test_$X.txt 2>&1 && PASSED="$PASSED $X" ||
    cp /tmp/test_$X.txt $OUT/; summ /tmp/test_$X.txt
  /tmp/bench_$X $BENCH $SHAPE 2>&1 | grep -E "^\| [0-9]"
  [[ -x /tmp/bench_P$X ]] && /tmp/bench_P$X --op 2 4096 16 2>&1 | grep -E "PHASES"
  [[ -n "${VARIANTS_ON:-}" && " $VARIANTS_ON " != *" $X "* ]] && continue  # VARIANTS_ON="X ...": only those
  for v in ${VARIANTS:-}; do  # VARIANTS="NAME=VALUE ...": the tests and the bench again under each setting
    echo "-- $X with $v: $(env $v timeout 100 /tmp/test_$X --jobs 8 2>&1 | tail -1)"
    env $v /tmp/bench_$X $BENCH $SHAPE 2>&1 | grep -E "^\| [0-9]"
  done
done
# Bitwise against this tree (BITWISE="B T H K DOC_LEN", several joined by commas; default 2 4096 16 128 1000 and
# 1 1000 4 48 300: K = 48 takes the general instance and a 16-wide last channel group; BITWISE=none: skip): every
# array of one fwd+bwd of each kind of inputs (bench_kda --dump), compared file by file with cmp; for those that
# differ, how far (bench/dev/compare_dumps.py: relative L2, largest difference over the largest magnitude).
if [[ ${BITWISE:-} != none ]]; then
  IFS=, read -ra SHAPES <<< "${BITWISE:-2 4096 16 128 1000,1 1000 4 48 300}"
  for X in A $CANDS; do
    BIN=/tmp/bench_$X; [[ $X == A ]] && BIN=/tmp/A/bench_kda
    [[ -x $BIN ]] || continue
    rm -rf /tmp/dump_$X && mkdir -p /tmp/dump_$X
    for shp in "${SHAPES[@]}"; do $BIN --dump /tmp/dump_$X $shp > /dev/null 2>&1; done
    [[ $X == A ]] && continue
    same=; differ=
    for f in /tmp/dump_A/*.bin; do
      n=$(basename $f .bin)
      if cmp -s $f /tmp/dump_$X/$n.bin; then same="$same $n"; else differ="$differ $n"; fi
    done
    echo "== $X bitwise against A: $(echo $same | wc -w) arrays identical; differ:${differ:- none}"
    [[ -n "$differ" ]] && python3 bench/dev/compare_dumps.py /tmp/dump_A /tmp/dump_$X $differ 2>&1 | head -40
  done
fi
sanitize() {  # sanitize X TOOL FILTER: one compute-sanitizer run of candidate X's tests on the cases FILTER
  timeout 100 compute-sanitizer --tool $2 --error-exitcode 9 /tmp/test_$1 --jobs 1 --filter "$3" > /tmp/san.log 2>&1
  echo "$2 $3 rc $?: $(tail -1 /tmp/san.log)"
}
for X in ${SANITIZE:-$PASSED}; do  # SANITIZE="X ..": only those (when they passed)
  [[ $X == D0 || " $PASSED " != *" $X "* ]] && continue  # D0: a copy of this tree, by convention
  echo "== sanitizers on $X ($SECONDS s)"
  sanitize $X racecheck "${SANITIZE_FILTER:-kda_cuda/k128_segments}"
  [[ -n "${SANITIZE_QUICK:-}" ]] && continue  # SANITIZE_QUICK=1: that racecheck only (SANITIZE_FILTER: other cases)
  sanitize $X racecheck 'kda_cuda/k48*'
  sanitize $X racecheck 'kda_cuda/k128_many_heads_documents'
  sanitize $X synccheck 'kda_cuda/k48*'
  sanitize $X memcheck 'kda_cuda/k128_strong*'
  sanitize $X memcheck 'kda_cuda/k48*'
done
# PROFILE=X: ncu (full set, SASS-level source counters) of candidate X's WY and pairwise kernels (or
# PROFILE_KERNELS="wy_backward intra ...") at 2 x 4096, one
# launch each, exported as CSV; map the SASS to source lines here with a -lineinfo cubin built with the same flags.
if [[ -n "${PROFILE:-}" && -x /tmp/bench_$PROFILE ]]; then
  for kn in ${PROFILE_KERNELS:-wy_backward pairwise}; do
    timeout 150 ncu --set full -k regex:"kda_$kn" -c 1 -o /tmp/ncu_$kn /tmp/bench_$PROFILE --op 2 4096 16 > /tmp/ncu_$kn.log 2>&1; echo "ncu $kn rc $? ($SECONDS s)"
    ncu -i /tmp/ncu_$kn.ncu-rep --page source --print-source sass --csv > $OUT/sass_${PROFILE}_$kn.csv 2>/dev/null
    ncu -i /tmp/ncu_$kn.ncu-rep --page details --csv > $OUT/details_${PROFILE}_$kn.csv 2>/dev/null
  done
fi
echo "done $SECONDS s"
