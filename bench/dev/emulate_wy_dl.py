# numpy emulation of kda_wy_dl_direct_next.patch's dL product (fragment mapping, channel groups, guards, epilogue)
# against -Y X^T masked; run: python3 bench/dev/emulate_wy_dl.py (errors ~1e-14 expected)
import numpy as np
rng = np.random.default_rng(1)
def run(K, V):
    CH = 64; KV = K + V
    Y = rng.standard_normal((CH, KV)); W = rng.standard_normal((CH, K)); U = rng.standard_normal((CH, V))
    X = np.concatenate([W, U], 1)
    seg = np.sort(rng.integers(0, 3, CH)); KK = rng.standard_normal((CH, CH))
    DL = np.full((CH, CH), np.nan); rowpart = np.zeros((2, CH))
    def Xval(j, c):  # as load_x: c < K ? W[j][c] : U[j][c-K], zero if c >= KV
        return 0.0 if c >= KV else (W[j, c] if c < K else U[j, c - K])
    for warp in range(8):
        wm, wn = warp >> 1, warp & 1
        acc = np.zeros((4, 32, 4))  # nt, lane, r
        for a0 in range(0, KV, 32):
            for ks in range(4):
                A = np.zeros((16, 8)); B = np.zeros((4, 8, 8))
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    c8 = a0 + 8 * t; inn = c8 < KV; c = c8 + 2 * ks
                    af = [Y[16*wm+g, c] if inn else 0, Y[16*wm+g+8, c] if inn else 0,
                          Y[16*wm+g, c+1] if inn else 0, Y[16*wm+g+8, c+1] if inn else 0]
                    A[g, t], A[g+8, t], A[g, t+4], A[g+8, t+4] = af
                    for nt in range(4):
                        j = 32*wn + 8*nt + g
                        xs = [Xval(j, c8 + e) if inn else 0 for e in range(8)]
                        x = xs[4*(ks >> 1): 4*(ks >> 1) + 4]
                        b0 = x[2] if ks & 1 else x[0]; b1 = x[3] if ks & 1 else x[1]
                        B[nt, t, g] = b0; B[nt, t+4, g] = b1
                for nt in range(4):
                    C = A @ B[nt]
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        acc[nt, lane] += [C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1]]
        part = np.zeros((32, 2))
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for nt in range(4):
                for hf in range(2):
                    i = 16*wm + g + 8*hf; j = 32*wn + 8*nt + 2*t
                    d0 = -acc[nt, lane, 2*hf] if (j < i and seg[i] == seg[j]) else 0
                    d1 = -acc[nt, lane, 2*hf+1] if (j+1 < i and seg[i] == seg[j+1]) else 0
                    DL[i, j], DL[i, j+1] = d0, d1
                    part[lane, hf] += d0 * KK[i, j] + d1 * KK[i, j+1]
        for g in range(8):
            for hf in range(2):
                rowpart[wn, 16*wm + g + 8*hf] = part[4*g:4*g+4, hf].sum()
    ref = -(Y @ X.T)
    mask = np.tril(np.ones((CH, CH)), -1).astype(bool) & (seg[:, None] == seg[None, :])
    ref = np.where(mask, ref, 0)
    e1 = np.abs(DL - ref).max(); e2 = np.abs(rowpart.sum(0) - (ref * KK).sum(1)).max()
    print(f"K {K} V {V}: dL err {e1:.2e}, dbeta part err {e2:.2e}")
for K, V in [(128, 128), (48, 80), (32, 48), (16, 16), (64, 32)]:
    run(K, V)
