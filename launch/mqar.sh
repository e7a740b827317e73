#!/usr/bin/env bash
# The MQAR comparison of the Kimi Linear paper's synthetic tasks, on the CPU: one dataset, the same
# tiny model size and budget, three layer patterns (hybrid, all KDA, all MLA). Prints each run's final
# validation line (loss and recall accuracy on the answer tokens). Extra arguments go to every run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KLT_BUILD_DIR:-$root/build}
cd "$root"
data=runs/data/mqar-64
if [[ ! -f $data/shard_00000.h5 ]]; then
  "$build/klt-data" synth --task mqar --output "$data" --seq-len 64 --examples 20000 --vocab-size 64 \
    --pairs 8 --queries 8 --seed 1
fi
for pattern in kda,kda,kda,mla kda,kda,kda,kda mla,mla,mla,mla; do
  name=${pattern//,/-}
  "$build/klt-train" configs/mqar.ini --set model.layers=$pattern --set train.run_dir=runs/mqar/$name "$@" \
    > "runs/mqar-$name.log"
  echo "$pattern: $(grep '^validation' "runs/mqar-$name.log" | tail -1)"
done
