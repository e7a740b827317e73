# numpy emulation of the intra kernel's blocks of M below the diagonal (kda_intra_m_tensor_next.patch, merged in
# session 18 into kernels/kda_chunk.cu), built by
# warps 0..2 with the exact m16n8k8 fragment maps of every lane, against numpy's inverse of I + diag(beta) KK:
# in fp64 (the maps: errors ~1e-14 expected), then with each product's operands split and rounded as mma_3xtf32
# does and the accumulators in fp32 (the accuracy), and with plain tf32 operands for comparison.
# Run: python3 bench/dev/emulate_intra_m.py
import sys
import numpy as np
MODE = sys.argv[1] if len(sys.argv) > 1 else "fp64"  # fp64 | 3xtf32 | tf32
rng = np.random.default_rng(1)
CH, lm = 64, 65
beta = rng.uniform(0, 1, CH)
KK = np.tril(rng.normal(0, 0.4, (CH, CH)), -1)
L = beta[:, None] * KK
Mref = np.linalg.inv(np.eye(CH) + L)
Ms = np.zeros(CH * lm)
kks = KK.reshape(-1)
# diagonal blocks exact
for J in range(4):
    D = np.linalg.inv(np.eye(16) + L[16*J:16*J+16, 16*J:16*J+16])
    for r in range(16):
        for c in range(16):
            Ms[(16*J + r) * lm + 16*J + c] = D[r, c]
def mma(d, a, b):  # d[lane][4] += A(16x8) B(8x8), a[lane][4], b[lane][2]
    A = np.zeros((16, 8)); B = np.zeros((8, 8))
    for g in range(8):
        for t in range(4):
            l = 4 * g + t
            A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4] = a[l]
            B[t, g], B[t + 4, g] = b[l]
    if MODE == "fp64":
        C = A @ B
    else:
        def tf32(x):  # nearest, ties away (tf32_bits)
            u = x.astype(np.float32).view(np.uint32)
            return ((u + np.uint32(0x1000)) & np.uint32(0xffffe000)).view(np.float32).astype(np.float64)
        Ah, Bh = tf32(A), tf32(B)
        C = Ah @ Bh
        if MODE == "3xtf32":
            C = (tf32(A - Ah) @ Bh + Ah @ tf32(B - Bh)) + C
        C = C.astype(np.float32).astype(np.float64)  # fp32 accumulation (per product)
    for g in range(8):
        for t in range(4):
            l = 4 * g + t
            d[l] += [C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1]]
for warp in range(3):
    J0 = 16 * warp
    for I0 in range(J0 + 16, CH, 16):
        tt = np.zeros((2, 32, 4)); mt = np.zeros((2, 32, 4))
        for p0 in range(J0, I0, 8):
            a = np.zeros((32, 4)); b = np.zeros((2, 32, 2))
            for g in range(8):
                for t in range(4):
                    l = 4*g+t
                    m0 = (p0 + t) * lm + J0 + g; m4 = m0 + 4 * lm
                    a[l] = [Ms[m0], Ms[m0 + 8], Ms[m4], Ms[m4 + 8]]
                    for nt in range(2):
                        i = I0 + 8 * nt + g
                        b[nt, l] = [beta[i] * kks[i*CH + p0 + t], beta[i] * kks[i*CH + p0 + t + 4]]
            for nt in range(2): mma(tt[nt], a, b[nt])
        for kt in range(2):
            a = np.zeros((32, 4)); b = np.zeros((2, 32, 2))
            for g in range(8):
                for t in range(4):
                    l = 4*g+t
                    a[l] = [-tt[kt][l][0], -tt[kt][l][2], -tt[kt][l][1], -tt[kt][l][3]]
                    for nt in range(2):
                        d = (I0 + 8*nt + g) * lm + I0 + 8*kt + 2*t
                        b[nt, l] = [Ms[d], Ms[d + 1]]
            for nt in range(2): mma(mt[nt], a, b[nt])
        for nt in range(2):
            for g in range(8):
                for t in range(4):
                    l = 4*g+t; o = (I0 + 8*nt + 2*t) * lm + J0 + g
                    Ms[o], Ms[o + lm], Ms[o + 8], Ms[o + lm + 8] = mt[nt][l]
M = np.array([[Ms[i*lm + j] for j in range(CH)] for i in range(CH)])
err = np.abs(M - Mref).max() / np.abs(Mref).max()
print(f"{MODE}: max abs error / max |M| = {err:.2e} (max |M| {np.abs(Mref).max():.2f})")
assert err < {"fp64": 1e-12, "3xtf32": 1e-5, "tf32": 1e-2}[MODE]
