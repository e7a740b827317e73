# Host emulation (no GPU) of the bf16 state passes' thread maps (session 26's kda_bf16_passes_next.patch, merged): the
# state passes on bf16 operands (W, QG, KL, Aqk in shared memory with row pitch K + 8 or 72, ldmatrix .x4 with and
# without .trans, mma m16n8k16 bf16, the accumulator tiles as A fragments by acc_to_a_bf16, dO^T's A fragments by
# .trans) for one warp and one chunk, forward (Vp^T = U^T - S^T W^T, O^T = S^T QG^T + Vp^T Aqk^T, S^T = S^T diag(el) +
# Vp^T KL) and backward (dVp^T = dO^T Aqk + dS^T KL^T, dS^T = dS^T diag(el) + dO^T QG - dVp^T W), against numpy on
# integer inputs (exact), for K in {128, 64, 48, 16}; the worst bank degree of each ldmatrix phase; and the WY
# backward's X panel in bf16 (wy_kv_at), its copy map and the dL product's B reads (rows 32 wn + 8 nt + g, columns 8 ks
# + t (+ 4)). Run:
#   python3 bench/dev/emulate_bf16_passes.py
import numpy as np

rng = np.random.default_rng(2)
worst = 0


def smem(tile, pitch):  # a row-major tile (rows x cols) at row pitch `pitch` (bf16 elements) -> element dict
    return {r * pitch + c: tile[r, c] for r in range(tile.shape[0]) for c in range(tile.shape[1])}


