# Offline numerics (CPU, numpy + autograd) for session 24's fp16 per-chunk buffers (bench/README, session 25:
# measured on the H100 and dropped; the patches are in history at fc95549): QG, KL and Aqk stored in fp16 instead of
# tf32-rounded fp32, then W too. Both keep 10 mantissa bits; fp16 differs only below 2^-14 (subnormal: 2^-24
# absolute) and in its ties (to even, not away). The chunked KDA forward as bench/dev/bf16_grads.py runs it, from an
# initial state, every product's operands rounded to tf32 (the kernels' tensor-core inputs) except that QG, KL and
# Aqk (and W) are rounded to fp16, in the forward products and in the backward ones that read them (dS += QG^T
# dO-type terms); accumulation exact. Relative L2 error of the output and every gradient (the initial state's too)
# against fp64. First, the bound fp16's range needs for W: the largest row norm of W over adversarial keys (random,
# all equal, nearly parallel with alternating signs, rank 2, one dominant channel) and beta in [0, 2]. Modes: del
# (the gate's gradient through el) also from S0 and dS' stored as fp16 with a power-of-two scale per 16 state
# columns; QG's and W's rows each with their own power-of-two scale.
# What session 24's version missed (it had no initial state): with steep decays every row of QG and W carries
# exp(gc_i), below fp16's range for the whole chunk, and dS0 is made of nothing else: its error goes 2.6e-4 ->
# 1.9e-1 at decays [-40, -10] (the GPU tests k128/k48_steep_decays: 0.12 and 0.045). A power-of-two scale per row
# brings it back to 2.6e-4.
# Run: python3 bench/dev/f16_buffers.py [T [scale]]   (pip install autograd; scale: 1/sqrt(K) unless given)
import sys
import autograd.numpy as np
import numpy as onp
from autograd import grad
from autograd.extend import primitive, defvjp


EXACT = {"on": False}  # the fp64 reference: no rounding anywhere


def tf32(x):  # fp64 -> fp32 -> 10 mantissa bits, nearest (ties away, as the kernels' tf32_bits)
    if EXACT["on"]:
        return x
    f = onp.asarray(x, onp.float32).view(onp.uint32).astype(onp.uint64)
    return ((f + 0x1000) & 0xFFFFE000).astype(onp.uint32).view(onp.float32).astype(onp.float64)


def f16(x):  # fp64 -> fp32 -> fp16 (nearest even, subnormals kept), as __float2half_rn
    if EXACT["on"]:
        return x
    return onp.asarray(x, onp.float32).astype(onp.float16).astype(onp.float64)


STORED = {"round": tf32, "w": tf32}  # how QG, KL and Aqk are stored; how W is


@primitive
def mm(A, B):  # a tensor-core product: both operands tf32
    return tf32(A) @ tf32(B)


defvjp(mm, lambda ans, A, B: lambda G: tf32(G) @ tf32(B).T, lambda ans, A, B: lambda G: tf32(A).T @ tf32(G))


@primitive
def mm_stored(A, B):  # a state-pass product whose left operand (QG, KL^T, Aqk) comes from the per-chunk buffers
    return STORED["round"](A) @ tf32(B)


defvjp(mm_stored, lambda ans, A, B: lambda G: tf32(G) @ tf32(B).T,
       lambda ans, A, B: lambda G: STORED["round"](A).T @ tf32(G))


@primitive
def mm_w(A, B):  # W S in the state passes: W from the per-chunk buffers
    return STORED["w"](A) @ tf32(B)


defvjp(mm_w, lambda ans, A, B: lambda G: tf32(G) @ tf32(B).T, lambda ans, A, B: lambda G: STORED["w"](A).T @ tf32(G))


def f16_scaled(X):  # fp16 times 2^e, e per 16-column slice from its largest magnitude (bench/README Next item 2)
    if EXACT["on"]:
        return X
    Y = onp.array(X, dtype=onp.float64)
    for c in range(0, Y.shape[1], 16):
        m = onp.abs(Y[:, c:c + 16]).max()
        if m > 0:
            e = 14 - int(onp.floor(onp.log2(m)))
            Y[:, c:c + 16] = f16(Y[:, c:c + 16] * 2.0 ** e) * 2.0 ** -e
    return Y


def f16_rows(X):  # fp16 times 2^e, e per row from its largest magnitude (QG's and W's rows carry exp(gc_i))
    if EXACT["on"]:
        return X
    Y = onp.asarray(X, onp.float32).astype(onp.float64)  # as the kernel holds it (fp32: nothing below 2^-149)
    m = onp.abs(Y).max(axis=1, keepdims=True)
    e = onp.where(m > 0, 14 - onp.floor(onp.log2(onp.where(m > 0, m, 1))), 0)
    return f16(Y * 2.0 ** e) * 2.0 ** -e


def f16_qg_rows(X):  # QG (C x K: rows are tokens) per row; KL^T (K x C) and Aqk plain fp16
    return f16_rows(X) if X.shape[0] == 64 and X.shape[1] != 64 else f16(X)


DEL = {"round": lambda x: x}  # the values del = rowsum(dS' * S0) is summed from: fp32 now (exact here)


@primitive
def decay(el, S):  # S^T diag(el) of the state update; its gradient to el is del
    return el[:, None] * S


defvjp(decay, lambda ans, el, S: lambda G: onp.sum(DEL["round"](G) * DEL["round"](S), axis=1),
       lambda ans, el, S: lambda G: el[:, None] * G)


