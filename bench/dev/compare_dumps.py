# How far a candidate's arrays are from this tree's, for candidates that change values (kda_ab.sh calls it for the
# arrays that are not bitwise equal): bench_kda --dump files, bf16 (out, dq, dk, dv, df) or fp32 (the rest).
# Prints, per array, the relative L2 difference and the largest difference over the largest magnitude.
# Run: python3 bench/dev/compare_dumps.py DIR_A DIR_X NAME...   (NAME: a dump's file name without .bin)
import sys
import numpy as np

BF16 = ("out", "dq", "dk", "dv", "df")


def load(path, name):
    raw = np.fromfile(f"{path}/{name}.bin", dtype=np.uint16 if name.endswith(BF16) else np.float32)
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


a_dir, x_dir = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    a, x = load(a_dir, name), load(x_dir, name)
    if a.shape != x.shape:
        print(f"   {name}: sizes differ ({a.size} against {x.size})")
        continue
    scale = np.abs(a).max()
    rel = np.linalg.norm(x - a) / max(np.linalg.norm(a), 1e-300)
    print(f"   {name}: relative L2 {rel:.2e}, max |diff| / max |A| {np.abs(x - a).max() / max(scale, 1e-300):.2e}")
