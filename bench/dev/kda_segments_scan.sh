#!/bin/bash
# Device-tool script, run from the repo root (carry .deps/debs and .deps/setup.sh): the segment count scanned
# over shapes, to choose segments()' rule by measurement. Builds bench_kda and test_kda_cuda from a copy of this
# tree's kernel file (the device's copy only) whose segments() obeys KDA_SEGMENTS_DEV (a development override,
# never committed). Prints the op rows of each shape at each segment count, then runs test_kda_cuda with every
# case cut into 4 segments (the cut paths on all test shapes). About 120 s. (Session 19's scan also placed the
# forward's output apart, in a kernel since removed: bench/README.)
#   SHAPES="B T H;..." (default: the four of bench/README)   SEGS="1 2 4 8"
#   SEGMENTS_MAX_DEV=16: a higher cap on the segment count in the device's copy (SEGS may then go past 8)
#   NO_TESTS=1: skip the tests
set --
exec > >(tee -a $OUT/scan_log.txt) 2>&1
source .deps/setup.sh > /dev/null 2>&1
SHAPES=${SHAPES:-8 4096 16;4 8192 16;2 16384 16;1 65536 16}
SEGS=${SEGS:-1 2 4 8}
python3 - <<'PY'
import os
s = open("kernels/kda_chunk.cu").read()
head = "static int segments(int B, int H, int V, int NC) {\n"
assert head in s, "segments() not found"
s = s.replace(head, head + '  if (const char *e = getenv("KDA_SEGMENTS_DEV"))\n'
              '    return std::max(1, std::min(std::min(atoi(e), NC), SEGMENTS_MAX));\n')
s = s.replace("#include <type_traits>", "#include <type_traits>\n#include <cstdlib>\n#include <algorithm>", 1)
if os.environ.get("SEGMENTS_MAX_DEV"):
    cap = "#define SEGMENTS_MAX 8 "
    assert cap in s, "SEGMENTS_MAX not found"
    s = s.replace(cap, "#define SEGMENTS_MAX %d " % int(os.environ["SEGMENTS_MAX_DEV"]))
open("kernels/kda_chunk.cu", "w").write(s)  # the device's copy of the tree only
PY
cmake -S . -B /tmp/P -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /dev/null 2>&1
cmake --build /tmp/P -j 16 --target bench_kda test_kda_cuda > /tmp/bP.log 2>&1 ||
  { grep -E "error" -A3 /tmp/bP.log | head -30; exit 1; }
echo "built $SECONDS s; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
IFS=';' read -ra shapes <<< "$SHAPES"
for shape in "${shapes[@]}"; do
  for n in $SEGS; do
    echo "$shape segments $n: $(KDA_SEGMENTS_DEV=$n /tmp/P/bench_kda --op $shape 2>&1 | grep -E '^\| [0-9]')"
  done
done
[[ -n "${NO_TESTS:-}" ]] && { echo "done $SECONDS s"; exit 0; }
echo "== test_kda_cuda, every case cut into 4 segments ($SECONDS s)"
KDA_SEGMENTS_DEV=4 timeout 120 /tmp/P/test_kda_cuda --jobs 8 --verbose > /tmp/t.txt 2>&1; echo "rc $?"
tail -1 /tmp/t.txt; grep -E "FAIL|expected|differs" /tmp/t.txt | head -6
echo "done $SECONDS s"
