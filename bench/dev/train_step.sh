#!/bin/bash
# Device-tool script, run from the repo root with .deps carried: the small config's training step on one GPU, as
# the README reports it (configs/small.ini, STEPS steps, the mean of steps 6..STEPS of the step line's ms, tok/s and
# MFU), with AdamW and with MuonClip; then the layer's GPU tests through the model (test_model_cuda,
# test_resume_cuda). BUILD=/tmp/T (reused when it is there). Usage: bash bench/dev/train_step.sh [STEPS]
STEPS=${1:-25}
set --
source .deps/setup.sh > /dev/null 2>&1
B=${BUILD:-/tmp/T}
cmake -S . -B $B -DKLT_CUDA=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmakeT.log 2>&1 || { tail -20 /tmp/cmakeT.log; exit 1; }
cmake --build $B -j 16 --target klt-train klt-data test_model_cuda test_resume_cuda > /tmp/buildT.log 2>&1 ||
  { grep -E "error" -A3 /tmp/buildT.log | head -40; exit 1; }
[[ -f data/sample/shards/shard_00000.h5 ]] ||
  $B/klt-data prep --format text --output data/sample/shards data/sample/*.txt > /tmp/prep.log 2>&1
for opt in adamw muonclip; do
  rm -rf runs/small
  $B/klt-train configs/small.ini --set stage.steps=$STEPS --set log.every=1 --set optim.optimizer=$opt > /tmp/train_$opt.txt 2>&1
  echo "$opt rc $?: $(grep -E '^step' /tmp/train_$opt.txt | tail -1 | cut -c1-200)"
  grep -E '^step' /tmp/train_$opt.txt | awk -v first=6 '{n = $2 + 0; if (n < first) next;
    for (i = 1; i <= NF; i++) { if ($i == "ms") ms += $(i - 1); if ($i == "tok/s") tok += $(i - 1) + 0; if ($i == "(MFU") mfu += $(i + 1) + 0 }
    c++ } END { if (c) printf "  mean of steps %d..: %.1f ms, %.1fK tok/s, MFU %.1f%% (%d steps)\n", first, ms / c, tok / c, mfu / c, c }'
  [[ -n "${OUT:-}" ]] && cp /tmp/train_$opt.txt $OUT/
done
(cd $B && ctest -R "test_model_cuda|test_resume_cuda" --output-on-failure --timeout 300 2>&1 | tail -4)
