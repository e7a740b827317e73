#!/bin/bash
# Device-tool script, run from the repo root with .deps carried: fla's Triton chunk_kda beside our bench_kda on
# the same GPU in one command (bench/README "KDA"). fla's package must be in .deps/fla_src and einops in
# .deps/wheels; .deps/tcache.tgz (a Triton cache this script returned before) skips fla's ~300 s compile and
# autotune. fla compiles in the background while ours builds; both are timed afterwards on the idle GPU.
# KDA_FILE=.deps/kda_chunk_D2.cu: ours built with that kernel file in place of kernels/kda_chunk.cu (a kda_ab.sh
# candidate, so that the fla table need not wait for a merge). TESTS=1: while fla compiles, also our GPU tests,
# racecheck and memcheck of the segmented cases (correctness only: timings wait for an idle GPU).
# The Triton cache comes back in pieces of 15 MB ($OUT/tcache.tgz.aa, ...: one file of it was over the device
# tool's size limit); copy them to .deps/ to carry them next time.
set --
exec > >(tee -a $OUT/vs_fla_log.txt) 2>&1  # everything printed also lands in $OUT, even if the command is cut off
source .deps/setup.sh > /dev/null 2>&1
export TRITON_CACHE_DIR=/tmp/tcache
ls .deps/tcache.tgz.* > /dev/null 2>&1 && mkdir -p /tmp/tcache && cat .deps/tcache.tgz.* | tar xz -C /tmp/tcache &&
  echo "Triton cache: $(du -sh /tmp/tcache | cut -f1)"
pip install --no-index --find-links .deps/wheels einops > /tmp/pip.log 2>&1 || tail -3 /tmp/pip.log
(PYTHONPATH=.deps/fla_src timeout 420 python3 bench/fla_kda.py --warm > /tmp/fla_warm.txt 2> /tmp/fla_warm.err
 echo "fla warm rc $? at $SECONDS s" >> /tmp/fla_warm.err) &
FLA=$!
rm -rf /tmp/V
if [[ -n "${KDA_FILE:-}" ]]; then cp "$KDA_FILE" kernels/kda_chunk.cu && echo "ours: $KDA_FILE"; fi
cmake -S . -B /tmp/V -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmakeV.log 2>&1 || { tail -20 /tmp/cmakeV.log; exit 1; }
cmake --build /tmp/V -j 12 --target bench_kda ${TESTS:+test_kda_cuda} > /tmp/buildV.log 2>&1 ||
  { grep -E "error" -A3 /tmp/buildV.log | head -40; exit 1; }
echo "built $SECONDS s; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
if [[ -n "${TESTS:-}" ]]; then
  timeout 150 /tmp/V/test_kda_cuda --jobs 8 --verbose > $OUT/test_kda_cuda.txt 2>&1; echo "test_kda_cuda rc $?"
  tail -1 $OUT/test_kda_cuda.txt; grep -E "relative error" $OUT/test_kda_cuda.txt |
    awk '{for(i=1;i<=NF;i++) if($i=="error") print $(i+1)}' | sort -g | tail -1 | sed 's/^/worst relative error /'
  for c in racecheck:kda_cuda/k64_v32_segments memcheck:kda_cuda/k128_segments; do
    timeout 120 compute-sanitizer --tool ${c%%:*} --error-exitcode 9 /tmp/V/test_kda_cuda --jobs 1 --filter ${c#*:} \
      > /tmp/san.log 2>&1; echo "$c rc $? ($SECONDS s): $(tail -1 /tmp/san.log)"
  done
fi
wait $FLA; tail -3 /tmp/fla_warm.err
/tmp/V/bench_kda > /tmp/ours.txt 2>&1; grep -E "^\| [0-9]" /tmp/ours.txt; cp /tmp/ours.txt $OUT/
(cd /tmp/tcache && tar cz . | split -b 15M - $OUT/tcache.tgz.) && ls -la $OUT/tcache.tgz.*
PYTHONPATH=.deps/fla_src timeout 240 python3 bench/fla_kda.py --ours /tmp/ours.txt > $OUT/fla.txt 2> /tmp/fla.err
echo "fla rc $? ($SECONDS s)"; cat $OUT/fla.txt; tail -3 /tmp/fla.err
