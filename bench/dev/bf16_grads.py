# Offline numerics (CPU, numpy + autograd): bf16 operands (7 mantissa bits) against tf32 (10) in every product of
# the chunked KDA forward AND of its backward, against fp64 gradients. Each product C = A B is a primitive whose
# forward rounds A and B, and whose backward rounds dC, B and A (dA = dC B^T, dB = A^T dC): the operands a
# tensor-core backward would see. Accumulation is exact (fp32 accumulation costs far less than either rounding).
# The backward's structure is autograd's, not the CUDA kernels', but its products are the same kinds.
# Run: python3 bench/dev/bf16_grads.py [T]   (bench/README "bf16 operands in the backward's products")
import sys
import autograd.numpy as np
import numpy as onp
from autograd import grad
from autograd.extend import primitive, defvjp
from autograd.tracer import getval

def rnd(x, bits):  # fp64 -> fp32 -> keep `bits` mantissa bits (nearest even); None: exact
    if bits is None: return x
    f = onp.asarray(x, onp.float32).view(onp.uint32).astype(onp.uint64)
    drop = 23 - bits
    f = (f + ((1 << (drop - 1)) - 1) + ((f >> drop) & 1)) >> drop << drop
    return f.astype(onp.uint32).view(onp.float32).astype(onp.float64)

# Operand bits (None: exact) of the per-chunk products ("intra": forward and backward) and of the state products:
# forward ("state"), their gradient to the left operand ("state_dA": dW = -dVp S^T, dQG = dO S^T, dAqk, dKL: the WY
# backward's per-chunk state products) and to the right one ("state_dB": dS, dVp: the backward state pass).
BITS = {"intra": None, "state": None, "state_dA": None, "state_dB": None}
def make_mm(kind, kind_dA, kind_dB):
    @primitive
    def mm(A, B): return rnd(A, BITS[kind]) @ rnd(B, BITS[kind])
    defvjp(mm, lambda ans, A, B: lambda G: rnd(G, BITS[kind_dA]) @ rnd(B, BITS[kind_dA]).T,
               lambda ans, A, B: lambda G: rnd(A, BITS[kind_dB]).T @ rnd(G, BITS[kind_dB]))
    return mm
mm_intra, mm_state = make_mm("intra", "intra", "intra"), make_mm("state", "state_dA", "state_dB")

def chunked(q, k, v, g, beta, C=64):
    T, K = k.shape; V = v.shape[1]; S = np.zeros((K, V)); outs = []
    for t0 in range(0, T, C):
        qc, kc, vc, bc = q[t0:t0 + C], k[t0:t0 + C], v[t0:t0 + C], beta[t0:t0 + C]
        gc = np.cumsum(g[t0:t0 + C], axis=0); n = kc.shape[0]
        # 16 x 16 blocks as the kernel anchors them: off the diagonal at the row block's first row (factors <= 1),
        # diagonal blocks at their middle, or pair by pair (exact) where a channel falls by more than 64
        rows_kk, rows_qk = [], []
        for I in range(0, n, 16):
            bk, bq = [], []
            for J in range(0, n, 16):
                if J > I:
                    bk.append(np.zeros((16, 16))); bq.append(np.zeros((16, 16))); continue
                if J == I and onp.max(getval(gc)[I] - getval(gc)[I + 15]) > 64:
                    D = np.exp(gc[I:I + 16][:, None, :] - gc[J:J + 16][None, :, :])
                    bk.append(np.einsum('ik,jk,ijk->ij', kc[I:I + 16], kc[J:J + 16], D))
                    bq.append(np.einsum('ik,jk,ijk->ij', qc[I:I + 16], kc[J:J + 16], D))
                    continue
                a = gc[I] if J < I else gc[I + 8]
                km = kc[J:J + 16] * np.exp(a - gc[J:J + 16])
                bk.append(mm_intra(kc[I:I + 16] * np.exp(gc[I:I + 16] - a), km.T))
                bq.append(mm_intra(qc[I:I + 16] * np.exp(gc[I:I + 16] - a), km.T))
            rows_kk.append(np.concatenate(bk, axis=1)); rows_qk.append(np.concatenate(bq, axis=1))
        Akk = np.tril(bc[:, None] * np.concatenate(rows_kk, axis=0), -1)
        Aqk = np.tril(np.concatenate(rows_qk, axis=0))
        M = np.linalg.inv(np.eye(n) + Akk)  # fp32 substitution in the kernel: exact here, and its gradient too
        W = mm_intra(M, bc[:, None] * np.exp(gc) * kc)
        U = mm_intra(M, bc[:, None] * vc)
        QG, KL, el = qc * np.exp(gc), kc * np.exp(gc[-1] - gc), np.exp(gc[-1])
        Vp = U - mm_state(W, S)
        outs.append(mm_state(QG, S) + mm_state(Aqk, Vp))
        S = el[:, None] * S + mm_state(KL.T, Vp)
    return np.concatenate(outs, axis=0)

