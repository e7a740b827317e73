#!/usr/bin/env bash
# The README's training command: installs what is missing, builds, prepares the sample corpus into
# HDF5 shards (once), and trains the default model (configs/default.ini) on the CPU.
# Extra arguments go to klt-train, e.g. launch/train-default.sh --set stage.steps=100
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/launch/setup.sh"
"$root/launch/build.sh"
build=${KLT_BUILD_DIR:-$root/build}
cd "$root"
if [[ ! -f data/sample/shards/shard_00000.h5 ]]; then
  "$build/klt-data" prep --format text --output data/sample/shards data/sample/*.txt
fi
"$build/klt-data" inspect data/sample/shards
exec "$build/klt-train" configs/default.ini "$@"