def chunked(q, k, v, g, beta, S0, C=64):
    T, K = k.shape
    S = S0
    outs = []
    for t0 in range(0, T, C):
        qc, kc, vc, bc = q[t0:t0 + C], k[t0:t0 + C], v[t0:t0 + C], beta[t0:t0 + C]
        gc = np.cumsum(g[t0:t0 + C], axis=0)
        D = np.exp(np.minimum(gc[:, None, :] - gc[None, :, :], 0))  # (i, j, channel); only j <= i is kept (<= 0)
        mask = onp.tril(onp.ones((C, C)))
        Akk = np.tril(bc[:, None] * np.einsum('ik,jk,ijk->ij', kc, kc, D * mask[:, :, None]), -1)
        Aqk = np.einsum('ik,jk,ijk->ij', qc, kc, D * mask[:, :, None])
        M = np.linalg.inv(np.eye(C) + Akk)
        W = mm(M, bc[:, None] * np.exp(gc) * kc)
        U = mm(M, bc[:, None] * vc)
        QG, KL, el = qc * np.exp(gc), kc * np.exp(gc[-1] - gc), np.exp(gc[-1])
        Vp = U - mm_w(W, S)
        outs.append(mm_stored(QG, S) + mm_stored(Aqk, Vp))
        S = decay(el, S) + mm_stored(KL.T, Vp)
    return np.concatenate(outs, axis=0)


def w_rows(k, beta, g):  # W of one chunk, fp64
    C = len(k)
    gc = onp.cumsum(g, 0)
    L = onp.tril(beta[:, None] * onp.einsum('ik,jk,ijk->ij', k, k, onp.exp(onp.minimum(gc[:, None] - gc[None], 0))), -1)
    return onp.linalg.solve(onp.eye(C) + L, beta[:, None] * onp.exp(gc) * k)


rng = onp.random.default_rng(0)
worst = 0.0
for trial in range(500):
    C, Kw = 64, 16
    kind = trial % 5
    if kind == 0: kw = rng.standard_normal((C, Kw))
    elif kind == 1: kw = onp.tile(rng.standard_normal(Kw), (C, 1))
    elif kind == 2: kw = rng.standard_normal(Kw) + 0.05 * rng.standard_normal((C, Kw)); kw[::2] *= -1
    elif kind == 3: kw = rng.standard_normal((C, 2)) @ rng.standard_normal((2, Kw))
    else: kw = rng.standard_normal((C, Kw)); kw[:, 1:] *= 0.01
    kw /= onp.linalg.norm(kw, axis=1, keepdims=True)
    bw = [rng.uniform(0, 2, C), onp.full(C, 2.0), onp.full(C, 1.0), rng.uniform(1.9, 2, C)][trial % 4]
    gw = -rng.uniform(0, [0, 1e-3, 0.1, 1][trial % 4], (C, Kw))
    worst = max(worst, (onp.linalg.norm(w_rows(kw, bw, gw), axis=1) / bw).max())
print(f"W's largest row norm / beta_i over 500 adversarial chunks, beta in [0, 2]: {worst:.6f} (the bound: 1)")
T, K, V = int(sys.argv[1]) if len(sys.argv) > 1 else 256, 128, 128
scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1 / onp.sqrt(K)
assert T % 64 == 0
names = ["O", "dq", "dk", "dv", "dg", "dbeta", "dS0"]
print(f"T {T}, K = V = {K}, scale {scale:.4g}: relative L2 error against fp64 (inputs and dO bf16)")
print("| decays g | stored | " + " | ".join(names) + " |")
print("|---|---|" + "---|" * len(names))
bf16 = lambda x: onp.asarray(x, onp.float32).astype(onp.float64)  # (inputs: fp32 is enough for the comparison)
for lo, hi in [(-40, -10), (-8, -2), (-20, -10), (-1, -0.01), (-1e-4, -1e-6)]:
    unit = lambda x: x / onp.linalg.norm(x, axis=1, keepdims=True)
    q = bf16(unit(rng.standard_normal((T, K)))) * scale
    k = bf16(unit(rng.standard_normal((T, K))))
    v = bf16(rng.standard_normal((T, V)))
    beta, g, dO = rng.uniform(0, 1, T), rng.uniform(lo, hi, (T, K)), bf16(rng.standard_normal((T, V)))
    S0 = bf16(rng.standard_normal((K, V)))
    loss = lambda q, k, v, g, beta, S0: np.sum(chunked(q, k, v, g, beta, S0) * dO)
    gradf = grad(loss, argnum=[0, 1, 2, 3, 4, 5])
    EXACT["on"] = True
    ref = [chunked(q, k, v, g, beta, S0)] + list(gradf(q, k, v, g, beta, S0))
    EXACT["on"] = False
    for label, rnd, rw, rd in [("all tf32 (now)", tf32, tf32, None), ("QG, KL, Aqk fp16", f16, tf32, None),
                               ("W too", f16, f16, None), ("W too, del from scaled fp16", f16, f16, f16_scaled),
                               ("QG, W rows fp16 x 2^e, del scaled", f16_qg_rows, f16_rows, f16_scaled)]:
        STORED["round"], STORED["w"], DEL["round"] = rnd, rw, rd or (lambda x: x)
        got = [chunked(q, k, v, g, beta, S0)] + list(gradf(q, k, v, g, beta, S0))
        errs = [onp.linalg.norm(a - b) / onp.linalg.norm(b) for a, b in zip(got, ref)]
        print(f"| [{lo}, {hi}] | {label} | " + " | ".join(f"{e:.2e}" for e in errs) + " |", flush=True)
