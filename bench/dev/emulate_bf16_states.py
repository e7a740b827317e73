# Host emulation (no GPU) of the WY backward's bf16 thread maps (session 26's kda_bf16_states_next.patch, merged): phase
# 1's state products on bf16 stage tiles (sp_at in 4-byte words, the cp.async copy map, ldmatrix .x4 addresses, mma
# m16n8k16 bf16 fragments, del and its shuffles, the output tile) and phase 2's dX panel in bf16 (wy_kv_at, its copy
# map, the Y product's B fragments, read as four base addresses + 256 ks). For K, V in {128, 48, 16} and their mixes:
# every product and del against numpy (exact: the values are small integers), and the worst shared-memory bank-conflict
# degree of the copies (per quarter warp) and of each ldmatrix phase (8 rows of 16 bytes). Not modelled: rows past T,
# the stage ring's cp.async groups and barriers, global addresses. The expressions are the patch's; run:
#   python3 bench/dev/emulate_bf16_states.py
import numpy as np


def sp_at(r, w): return r * 16 + ((((w >> 2) ^ (r >> 1)) & 3) << 2) + (w & 3)
def wy_kv_at(r, c): return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3) + (c & 7)


SP_TILE = 64 * 32 // 2  # words
NT = 256
rng = np.random.default_rng(1)
worst_copy, worst_ldsm = 0, 0


def mma_k16(A, B, C):
    """A: per lane 4 regs, each a pair (lo, hi); B: per lane 2 regs; C: per lane 4 floats. Returns C + A B."""
    Am, Bm = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
    for l in range(32):
        g, t = l >> 2, l & 3
        for reg, (r0, c0) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            Am[r0, c0], Am[r0, c0 + 1] = A[l][reg]
        for reg, k0 in enumerate([2 * t, 2 * t + 8]):
            Bm[k0, g], Bm[k0 + 1, g] = B[l][reg]
    assert not np.isnan(Am).any() and not np.isnan(Bm).any()
    D = Am @ Bm
    out = []
    for l in range(32):
        g, t = l >> 2, l & 3
        out.append([C[l][0] + D[g, 2 * t], C[l][1] + D[g, 2 * t + 1],
                    C[l][2] + D[g + 8, 2 * t], C[l][3] + D[g + 8, 2 * t + 1]])
    return out


