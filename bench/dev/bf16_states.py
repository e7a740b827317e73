# Offline numerics (CPU, numpy + autograd) for bf16 per-chunk buffers (bench/README, session 26: all three merged).
# "saved five" (kda_bf16_states_next.patch): the state passes store S0 (the state entering each chunk), Vp, dS' and
# dVp in bf16 instead of fp32, and the WY backward its dX k half. They enter only the WY backward: its state
# products (dqg = dO S0^T, dkl = Vp dS'^T, dX's k half = -dVp S0^T, dAqk = dO Vp^T), del = rowsum(dS' * S0) and its
# Y = M^T dX, dL = -Y X^T over dX = [dX's k half | dVp]. The output, the state passes' own products (fp32
# registers, tf32 operands) and so dS0 are unchanged.
# "+ passes" (kda_bf16_passes_next.patch): W, QG, KL, Aqk stored bf16 and every state-pass product (forward: W S,
# QG S, Aqk Vp, KL^T Vp; backward: QG^T dO, W^T dVp, Aqk^T dO, KL dS') on bf16 operands, the states and Vp, dVp
# rounded to bf16 as A operands; "+ U": U stored bf16 too (the patch stores it so).
# "partials" (kda_bf16_partials_next.patch, alone or on top of both): the partial gradients the WY backward hands the
# pairwise one stored bf16: PDQ = eg dQG, PDK = ekl dKL, PDK2 = eg beta Y, dL (as wl = beta dL), dAqk; the gate's
# terms from them (q PDQ, k PDK, ...) use the rounded values, as the pairwise kernel does; dbeta's stay fp32.
# The chunked forward is bench/dev/f16_buffers.py's (with an initial state); each product's operands tf32 except
# where a mode says bf16 (nearest even, as __float2bfloat16_rn); accumulation exact. Relative L2 error of every
# gradient against fp64.
# Run: python3 bench/dev/bf16_states.py [T]   (pip install autograd)
import sys
import autograd.numpy as np
import numpy as onp
from autograd import grad
from autograd.extend import primitive, defvjp


def keep_bits(x, bits):  # fp64 -> fp32 -> `bits` mantissa bits; tf32 ties away (tf32_bits), bf16 ties to even
    f = onp.asarray(x, onp.float32).view(onp.uint32).astype(onp.uint64)
    drop = 23 - bits
    f = f + (1 << (drop - 1)) if bits == 10 else f + (1 << (drop - 1)) - 1 + ((f >> drop) & 1)
    return (f >> drop << drop).astype(onp.uint32).view(onp.float32).astype(onp.float64)


EXACT = {"on": False}
BF16 = set()  # bf16: saved "S0", "dS", "Vp", "dVp", "dXk"; "passes" (the state products), "U", "partials"


def tf32(x):
    return x if EXACT["on"] else keep_bits(x, 10)


def saved(name, x):  # a saved array as the WY backward reads it
    if EXACT["on"]:
        return x
    return keep_bits(x, 7) if name in BF16 else keep_bits(x, 10)


@primitive
def mm(A, B):  # a per-chunk product: W | U = M (beta eg K | V); its gradient to B is dX (the WY backward's Y)
    return tf32(A) @ tf32(B)


def mm_dB(ans, A, B):
    return lambda G: tf32(A).T @ G  # G: dX, already rounded where it was made (see mm_x)


defvjp(mm, lambda ans, A, B: lambda G: G @ tf32(B).T, mm_dB)


def op(x):  # an operand of the state passes' own products
    return x if EXACT["on"] else keep_bits(x, 7 if "passes" in BF16 else 10)


def make_state_mm(a_name_g, b_name):  # a state product A B; dA = G B^T is a WY product over saved arrays
    @primitive
    def f(A, B):
        return op(A) @ op(B)

    defvjp(f, lambda ans, A, B: lambda G: saved(a_name_g, G) @ saved(b_name, B).T,
           lambda ans, A, B: lambda G: op(A).T @ op(G))  # dB: the backward state pass, fp32 registers
    return f


@primitive
def stored_u(U):  # U as the state pass reads it
    return keep_bits(U, 7) if "U" in BF16 and not EXACT["on"] else U


defvjp(stored_u, lambda ans, U: lambda G: G)


mm_qg = make_state_mm("dO", "S0")   # O += QG S:      dQG = dO S0^T
mm_aq = make_state_mm("dO", "Vp")   # O += Aqk Vp:    dAqk = dO Vp^T
mm_kl = make_state_mm("dS", "Vp")   # S' += KL^T Vp:  dKL^T = dS' Vp^T
mm_w = make_state_mm("dVp", "S0")   # Vp = U - W S:   dW = -dVp S0^T


def make_dx(name):  # identity; its gradient rounded as the WY backward's dX panels hold it (W's: dX's k half)
    @primitive
    def f(X):
        return X

    defvjp(f, lambda ans, X: lambda G: saved(name, G))
    return f


