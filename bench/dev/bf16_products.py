# Offline numerics (CPU, numpy): what bf16 operands (mma m16n8k16, twice tf32's tensor-core rate) instead of tf32 in
# the forward's products would do to O, against the fp64 recurrence. q, k unit, bf16 inputs; per-channel log decays g
# in a range. Run: python3 bench/dev/bf16_products.py [T]  (bench/README "bf16 operands in the forward's products")
import numpy as np, sys
def rnd(x, bits):  # round fp64 -> fp32 -> keep `bits` mantissa bits (nearest even); bits=None: exact
    if bits is None: return x
    f = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    f = (f + ((1 << (drop - 1)) - 1) + ((f >> drop) & 1)) >> drop << drop
    return f.astype(np.uint32).view(np.float32).astype(np.float64)
BF, TF = 7, 10
def recurrent(q, k, v, g, beta):
    T, K = k.shape; S = np.zeros((K, v.shape[1])); O = np.zeros_like(v)
    for t in range(T):
        S = S * np.exp(g[t])[:, None]
        S = S + np.outer(beta[t] * k[t], v[t] - k[t] @ S)
        O[t] = q[t] @ S
    return O
def chunked(q, k, v, g, beta, intra, state, C=64):
    T, K = k.shape; V = v.shape[1]; S = np.zeros((K, V)); O = np.zeros_like(v)
    for t0 in range(0, T, C):
        sl = slice(t0, t0 + C); qc, kc, vc, bc = q[sl], k[sl], v[sl], beta[sl]
        gc = np.cumsum(g[sl], 0); n = len(kc)
        # pairwise products, 16 x 16 blocks: (k_i e^{gc_i - gc_a}) . (k_j e^{gc_a - gc_j}) anchored at the row
        # block's first row (off the diagonal, both factors <= 1); diagonal blocks anchored at their middle, or
        # pair by pair (exact) where a channel falls by more than 64 over the block, as the kernel does
        Akk, Aqk = np.zeros((n, n)), np.zeros((n, n))
        for I in range(0, n, 16):
            r = slice(I, I + 16)
            for J in range(0, I + 1, 16):
                c = slice(J, J + 16)
                if J < I: a, exact = gc[I], False
                else: a, exact = gc[I + 8], (gc[I] - gc[min(I + 15, n - 1)]).max() > 64
                if exact:
                    D = np.exp(gc[r][:, None, :] - gc[c][None, :, :])
                    Akk[r, c] = np.einsum('ik,jk,ijk->ij', kc[r], kc[c], D); Aqk[r, c] = np.einsum('ik,jk,ijk->ij', qc[r], kc[c], D)
                else:
                    km = rnd(kc[c] * np.exp(a - gc[c]), intra)
                    Akk[r, c] = rnd(kc[r] * np.exp(gc[r] - a), intra) @ km.T
                    Aqk[r, c] = rnd(qc[r] * np.exp(gc[r] - a), intra) @ km.T
        Akk = np.tril(bc[:, None] * Akk, -1); Aqk = np.tril(Aqk)
        M = np.linalg.inv(np.eye(n) + Akk)  # fp32 substitution on CUDA cores in the kernel; exact here
        W = rnd(M, intra) @ rnd(bc[:, None] * np.exp(gc) * kc, intra)
        U = rnd(M, intra) @ rnd(bc[:, None] * vc, intra)
        QG, KL, el = qc * np.exp(gc), kc * np.exp(gc[-1] - gc), np.exp(gc[-1])
        Vp = U - rnd(W, state) @ rnd(S, state)
        O[sl] = rnd(QG, state) @ rnd(S, state) + rnd(Aqk, state) @ rnd(Vp, state)
        S = el[:, None] * S + rnd(KL, state).T @ rnd(Vp, state)
    return O
rng = np.random.default_rng(0)
T, K, V = int(sys.argv[1]) if len(sys.argv) > 1 else 512, 128, 128
print(f"T {T}, K = V = {K}; relative L2 error of O against the fp64 recurrence (inputs bf16)")
print("| decays g | tf32 everywhere (now) | bf16 per-chunk products | bf16 state products | bf16 everywhere |")
print("|---|---|---|---|---|")
for lo, hi in [(-8, -2), (-1, -0.01), (-1e-4, -1e-6), (-0.05, -0.001)]:
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    q = rnd(unit(rng.standard_normal((T, K))), BF) / np.sqrt(K); k = rnd(unit(rng.standard_normal((T, K))), BF)
    v = rnd(rng.standard_normal((T, V)), BF); beta = rng.uniform(0, 1, T)
    g = rng.uniform(lo, hi, (T, K))
    ref = recurrent(q, k, v, g, beta)
    err = lambda O: np.linalg.norm(O - ref) / np.linalg.norm(ref)
    row = [err(chunked(q, k, v, g, beta, i, s)) for i, s in [(TF, TF), (BF, TF), (TF, BF), (BF, BF)]]
    print(f"| [{lo}, {hi}] | " + " | ".join(f"{e:.1e}" for e in row) + " |")