def ldsm(mem, addr, trans):
    """addr[l]: lane l's row address (bf16 elements) of row l % 8 of matrix l / 8. Returns per lane 4 registers,
    each a pair (lo, hi): matrix i's (row g, columns 2t, 2t + 1), or with trans (rows 2t, 2t + 1, column g)."""
    global worst
    for m in range(4):
        rows = [addr[8 * m + r] for r in range(8)]
        assert all(a % 8 == 0 for a in rows)
        groups = [(a // 2 % 32) // 4 for a in rows]  # 4-byte words -> bank groups of 4 banks
        worst = max(worst, max(groups.count(x) for x in groups))
    out = []
    for l in range(32):
        g, t = l >> 2, l & 3
        regs = []
        for i in range(4):
            if trans:
                regs.append((mem[addr[8 * i + 2 * t] + g], mem[addr[8 * i + 2 * t + 1] + g]))
            else:
                regs.append((mem[addr[8 * i + g] + 2 * t], mem[addr[8 * i + g] + 2 * t + 1]))
        out.append(regs)
    return out


def mma(a, b0, b1, c):  # m16n8k16: a per lane 4 pairs, b0/b1 per lane a pair; c per lane 4 floats
    A, B = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
    for l in range(32):
        g, t = l >> 2, l & 3
        for reg, (r0, c0) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[r0, c0], A[r0, c0 + 1] = a[l][reg]
        B[2 * t, g], B[2 * t + 1, g] = b0[l]
        B[2 * t + 8, g], B[2 * t + 9, g] = b1[l]
    assert not np.isnan(A).any() and not np.isnan(B).any()
    D = A @ B
    return [[c[l][0] + D[l >> 2, 2 * (l & 3)], c[l][1] + D[l >> 2, 2 * (l & 3) + 1],
             c[l][2] + D[(l >> 2) + 8, 2 * (l & 3)], c[l][3] + D[(l >> 2) + 8, 2 * (l & 3) + 1]] for l in range(32)]


def mma_pair(c0, c1, a, b):
    return mma(a, [x[0] for x in b], [x[1] for x in b], c0), mma(a, [x[2] for x in b], [x[3] for x in b], c1)


def acc_to_a(c0, c1, neg=False):  # two C tiles -> A fragment (pairs); the values are exact in bf16 here
    s = -1 if neg else 1
    return [[(s * c0[l][0], s * c0[l][1]), (s * c0[l][2], s * c0[l][3]), (s * c1[l][0], s * c1[l][1]),
             (s * c1[l][2], s * c1[l][3])] for l in range(32)]


def tiles_to_mat(T, rows):  # C tiles (16 x 8 each, n-tile j = columns 8 j..) -> matrix 16 x 8 len(T)
    M = np.zeros((16, 8 * len(T)))
    for j, c in enumerate(T):
        for l in range(32):
            g, t = l >> 2, l & 3
            M[g, 8 * j + 2 * t], M[g, 8 * j + 2 * t + 1], M[g + 8, 8 * j + 2 * t], M[g + 8, 8 * j + 2 * t + 1] = c[l]
    return M


def mat_to_tiles(M):
    return [[[M[l >> 2, 8 * j + 2 * (l & 3)], M[l >> 2, 8 * j + 2 * (l & 3) + 1], M[(l >> 2) + 8, 8 * j + 2 * (l & 3)],
              M[(l >> 2) + 8, 8 * j + 2 * (l & 3) + 1]] for l in range(32)] for j in range(M.shape[1] // 8)]


lanes = [dict(nrow=(l & 7) + 8 * ((l >> 3) >> 1), ncol=8 * ((l >> 3) & 1), krow=(l & 7) + 8 * ((l >> 3) & 1),
              kcol=8 * ((l >> 3) >> 1)) for l in range(32)]
ints = lambda *shape: rng.integers(-3, 4, shape).astype(np.float64)
for K in (128, 64, 48, 16):
    KT, pk, pa = K // 8, K + 8, 72
    # forward: the warp's S^T (16 v x K), U^T (16 x 64); W, QG, KL (64 x K), Aqk (64 x 64), el
    ST, UT, W, QG, KL, AQ, el = ints(16, K), ints(16, 64), ints(64, K), ints(64, K), ints(64, K), ints(64, 64), ints(K)
    mW, mQ, mK, mA = smem(W, pk), smem(QG, pk), smem(KL, pk), smem(AQ, pa)
    S = mat_to_tiles(ST)
    zero = lambda: [[0.0] * 4 for _ in range(32)]
    P, O = [zero() for _ in range(8)], [zero() for _ in range(8)]
    for kk in range(KT // 2):
        a = acc_to_a(S[2 * kk], S[2 * kk + 1])
        for np_ in range(4):
            addr = [(16 * np_ + L['nrow']) * pk + 16 * kk + L['ncol'] for L in lanes]
            P[2 * np_], P[2 * np_ + 1] = mma_pair(P[2 * np_], P[2 * np_ + 1], a, ldsm(mW, addr, False))
            O[2 * np_], O[2 * np_ + 1] = mma_pair(O[2 * np_], O[2 * np_ + 1], a, ldsm(mQ, addr, False))
    assert np.array_equal(tiles_to_mat(P, 16), ST @ W.T) and np.array_equal(tiles_to_mat(O, 16), ST @ QG.T), K
    VpT = UT - ST @ W.T
    va = [acc_to_a(*mat_to_tiles(VpT)[2 * kk: 2 * kk + 2]) for kk in range(4)]
    for kk in range(4):
        for np_ in range(4):
            addr = [(16 * np_ + L['nrow']) * pa + 16 * kk + L['ncol'] for L in lanes]
            O[2 * np_], O[2 * np_ + 1] = mma_pair(O[2 * np_], O[2 * np_ + 1], va[kk], ldsm(mA, addr, False))
    assert np.array_equal(tiles_to_mat(O, 16), ST @ QG.T + VpT @ AQ.T), K
    S = mat_to_tiles(ST * el[None, :])  # decay_tiles
    for kk in range(4):
        for np_ in range(KT // 2):
            addr = [(16 * kk + L['krow']) * pk + 16 * np_ + L['kcol'] for L in lanes]
            S[2 * np_], S[2 * np_ + 1] = mma_pair(S[2 * np_], S[2 * np_ + 1], va[kk], ldsm(mK, addr, True))
    assert np.array_equal(tiles_to_mat(S, 16), ST * el[None, :] + VpT @ KL), K
    # backward: dS^T (16 x K), dO (64 x 16 NW, this warp's 16 columns at 16 w..), Aqk, KL, QG, W
    for NW, w in ((8, 5), (4, 3), (1, 0)):
        dop = 16 * NW + 8
        dST, dOblk = ints(16, K), ints(64, 16 * NW)
        mD = smem(dOblk, dop)
        dOa = []
        for kk in range(4):
            addr = [(16 * kk + L['nrow']) * dop + 16 * w + L['ncol'] for L in lanes]
            dOa.append(ldsm(mD, addr, True))
        dOT = dOblk[:, 16 * w: 16 * w + 16].T  # (16 v x 64 i)
        dVp = [zero() for _ in range(8)]
        for kk in range(4):
            for np_ in range(4):
                addr = [(16 * kk + L['krow']) * pa + 16 * np_ + L['kcol'] for L in lanes]
                dVp[2 * np_], dVp[2 * np_ + 1] = mma_pair(dVp[2 * np_], dVp[2 * np_ + 1], dOa[kk], ldsm(mA, addr, True))
        dS = mat_to_tiles(dST)
        for kk in range(KT // 2):
            a = acc_to_a(dS[2 * kk], dS[2 * kk + 1])
            for np_ in range(4):
                addr = [(16 * np_ + L['nrow']) * pk + 16 * kk + L['ncol'] for L in lanes]
                dVp[2 * np_], dVp[2 * np_ + 1] = mma_pair(dVp[2 * np_], dVp[2 * np_ + 1], a, ldsm(mK, addr, False))
        dVpT = dOT @ AQ + dST @ KL.T
        assert np.array_equal(tiles_to_mat(dVp, 16), dVpT), (K, NW)
        dS = mat_to_tiles(dST * el[None, :])
        for kk in range(4):
            a = acc_to_a(dVp[2 * kk], dVp[2 * kk + 1], True)
            for np_ in range(KT // 2):
                addr = [(16 * kk + L['krow']) * pk + 16 * np_ + L['kcol'] for L in lanes]
                dS[2 * np_], dS[2 * np_ + 1] = mma_pair(dS[2 * np_], dS[2 * np_ + 1], dOa[kk], ldsm(mQ, addr, True))
                dS[2 * np_], dS[2 * np_ + 1] = mma_pair(dS[2 * np_], dS[2 * np_ + 1], a, ldsm(mW, addr, True))
        assert np.array_equal(tiles_to_mat(dS, 16), dST * el[None, :] + dOT @ QG - dVpT @ W), (K, NW)
    print(f"K {K:3d}: forward (P, O, the update) and backward (dVp, dS at NW = 8, 4, 1) exact")
print(f"worst bank degree of an ldmatrix phase: {worst}")
assert worst == 1


# The WY backward's X panel (bf16, 64 x pw at wy_kv_at), copied by the k | v map, read as the dL product's B.
def wy_kv_at(r, c): return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3) + (c & 7)


worst = 0
for pw in (32, 16):
    sh = 3 if pw == 32 else 2
    X = rng.integers(-9, 10, (64, pw))
    tile = {}
    for e in range(64 * pw // 8):
        i, cl = e >> (sh - 1), 8 * (e & ((1 << (sh - 1)) - 1))
        for u in range(8):
            tile[wy_kv_at(i, cl + u)] = X[i, cl + u]
    for wn in range(2):
        for ks in range(4):
            if 8 * ks >= pw:
                break
            for nt in range(4):
                for half in (0, 4):
                    words = set()
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        r, c = 32 * wn + 8 * nt + g, 8 * ks + t + half
                        assert tile[wy_kv_at(r, c)] == X[r, c]
                        words.add(wy_kv_at(r, c) // 2)
                    banks = {}
                    for a in words:
                        banks.setdefault(a % 32, set()).add(a)
                    worst = max(worst, max(len(v) for v in banks.values()))
print(f"WY X panel: the dL product's B reads find what the copies wrote; worst bank degree {worst}")
assert worst == 1
