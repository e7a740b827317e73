#!/bin/bash
# Device-tool script, run from the repo root (carry .deps/debs and .deps/setup.sh): where the segmented forward
# loses its time at 2 x 16384 x 16 (bench/README, "Next": segments at 64 and 128 state blocks). Builds bench_kda
# with a copy of this tree's kernel file whose segments() obeys KDA_SEGMENTS_DEV (a development override, never
# committed to the kernel; KDA_OUTPUTS_FUSED_DEV keeps the fused state pass when cut), then: the op rows at 1 and 2
# segments, and at 2 and 8 with the output fused; ncu's duration, grid and shared-memory
# occupancy limit of the first 24 launches at each (kernels in isolation); and, if nsys is installed, a
# timeline of the 2-segment run (cuda_gpu_trace, gzipped CSV in $OUT: streams, starts and ends, to see what
# overlaps). About 100 s.
set --
exec > >(tee -a $OUT/probe_log.txt) 2>&1
source .deps/setup.sh > /dev/null 2>&1
SHAPE=${SHAPE:-2 16384 16}
python3 - <<'PY'
s = open("kernels/kda_chunk.cu").read()
head = "static int segments(int B, int H, int V, int NC) {\n"
assert head in s, "segments() not found"
s = s.replace(head, head + '  if (const char *e = getenv("KDA_SEGMENTS_DEV"))\n'
              '    return std::max(1, std::min(std::min(atoi(e), NC), SEGMENTS_MAX));\n')
s = s.replace("#include <type_traits>", "#include <type_traits>\n#include <cstdlib>\n#include <algorithm>", 1)
apart = "const bool outputs_apart = save && out;"
assert apart in s, "outputs_apart not found"
s = s.replace(apart, 'const bool outputs_apart = save && out && !getenv("KDA_OUTPUTS_FUSED_DEV");')
open("kernels/kda_chunk.cu", "w").write(s)  # the device's copy of the tree only
PY
cmake -S . -B /tmp/P -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /dev/null 2>&1
cmake --build /tmp/P -j 16 --target bench_kda > /tmp/bP.log 2>&1 || { grep -E "error" -A3 /tmp/bP.log | head -30; exit 1; }
echo "built $SECONDS s; $(nvidia-smi --query-gpu=name --format=csv,noheader); nsys: $(command -v nsys)"
for n in 1 2; do echo "segments $n: $(KDA_SEGMENTS_DEV=$n /tmp/P/bench_kda --op $SHAPE 2>&1 | grep -E '^\| [0-9]')"; done
for n in 2 8; do  # the segments with the fused state pass (output inside, no ring or output kernel)
  echo "segments $n, output fused: $(KDA_OUTPUTS_FUSED_DEV=1 KDA_SEGMENTS_DEV=$n /tmp/P/bench_kda --op $SHAPE 2>&1 | grep -E '^\| [0-9]')"
done
for n in 1 2; do
  echo "== ncu, segments $n (kernels in isolation, first 24 launches)"
  KDA_SEGMENTS_DEV=$n timeout 100 ncu --metrics gpu__time_duration.sum,launch__grid_size,launch__occupancy_limit_shared_mem \
    -c 24 --csv /tmp/P/bench_kda --op $SHAPE > /tmp/ncu$n.csv 2> /tmp/ncu$n.err || tail -3 /tmp/ncu$n.err
  python3 - /tmp/ncu$n.csv <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]
ki, mi, vi, ii = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value"), h.index("ID")
out = {}
for r in rows[1:]:
    out.setdefault(r[ii], [r[ki].split("(")[0][:40]]).append(f"{r[mi].split('__')[1][:24]}={r[vi]}")
for k, v in out.items():
    print(k, " ".join(v))
PY
done
if command -v nsys > /dev/null; then
  KDA_SEGMENTS_DEV=2 timeout 100 nsys profile -o /tmp/tr -f true /tmp/P/bench_kda --op $SHAPE > /tmp/nsys.log 2>&1
  echo "nsys rc $?"
  timeout 60 nsys stats -q --report cuda_gpu_trace --format csv -o /tmp/trace /tmp/tr.nsys-rep > /dev/null 2>&1
  gzip -c /tmp/trace*.csv > $OUT/trace.csv.gz && ls -la $OUT/trace.csv.gz
fi
echo "done $SECONDS s"