def ldsm_x4(words, addr):
    """words: the stage (word index -> (lo, hi)); addr[l]: lane l's word address (row l % 8 of matrix l / 8).
    Returns per lane 4 registers; register i = matrix i's (row g, word t). Also the worst bank degree of a phase."""
    global worst_ldsm
    for m in range(4):
        rows = [addr[8 * m + r] for r in range(8)]
        assert all(a % 4 == 0 for a in rows), "16-byte aligned rows"
        banks = [(a % 32) // 4 for a in rows]
        worst_ldsm = max(worst_ldsm, max(banks.count(b) for b in banks))
    return [[words[addr[8 * i + (l >> 2)] + (l & 3)] for i in range(4)] for l in range(32)]


def state_products(K, V, dO, Vp, dVp, S0, dS):
    """The patch's state_products for one chunk (T rows past the end: none). Returns P0..P3 (64 x 64) and del."""
    global worst_copy
    nv, ns = (V + 31) // 32, (K + 63) // 64 * ((V + 31) // 32)
    P = [np.zeros((64, K)) for _ in range(3)] + [np.zeros((64, 64))]
    dele = np.zeros(K)
    acc = {}  # (warp, p, nt) -> per lane 4 floats
    dl = [0.0] * NT
    for s in range(ns):
        n0, k0 = 64 * (s // nv), 32 * (s % nv)
        cols, steps = min(64, K - n0), min(32, V - k0) // 16
        if k0 == 0:
            acc = {(w, p, nt): [[0.0] * 4 for _ in range(32)] for w in range(8) for p in range(4) for nt in range(4)}
            dl = [0.0] * NT
        # the copies: a stage of five tiles, words -> (lo, hi) bf16 pair
        words = {}
        for q in range(NT // 8):
            banks = set()
            for tid in range(8 * q, 8 * q + 8):
                pr, pp = (tid & 7) + 8 * (tid >> 5), (tid >> 3) & 3
                pa = sp_at(pr, 4 * pp)
                assert all(sp_at(pr, 4 * pp + e) == pa + e for e in range(4))
                c = k0 + 8 * pp
                banks.add((pa % 32) // 4)
                if c >= V:
                    continue
                row_in = n0 + pr < K
                z = np.zeros(V)
                srcs = [Vp[pr], dVp[pr], S0[n0 + pr] if row_in else z, dS[n0 + pr] if row_in else z, dO[pr]]
                for ti, src in enumerate(srcs):
                    for e in range(4):
                        words[ti * SP_TILE + pa + e] = (src[c + 2 * e], src[c + 2 * e + 1])
            worst_copy = max(worst_copy, 8 // len(banks))
        # del: the thread's S0 and dS' pieces
        for tid in range(NT):
            pr, pp = (tid & 7) + 8 * (tid >> 5), (tid >> 3) & 3
            if pp < 2 * steps:
                pa = sp_at(pr, 4 * pp)
                for e in range(4):
                    x, y = words[2 * SP_TILE + pa + e], words[3 * SP_TILE + pa + e]
                    dl[tid] += x[0] * y[0] + x[1] * y[1]
        # the products
        for w in range(8):
            wm, wn = w >> 1, w & 1
            def a_addr(base, kk):
                out = []
                for l in range(32):
                    lr, lm = l & 7, l >> 3
                    arow = 16 * wm + lr + 8 * (lm & 1)
                    out.append(base + sp_at(arow, 8 * kk + 4 * (lm >> 1)))
                return out
            def b_addr(base, j, kk):
                out = []
                for l in range(32):
                    lr, lm = l & 7, l >> 3
                    brow = 32 * wn + lr + 8 * (lm >> 1)
                    out.append(base + sp_at(brow + 16 * j, 8 * kk + 4 * (lm & 1)))
                return out
            Vs, DVs, Ss, DSs, DOs = 0, SP_TILE, 2 * SP_TILE, 3 * SP_TILE, 4 * SP_TILE
            def bfrag(b, nt):  # lane's (b0, b1) of n-tile nt from the two ldmatrix results
                return [[b[nt >> 1][l][2 * (nt & 1)], b[nt >> 1][l][2 * (nt & 1) + 1]] for l in range(32)]
            if 32 * wn < cols:
                for kk in range(min(2, steps)):
                    bs = [ldsm_x4(words, b_addr(Ss, j, kk)) for j in range(2)]
                    bd = [ldsm_x4(words, b_addr(DSs, j, kk)) for j in range(2)]
                    for p, (abase, bb) in enumerate([(DOs, bs), (Vs, bd), (DVs, bs)]):
                        a = ldsm_x4(words, a_addr(abase, kk))
                        for nt in range(4):
                            acc[(w, p, nt)] = mma_k16(a, bfrag(bb, nt), acc[(w, p, nt)])
            if n0 == 0:
                for kk in range(min(2, steps)):
                    bv = [ldsm_x4(words, b_addr(Vs, j, kk)) for j in range(2)]
                    a = ldsm_x4(words, a_addr(DOs, kk))
                    for nt in range(4):
                        acc[(w, 3, nt)] = mma_k16(a, bfrag(bv, nt), acc[(w, 3, nt)])
        if k0 + 32 < V:
            continue
        # del: lanes l, l + 8, l + 16, l + 24 of a warp hold one row's four parts
        for tid in range(NT):
            pr, pp = (tid & 7) + 8 * (tid >> 5), (tid >> 3) & 3
            if pp == 0 and pr < cols:
                wbase = tid & ~31
                dele[n0 + pr] = sum(dl[wbase + (tid & 7) + 8 * u] for u in range(4))
        # the output tiles (store_c: rows 16 wm + g (+ 8), columns 32 wn + 8 nt + 2t (+ 1))
        for p in range(4):
            if p == 3 and n0 != 0:
                break
            for w in range(8):
                wm, wn = w >> 1, w & 1
                if not (p == 3 or 32 * wn < cols):
                    continue
                for nt in range(4):
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        c = acc[(w, p, nt)][l]
                        for r, (i, j) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                            ii, jj = 16 * wm + i, 32 * wn + 8 * nt + j
                            if p == 3:
                                P[3][ii, jj] = c[r]
                            elif jj < cols:
                                P[p][ii, n0 + jj] = c[r]
    return P, dele


for K, V in [(128, 128), (48, 48), (16, 16), (128, 48), (48, 128), (64, 80)]:
    ints = lambda *shape: rng.integers(-4, 5, shape).astype(np.float64)
    dO, Vp, dVp, S0, dS = ints(64, V), ints(64, V), ints(64, V), ints(K, V), ints(K, V)
    P, dele = state_products(K, V, dO, Vp, dVp, S0, dS)
    assert np.array_equal(P[0], dO @ S0.T), (K, V, 0)
    assert np.array_equal(P[1], Vp @ dS.T), (K, V, 1)
    assert np.array_equal(P[2], dVp @ S0.T), (K, V, 2)
    assert np.array_equal(P[3], dO @ Vp.T), (K, V, 3)
    assert np.array_equal(dele, (dS * S0).sum(axis=1)), (K, V, "del")
    print(f"phase 1, K {K:3d} V {V:3d}: P0..P3 and del exact")
print(f"phase 1: worst bank degree, copies (per quarter warp) {worst_copy}, ldmatrix phases {worst_ldsm}")
assert worst_copy == 1 and worst_ldsm == 1

# Phase 2: the panel's dX, bf16 64 x pw (pw = 32, or 16 for a last panel) at wy_kv_at, copied by the k | v map
# (e < 64 pw / 8: row e >> (sh - 1), columns 8 (e & ((1 << (sh - 1)) - 1))..); the Y product reads B (k = chunk row
# 8 ks + t (+ 4), n = column 16 wn + 8 nt + g) for the warps with 16 wn < pw.
worst = 0
for pw in (32, 16):
    sh = 3 if pw == 32 else 2
    dx = rng.integers(-9, 10, (64, pw))
    tile = {}
    for e in range(64 * pw // 8):
        i, cl = e >> (sh - 1), 8 * (e & ((1 << (sh - 1)) - 1))
        for u in range(8):
            tile[wy_kv_at(i, cl + u)] = dx[i, cl + u]
        assert all(wy_kv_at(i, cl + u) == wy_kv_at(i, cl) + u for u in range(8))
    for w in range(8):
        wm, wn = w >> 1, w & 1
        if 16 * wn >= pw:
            continue
        for ks in range(8):
            for nt in range(2):
                for half in (0, 4):
                    words = []
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        r, n = 8 * ks + t + half, 16 * wn + 8 * nt + g
                        assert tile[wy_kv_at(r, n)] == dx[r, n]
                        assert wy_kv_at(r, n) == 256 * ks + wy_kv_at(t + half, n)  # the kernel's base + 256 ks
                        words.append(wy_kv_at(r, n) // 2)
                    banks = {}
                    for a in set(words):
                        banks.setdefault(a % 32, set()).add(a)
                    worst = max(worst, max(len(v) for v in banks.values()))
print(f"phase 2: dX's B fragments read what the copies wrote; worst bank degree {worst}")
assert worst == 1
