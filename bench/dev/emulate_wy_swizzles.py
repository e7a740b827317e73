# Host emulation (no GPU) of the WY backward's swizzled shared-memory tiles, written for two session-23 candidates
# (kda_wy_four_stages_next.patch, kda_wy_three_panels_next.patch), both merged in session 24 and now in
# kernels/kda_chunk.cu: phase 1's stage tiles (sp_at, sp_do_at) and phase 2's panel tiles (wy_dx_at, wy_x_at,
# wy_kv_at). For each: the index functions are bijections, the cp.async copy maps put
# every element where the fragment reads look for it (all warps, lanes, ks, nt; panel widths 32 and 16), and the
# worst shared-memory bank-conflict degree of each access (32 banks of 4 bytes; float2 stores per half warp, float4
# accesses per quarter warp). The expressions are those of kernels/kda_chunk.cu (dx_at, x_at, kv_at: the wy_* ones);
# run: python3 bench/dev/emulate_wy_swizzles.py
# ---- Phase 1 (kda_wy_four_stages_next.patch): state_products' stage tiles, pitch 16, four stages.
def sp_at(r,c): return r*16 + ((((c>>2) ^ (r>>1)) & 3) << 2) + (c & 3)
def sp_do_at(r,c): return r*16 + ((((c>>3) ^ (r>>2)) & 1) << 3) + (c & 7)
# bijection
assert sorted(sp_at(r,c) for r in range(64) for c in range(16)) == list(range(1024))
assert sorted(sp_do_at(r,c) for r in range(64) for c in range(16)) == list(range(1024))
# writes: thread tid copies piece (pr, pc..pc+3) to pa..pa+3: must be (pr, pc+e)
tile = {}
for tid in range(256):
    pr = (tid & 7) + 8*(tid >> 5); pc = 4*((tid >> 3) & 3); pa = sp_at(pr, pc)
    for e in range(4):
        assert sp_at(pr, pc+e) == pa + e; tile[pa+e] = (pr, pc+e)
assert len(tile) == 1024
dtile = {}
for tid in range(128):
    dr = (tid & 127) >> 1; dc = 8*(tid & 1); da = sp_do_at(dr, dc)
    for e in range(8):
        assert sp_do_at(dr, dc+e) == da + e; dtile[da+e] = (dr, dc+e)
