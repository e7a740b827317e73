#!/bin/bash
# Device-tool script, run from the repo root (carry .deps/debs, .deps/setup.sh and BASE's folder): every kernel's
# duration and DRAM traffic in one forward+backward of bench_kda at one shape (SHAPE="B T H", default 8 4096 16),
# for each kind of inputs (op, softplus, bounded: the intra kernel starts each), by ncu (--clock-control none,
# kernels serialized), after the bench rows themselves. BASE=.deps/base: also a copy of this tree with the files
# under that folder (same paths as in the repo, e.g. .deps/base/kernels/activation.cu) put back, built, timed
# and profiled the same way: an A/B of a change outside the KDA kernel file. TESTS="test_a test_b": those test
# binaries of this tree built and run first. CLOCKS=base: ncu locks the clocks at base (default none: as they
# run; a difference between the kinds of inputs that goes away at base clocks is power, not code). About 150 s (both).
# KDA_FILE=.deps/kda_chunk_D2.cu: this tree built with that kernel file in place of kernels/kda_chunk.cu (a kda_ab.sh
# candidate's per-kernel times; BASE's tree keeps this tree's file unless BASE has its own).
set --
exec > >(tee -a $OUT/times_log.txt) 2>&1
source .deps/setup.sh > /dev/null 2>&1
SHAPE=${SHAPE:-8 4096 16}
TESTS=${TESTS:-}
trees=/tmp/T
if [[ -n "${BASE:-}" ]]; then
  rm -rf /tmp/srcB && mkdir -p /tmp/srcB && tar cf - --exclude=./.deps --exclude=./.git . | tar xf - -C /tmp/srcB
  (cd "$BASE" && find . -type f) | while read -r f; do cp "$BASE/$f" "/tmp/srcB/$f" && echo "base: $f"; done
  cmake -S /tmp/srcB -B /tmp/B -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /dev/null 2>&1
  (cmake --build /tmp/B -j 8 --target bench_kda > /tmp/bB.log 2>&1 || grep -E "error" -A3 /tmp/bB.log | head -20) &
  BUILD_B=$!
  trees="/tmp/B /tmp/T"
fi
if [[ -n "${KDA_FILE:-}" ]]; then cp "$KDA_FILE" kernels/kda_chunk.cu && echo "this tree with $KDA_FILE"; fi
cmake -S . -B /tmp/T -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /dev/null 2>&1
cmake --build /tmp/T -j 8 --target bench_kda $TESTS > /tmp/bT.log 2>&1 || { grep -E "error" -A3 /tmp/bT.log | head -20; exit 1; }
[[ -n "${BUILD_B:-}" ]] && wait $BUILD_B
echo "built $SECONDS s; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
for t in $TESTS; do echo "$t: $(timeout 120 /tmp/T/$t --jobs 8 2>&1 | tail -1)"; done
for t in $trees; do echo "== $t rows"; $t/bench_kda $SHAPE | grep -E '^\| [0-9]'; done
for t in $trees; do
  echo "== $t kernels (us, GB read + written, TB/s)"
  timeout 200 ncu --profile-from-start off --clock-control ${CLOCKS:-none} \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv $t/bench_kda --profile $SHAPE \
    > /tmp/ncu.csv 2> /tmp/ncu.err || tail -3 /tmp/ncu.err
  python3 - /tmp/ncu.csv <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]
ki, mi, vi, ui, ii = (h.index(x) for x in ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit", "ID"))
scale = {"nsecond": 1e-3, "usecond": 1, "msecond": 1e3, "ns": 1e-3, "us": 1, "ms": 1e3,  # to us and GB
         "byte": 1e-9, "Kbyte": 1e-6, "Mbyte": 1e-3, "Gbyte": 1, "B": 1e-9, "KB": 1e-6, "MB": 1e-3, "GB": 1}
ks = {}
for r in rows[1:]:
    k = ks.setdefault(int(r[ii]), {"name": r[ki].split("(")[0].replace("void ", "")[:44]})
    k[r[mi]] = float(r[vi].replace(",", "")) * scale.get(r[ui], 1)
total = 0
for i, k in sorted(ks.items()):
    us, gb = k["gpu__time_duration.sum"], k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"]
    if "intra" in k["name"] and total: print(f"   sum {total:9.1f} us"); total = 0
    total += us
    print(f"{i:3d} {k['name']:44s} {us:9.1f} {gb:7.3f} {gb / us * 1e3:6.2f}")
print(f"   sum {total:9.1f} us")
PY
done
echo "done $SECONDS s"