def recurrent(q, k, v, g, beta):  # fp64, for the forward check only
    S = onp.zeros((k.shape[1], v.shape[1])); O = onp.zeros_like(v)
    for t in range(len(k)):
        S = S * onp.exp(g[t])[:, None]; S = S + onp.outer(beta[t] * k[t], v[t] - k[t] @ S); O[t] = q[t] @ S
    return O

rng = onp.random.default_rng(0)
T, K, V = int(sys.argv[1]) if len(sys.argv) > 1 else 256, 128, 128
assert T % 64 == 0, "T: whole chunks of 64 (the 16-row blocks assume them)"
modes = [("tf32 everywhere", 10, 10, 10, 10), ("bf16 per-chunk", 7, 10, 10, 10), ("bf16 per-chunk + WY's state", 7, 10, 7, 10),
         ("bf16 state", 10, 7, 7, 7), ("bf16 everywhere", 7, 7, 7, 7)]
names = ["O", "dq", "dk", "dv", "dg", "dbeta"]
print(f"T {T}, K = V = {K}: relative L2 error against fp64 (inputs and dO bf16; outputs not rounded)")
print("| decays g | mode | " + " | ".join(names) + " |")
print("|---|---|" + "---|" * len(names))
for lo, hi in [(-8, -2), (-1, -0.01), (-1e-4, -1e-6), (-0.05, -0.001)]:
    unit = lambda x: x / onp.linalg.norm(x, axis=1, keepdims=True)
    q = rnd(unit(rng.standard_normal((T, K))), 7) / onp.sqrt(K); k = rnd(unit(rng.standard_normal((T, K))), 7)
    v = rnd(rng.standard_normal((T, V)), 7); beta = rng.uniform(0, 1, T); g = rng.uniform(lo, hi, (T, K))
    dO = rnd(rng.standard_normal((T, V)), 7)
    loss = lambda q, k, v, g, beta: np.sum(chunked(q, k, v, g, beta) * dO)
    gradf = grad(loss, argnum=[0, 1, 2, 3, 4])
    BITS.update(intra=None, state=None, state_dA=None, state_dB=None)
    ref = [chunked(q, k, v, g, beta)] + list(gradf(q, k, v, g, beta))
    assert onp.linalg.norm(ref[0] - recurrent(q, k, v, g, beta)) < 1e-9 * onp.linalg.norm(ref[0])
    for mode, bi, bs, bsa, bsb in modes:
        BITS.update(intra=bi, state=bs, state_dA=bsa, state_dB=bsb)
        got = [chunked(q, k, v, g, beta)] + list(gradf(q, k, v, g, beta))
        errs = [onp.linalg.norm(a - b) / onp.linalg.norm(b) for a, b in zip(got, ref)]
        print(f"| [{lo}, {hi}] | {mode} | " + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)