assert len(dtile) == 1024
# copy bank conflicts: per quarter warp (8 threads), 16-byte pieces
for q in range(32):
    banks = set()
    for tid in range(8*q, 8*q+8):
        pr = (tid & 7) + 8*(tid >> 5); pc = 4*((tid >> 3) & 3); pa = sp_at(pr, pc)
        banks.add((pa % 32) // 4)
    assert len(banks) == 8, q
# reads
def wconf(addrs):  # 32 word addresses -> max distinct words on one bank
    from collections import defaultdict
    d = defaultdict(set)
    for a in addrs: d[a % 32].add(a)
    return max(len(v) for v in d.values())
worst = 1
for warp in range(8):
    wm, wn = warp >> 1, warp & 1
    for ks in (0, 8):
        for j in (0, 1):
            for extra in (0, 8):
                # A fp32 fragment: rows 16wm+g+extra, column ks+t+4j
                addrs = []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    cs = [sp_at(g, 4*jj+t) - 16*g for jj in range(4)]
                    r = 16*wm + g + extra; a = 16*r + cs[(ks >> 2) + j]
                    assert tile[a] == (r, ks+t+4*j); addrs.append(a)
                worst = max(worst, wconf(addrs))
                # B: rows 32wn + 8nt + g (+128 etc. same tile index math), column ks + t + 4j
                for nt in range(4):
                    addrs = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        cs = [sp_at(g, 4*jj+t) - 16*g for jj in range(4)]
                        r = 32*wn + 8*nt + g; a = 16*r + cs[(ks >> 2) + j]
                        assert tile[a] == (r, ks+t+4*j); addrs.append(a)
                    worst = max(worst, wconf(addrs))
                # dO bf16: u16 index; word = idx // 2
                addrs = []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    cd = [sp_do_at(g, 8*jj+t) - 16*g for jj in range(2)]
                    r = 16*wm + g + extra; a = 16*r + cd[ks >> 3] + 4*j
                    assert dtile[a] == (r, ks+t+4*j); addrs.append(a // 2)
                worst = max(worst, wconf(addrs))
print("phase 1 (four stages): every read gets its element; worst bank-conflict degree:", worst)

# ---- Phase 2 (kda_wy_three_panels_next.patch): the panel tiles dX, X (and Y), k | v, pitch 32.
from collections import defaultdict
def dx_at(r,c): return r*32 + ((((c>>2) ^ (2*r)) & 7) << 2) + (c & 3)
def x_at(r,c): return r*32 + ((((c>>2) ^ r) & 7) << 2) + (c & 3)
def kv_at(r,c): return r*32 + ((((c>>3) ^ (r>>1)) & 3) << 3) + (c & 7)
for f in (dx_at, x_at, kv_at):
    assert sorted(f(r,c) for r in range(64) for c in range(32)) == list(range(2048)), f
def conf(words):
    d = defaultdict(set)
    for w in words: d[w % 32].add(w)
    return max(len(v) for v in d.values())
worst = {}
def note(k, v): worst[k] = max(worst.get(k, 1), v)
NT = 256
for pw in (32, 16):
    sh = 3 if pw == 32 else 2
    # copy map: pieces land where the reads look
    dxt, xt, kvt = {}, {}, {}
    for tid in range(NT):
        e = tid
        while e < 64*pw//4:
            i, cl = e >> sh, 4*(e & ((1 << sh)-1))
            for q in range(4):
                assert dx_at(i, cl+q) == dx_at(i, cl) + q and x_at(i, cl+q) == x_at(i, cl) + q
                dxt[dx_at(i, cl+q)] = (i, cl+q); xt[x_at(i, cl+q)] = (i, cl+q)
            e += NT
        e = tid
        while e < 64*pw//8:
            i, cl = e >> (sh-1), 8*(e & ((1 << (sh-1))-1))
            for q in range(8):
                assert kv_at(i, cl+q) == kv_at(i, cl) + q
                kvt[kv_at(i, cl+q)] = (i, cl+q)
            e += NT
    assert len(dxt) == 64*pw and len(kvt) == 64*pw
    for warp in range(8):
        wm, wn = warp >> 1, warp & 1
        if 16*wn < pw:
            for ks in range(8):
                for nt in range(2):
                    for dr in (0, 4):
                        words = []
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            r, c = 8*ks + t + dr, 16*wn + 8*nt + g
                            a = dx_at(r, c); assert dxt[a] == (r, c); words.append(a)
                        note("dx_B", conf(words))
            # epilogue Y float2 writes and kv reads
            for nt in range(2):
                for hf in range(2):
                    for half in (0, 1):
                        words = []
                        for lane in range(16*half, 16*half+16):
                            g, t = lane >> 2, lane & 3
                            i, nl = 16*wm + g + 8*hf, 16*wn + 8*nt + 2*t
                            a = x_at(i, nl); assert x_at(i, nl+1) == a + 1; words += [a, a+1]
                        note("Y_store_f2", conf(words))
                    words = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        i, nl = 16*wm + g + 8*hf, 16*wn + 8*nt + 2*t
                        a = kv_at(i, nl); assert kvt[a] == (i, nl) and kv_at(i, nl+1) == a+1; words.append(a//2)
                    note("kv_pair", conf(words))
        for ks in range(4):
            if 8*ks >= pw: break
            for j in (0, 4):
                for dr in (0, 8):
                    words = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        words.append(x_at(16*wm + g + dr, 8*ks + t + j))
                    note("Y_A", conf(words))
                for nt in range(4):
                    words = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        r, c = 32*wn + 8*nt + g, 8*ks + t + j
                        a = x_at(r, c); assert xt[a] == (r, c); words.append(a)
                    note("X_B", conf(words))
print("phase 2 (three panels): every read gets its element; worst degree per access:", worst)
# the in-place tf32 pass: float4 accesses, degree per quarter warp
def q_degree(addrs):  # float4 accesses of 8 lanes: degree = max lanes sharing a 4-bank group with different rows
    d = defaultdict(set)
    for a in addrs: d[(a % 32)//4].add(a)
    return max(len(v) for v in d.values())
for pw in (32, 16):
    sh = 3 if pw == 32 else 2
    for nm, f in (("dx", dx_at), ("x", x_at)):
        deg = 1
        for q in range(0, 64*pw//4, 8):
            addrs = []
            for e in range(q, q+8):
                i, cl = e >> sh, 4*(e & ((1 << sh)-1)); addrs.append(f(i, cl))
            deg = max(deg, q_degree(addrs))
        print("inplace", nm, "pw", pw, "degree", deg)
