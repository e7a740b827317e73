#!/usr/bin/env python3
# The accuracy of bench/dev/kda_wy_unscaled_next.patch's running products, in numpy fp32: the pairwise backward's
# thread for channel a of sub-chunk I0 takes eg_i = exp(gc_i) and ekl_i = exp(gc_last - gc_i) for its 16 rows as
# products of al_i = exp(gc_i - gc_i-1) from one exponential each, instead of an exponential per element.
# Prints the worst relative error against the exact exponentials (fp64) per decay range (values above 1e-30).
import numpy as np

rng = np.random.default_rng(0)
f32 = np.float32
for lo, hi in [(-40, -10), (-8, -2), (-1, -0.01), (-0.05, -0.001), (-1e-4, -1e-6)]:
    g = rng.uniform(lo, hi, size=(20000, 64)).astype(f32)
    gc = np.cumsum(g, axis=1, dtype=f32)  # the chunk's cumulative gates, fp32 as in the kernels
    worst_eg = worst_ekl = 0.0
    for I0 in (0, 16, 32, 48):
        rows = gc[:, I0:I0 + 16]
        prev = np.concatenate([gc[:, I0:I0 + 1], gc[:, I0:I0 + 15]], axis=1)
        al = np.exp(rows - prev).astype(f32)  # al_0 = exp(0) = 1
        eg, ekl = np.empty_like(rows), np.empty_like(rows)
        e = np.exp(gc[:, I0]).astype(f32)
        for r in range(16):
            e = (e * al[:, r]).astype(f32)
            eg[:, r] = e
        e = np.exp(gc[:, 63] - gc[:, I0 + 15]).astype(f32)
        for r in range(15, -1, -1):
            ekl[:, r] = e
            e = (e * al[:, r]).astype(f32)
        for got, ref, name in [(eg, np.exp(rows.astype(np.float64)), "eg"),
                               (ekl, np.exp(gc[:, 63:64].astype(np.float64) - rows), "ekl")]:
            m = ref > 1e-30
            err = np.max(np.abs(got[m] - ref[m]) / ref[m]) if m.any() else 0.0
            if name == "eg": worst_eg = max(worst_eg, err)
            else: worst_ekl = max(worst_ekl, err)
    print(f"decays [{lo}, {hi}] a token: worst relative error eg {worst_eg:.1e}, ekl {worst_ekl:.1e}")