dx_w, dx_u = make_dx("dXk"), make_dx("dVp")


@primitive
def decay(el, S):  # S^T diag(el); its gradient to el is del = rowsum(dS' * S0)
    return el[:, None] * S


defvjp(decay, lambda ans, el, S: lambda G: onp.sum(saved("dS", G) * saved("S0", S), axis=1),
       lambda ans, el, S: lambda G: el[:, None] * G)


def part(G):  # a partial gradient the WY backward hands the pairwise one (PDQ, PDK, PDK2, DL, DA)
    return keep_bits(G, 7) if "partials" in BF16 and not EXACT["on"] else G


@primitive
def scaled(x, s):  # x * exp(s); the gradient to x is a stored partial P, the one to s is P * x (as the kernels)
    return x * onp.exp(s)


defvjp(scaled, lambda ans, x, s: lambda G: part(G * onp.exp(s)),
       lambda ans, x, s: lambda G: part(G * onp.exp(s)) * x)


@primitive
def rg(X):  # identity; its gradient is a stored partial
    return X


defvjp(rg, lambda ans, X: lambda G: part(G))


def chunked(q, k, v, g, beta, S0, C=64):
    T, K = k.shape
    S = S0
    outs = []
    for t0 in range(0, T, C):
        qc, kc, vc, bc = q[t0:t0 + C], k[t0:t0 + C], v[t0:t0 + C], beta[t0:t0 + C]
        gc = np.cumsum(g[t0:t0 + C], axis=0)
        D = np.exp(np.minimum(gc[:, None, :] - gc[None, :, :], 0))
        mask = onp.tril(onp.ones((C, C)))
        Akk = np.tril(bc[:, None] * rg(np.einsum('ik,jk,ijk->ij', kc, kc, D * mask[:, :, None])), -1)
        Aqk = rg(np.einsum('ik,jk,ijk->ij', qc, kc, D * mask[:, :, None]))
        M = np.linalg.inv(np.eye(C) + Akk)
        W = dx_w(mm(M, bc[:, None] * scaled(kc, gc)))
        U = stored_u(dx_u(mm(M, bc[:, None] * vc)))
        QG, KL, el = scaled(qc, gc), scaled(kc, gc[-1] - gc), np.exp(gc[-1])
        Vp = U - mm_w(W, S)
        outs.append(mm_qg(QG, S) + mm_aq(Aqk, Vp))
        S = decay(el, S) + mm_kl(KL.T, Vp)
    return np.concatenate(outs, axis=0)


T, K, V = int(sys.argv[1]) if len(sys.argv) > 1 else 256, 128, 128
assert T % 64 == 0
rng = onp.random.default_rng(0)
names = ["O", "dq", "dk", "dv", "dg", "dbeta", "dS0"]
print(f"T {T}, K = V = {K}: relative L2 error against fp64 (inputs and dO bf16, an initial state)")
print("| decays g | bf16 | " + " | ".join(names) + " |")
print("|---|---|" + "---|" * len(names))
bf = lambda x: keep_bits(x, 7)
for lo, hi in [(-40, -10), (-8, -2), (-1, -0.01), (-0.05, -0.001), (-1e-4, -1e-6)]:
    unit = lambda x: x / onp.linalg.norm(x, axis=1, keepdims=True)
    q = bf(unit(rng.standard_normal((T, K)))) / onp.sqrt(K)
    k = bf(unit(rng.standard_normal((T, K))))
    v = bf(rng.standard_normal((T, V)))
    beta, g, dO = rng.uniform(0, 1, T), rng.uniform(lo, hi, (T, K)), bf(rng.standard_normal((T, V)))
    S0 = bf(rng.standard_normal((K, V)))
    loss = lambda q, k, v, g, beta, S0: np.sum(chunked(q, k, v, g, beta, S0) * dO)
    gradf = grad(loss, argnum=[0, 1, 2, 3, 4, 5])
    EXACT["on"] = True
    ref = [chunked(q, k, v, g, beta, S0)] + list(gradf(q, k, v, g, beta, S0))
    EXACT["on"] = False
    five = {"S0", "dS", "Vp", "dVp", "dXk"}
    for label, modes in [("none (now)", set()), ("saved five", five), ("five + passes + U", five | {"passes", "U"}),
                         ("partials", {"partials"}), ("all + partials", five | {"passes", "U", "partials"})]:
        BF16.clear()
        BF16.update(modes)
        got = [chunked(q, k, v, g, beta, S0)] + list(gradf(q, k, v, g, beta, S0))
        errs = [onp.linalg.norm(a - b) / onp.linalg.norm(b) for a, b in zip(got, ref)]
        print(f"| [{lo}, {hi}] | {label} | " + " | ".join(f"{e:.2e}" for e in errs) + " |", flush=True)
