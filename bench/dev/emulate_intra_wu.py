# numpy emulation of the intra kernel's (W | U) = M B product (kernels/kda_chunk.cu: fragment mapping, row order, tile
# ownership, epilogue) against M @ B; run: python3 bench/dev/emulate_intra_wu.py (errors ~1e-14 expected)
import numpy as np
rng = np.random.default_rng(2)
def run(K, V):
    CH = 64; KV = K + V; nn = KV // 8
    M = rng.standard_normal((CH, CH)); B = rng.standard_normal((CH, KV))
    out = np.full((CH, KV), np.nan)
    for warp in range(8):
        acc = np.zeros((4, 4, 32, 4))
        for ks in range(8):
            A = np.zeros((4, 16, 8)); Bf = np.zeros((4, 8, 8))
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                r = [8 * t + ((2 * ks + hk) & 7) + 32 * ((2 * ks + hk) >> 3) for hk in range(2)]
                for nt in range(4):
                    n = 8 * (warp + 8 * nt) + g; inn = warp + 8 * nt < nn
                    Bf[nt, t, g] = B[r[0], n] if inn else 0
                    Bf[nt, t + 4, g] = B[r[1], n] if inn else 0
                for mt in range(4):
                    i0 = 16 * mt + g
                    A[mt, g, t], A[mt, g + 8, t], A[mt, g, t + 4], A[mt, g + 8, t + 4] = M[i0, r[0]], M[i0 + 8, r[0]], M[i0, r[1]], M[i0 + 8, r[1]]
            for mt in range(4):
                for nt in range(4):
                    C = A[mt] @ Bf[nt]
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        acc[mt, nt, lane] += [C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1]]
        for nt in range(4):
            if warp + 8 * nt >= nn: continue
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                n = 8 * (warp + 8 * nt) + 2 * t
                for mt in range(4):
                    for hf in range(2):
                        i = 16 * mt + g + 8 * hf
                        out[i, n], out[i, n + 1] = acc[mt, nt, lane, 2 * hf], acc[mt, nt, lane, 2 * hf + 1]
    print(f"K {K} V {V}: max error {np.abs(out - M @ B).max():.2e} (unwritten: {np.isnan(out).sum()})")
for K, V in [(128, 128), (48, 80), (32, 48), (16, 16), (64, 32)]:
    run(K, V)
