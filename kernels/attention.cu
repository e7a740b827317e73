// Causal, document-masked softmax attention on the GPU, flash style; see attention.h.
// Tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulate), operands moved from shared
// memory with ldmatrix, tiles brought in with cp.async (double-buffered). Every warp owns 16 rows of
// its block's tile (queries in the forward and the dq pass, keys in the dk/dv pass), so a warp's
// softmax statistics never leave its registers. Widths are compile-time: each call runs the smallest
// instantiation whose padded widths (DQK, DV) hold (Dqk, Dv); columns past the real width are
// zero-filled in shared memory and never written back.
#include <float.h>
#include <stdint.h>

#include "kernels/attention.h"
#include "kernels/cuda_common.cuh"

namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr int WARPS = 4, THREADS = WARPS * 32, ROWS = WARPS * 16;  // 16 rows of the block's tile per warp
constexpr int FWD_KEYS = 64;   // keys per step of the forward
constexpr int DKV_QUERIES = 32;  // queries per step of the dk/dv pass
constexpr int DQ_KEYS = 32;    // keys per step of the dq pass

// ---- warp-level tensor-core primitives ----
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16_t *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const bf16_t *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// c += a b: a (16x16, row-major fragment), b (16x8, column-major fragment), c (16x8) fp32.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
// A fragment (16x16) from a row-major tile: element (r, c) at s[r * stride + c].
__device__ __forceinline__ void load_a(uint32_t a[4], const bf16_t *s, int stride, int r0, int c0, int lane) {
  ldsm_x4(a, s + (r0 + (lane & 15)) * stride + c0 + (lane >> 4) * 8);
}
// B fragments of two adjacent n-tiles (n0..n0+15) over k0..k0+15, from a tile stored [n][k]:
// tile j uses (b[2j], b[2j+1]).
__device__ __forceinline__ void load_b_nk(uint32_t b[4], const bf16_t *s, int stride, int n0, int k0, int lane) {
  ldsm_x4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * stride + k0 + ((lane >> 3) & 1) * 8);
}
// The same from a tile stored [k][n] (transposed on load).
__device__ __forceinline__ void load_b_kn(uint32_t b[4], const bf16_t *s, int stride, int n0, int k0, int lane) {
  ldsm_x4_t(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + n0 + (lane >> 4) * 8);
}
// The C fragments of n-tiles 2j, 2j+1 (16 columns) as the A fragment of k-step j.
__device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// ---- tiles: global (B, T, H, D) rows -> shared [rows][D + 8] ----
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// rows [t0, t0 + NR) of head h of row b (positions >= T and columns >= D zero-filled); the tile has
// DP (padded width) columns and row stride DP + 8.
template <int NR, int DP>
__device__ __forceinline__ void load_tile(bf16_t *s, const bf16_t *g, int b, int h, int t0, int T, int H, int D) {
  constexpr int CHUNKS = DP / 8;
  for (int e = threadIdx.x; e < NR * CHUNKS; e += THREADS) {
    int r = e / CHUNKS, c = (e % CHUNKS) * 8, t = t0 + r;
    bool valid = t < T && c < D;
    const bf16_t *src = valid ? g + ((size_t)((size_t)b * T + t) * H + h) * D + c : g;
    cp_async16(s + r * (DP + 8) + c, src, valid);
  }
}
// Per-query statistics (lse in log2 units, D) of positions [t0, t0 + NR) of (b, h), from stats
// (B, H, T) float2; positions >= T zero-filled.
template <int NR>
__device__ __forceinline__ void load_stats(float2 *s, const float2 *g, int b, int h, int t0, int T, int H) {
  for (int r = threadIdx.x; r < NR; r += THREADS) {
    int t = t0 + r;
    bool valid = t < T;
    const float2 *src = valid ? g + ((size_t)b * H + h) * T + t : g;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(s + r)), "l"(src), "r"(valid ? 8 : 0));
  }
}

// Float max through integer atomics (order-independent, so the result is deterministic).
__device__ __forceinline__ void atomic_max_float(float *address, float value) {
  if (value >= 0.0f) atomicMax((int *)address, __float_as_int(value));
  else atomicMin((unsigned int *)address, __float_as_uint(value));
}

// 2^x in one MUFU instruction (flush-to-zero; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Quad (4 lanes sharing a fragment row) reductions.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- document bounds: begin[b, t] = first position of t's document, next[b, t] = the next document
// start after t (T if none). One block per row; a chunk per thread, chunk results scanned in shared. ----
constexpr int BOUNDS_THREADS = 1024;
__global__ void __launch_bounds__(BOUNDS_THREADS) doc_bounds_kernel(int *begin, int *next, const unsigned char *doc_start, int T) {
  __shared__ int last_start[BOUNDS_THREADS], first_start[BOUNDS_THREADS];
  const int b = blockIdx.x, chunk = (T + BOUNDS_THREADS - 1) / BOUNDS_THREADS;
  const int lo = min(T, (int)threadIdx.x * chunk), hi = min(T, lo + chunk);
  const unsigned char *row = doc_start ? doc_start + (size_t)b * T : nullptr;
  int last = -1, first = T;
  for (int t = lo; t < hi; t++)
    if (t == 0 || (row && row[t])) {
      if (first == T) first = t;
      last = t;
    }
  last_start[threadIdx.x] = last, first_start[threadIdx.x] = first;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive scans: last start before each chunk, first start after it
    int run = -1;
    for (int i = 0; i < BOUNDS_THREADS; i++) {
      int here = last_start[i];
      last_start[i] = run;
      run = max(run, here);
    }
    run = T;
    for (int i = BOUNDS_THREADS - 1; i >= 0; i--) {
      int here = first_start[i];
      first_start[i] = run;
      run = min(run, here);
    }
  }
  __syncthreads();
  int run = last_start[threadIdx.x];
  for (int t = lo; t < hi; t++) {
    if (t == 0 || (row && row[t])) run = t;
    begin[(size_t)b * T + t] = run;
  }
  run = first_start[threadIdx.x];
  for (int t = hi - 1; t >= lo; t--) {
    next[(size_t)b * T + t] = run;
    if (t == 0 || (row && row[t])) run = t;
  }
}

// ---- forward: one block per (query block of ROWS, head, row b) ----
template <int DQK, int DV>
struct FwdSmem {
  static constexpr int SQ = DQK + 8, SV = DV + 8;
  static constexpr int Q = ROWS * SQ, K = FWD_KEYS * SQ, V = FWD_KEYS * SV;
  static constexpr size_t bytes = (size_t)(Q + 2 * K + 2 * V) * sizeof(bf16_t);
};

template <int DQK, int DV>
__global__ void __launch_bounds__(THREADS, 2)
    attention_forward_kernel(bf16_t *out, float *lse, float *max_logit, const bf16_t *q, const bf16_t *k,
                             const bf16_t *v, const int *doc_begin, float scale, int T, int H, int Dqk, int Dv) {
  using S = FwdSmem<DQK, DV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t *sQ = reinterpret_cast<bf16_t *>(smem_raw), *sK = sQ + S::Q, *sV = sK + 2 * S::K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int qb = gridDim.x - 1 - blockIdx.x;  // longest blocks first
  const int h = blockIdx.y, b = blockIdx.z, i0 = qb * ROWS;
  const int *begin = doc_begin + (size_t)b * T;
  const int last_row = min(i0 + ROWS, T) - 1;
  const int j_first = begin[i0] / FWD_KEYS, j_last = last_row / FWD_KEYS;
  const int mask_before = begin[last_row];  // key blocks starting below this need the document mask
  // This thread's two rows and the first key each may see.
  const int r_lo = i0 + warp * 16 + g, r_hi = r_lo + 8;
  const int first_lo = begin[min(r_lo, T - 1)], first_hi = begin[min(r_hi, T - 1)];

  load_tile<ROWS, DQK>(sQ, q, b, h, i0, T, H, Dqk);
  load_tile<FWD_KEYS, DQK>(sK, k, b, h, j_first * FWD_KEYS, T, H, Dqk);
  load_tile<FWD_KEYS, DV>(sV, v, b, h, j_first * FWD_KEYS, T, H, Dv);
  cp_async_commit();

  float o[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DV / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;  // raw-logit max, partial sums
  const float sl2 = scale * LOG2E;
  uint32_t qf[DQK / 16][4];

  for (int jb = j_first; jb <= j_last; jb++) {
    const int buf = (jb - j_first) & 1, j0 = jb * FWD_KEYS;
    cp_async_wait<0>();
    __syncthreads();  // this tile has landed, and every warp is done with the other buffer
    if (jb < j_last) {  // prefetch the next tile into the other buffer while this one is used
      load_tile<FWD_KEYS, DQK>(sK + (buf ^ 1) * S::K, k, b, h, j0 + FWD_KEYS, T, H, Dqk);
      load_tile<FWD_KEYS, DV>(sV + (buf ^ 1) * S::V, v, b, h, j0 + FWD_KEYS, T, H, Dv);
      cp_async_commit();
    }
    if (jb == j_first) {
#pragma unroll
      for (int kk = 0; kk < DQK / 16; kk++) load_a(qf[kk], sQ, S::SQ, warp * 16, kk * 16, lane);
    }
    const bf16_t *tK = sK + buf * S::K, *tV = sV + buf * S::V;
    float s[FWD_KEYS / 8][4];
#pragma unroll
    for (int n = 0; n < FWD_KEYS / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DQK / 16; kk++)
#pragma unroll
      for (int n = 0; n < FWD_KEYS / 16; n++) {
        uint32_t bf[4];
        load_b_nk(bf, tK, S::SQ, n * 16, kk * 16, lane);
        mma16816(s[2 * n], qf[kk], bf[0], bf[1]);
        mma16816(s[2 * n + 1], qf[kk], bf[2], bf[3]);
      }
    if (j0 + FWD_KEYS > i0 + warp * 16 || j0 < mask_before) {
#pragma unroll
      for (int n = 0; n < FWD_KEYS / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          int j = j0 + n * 8 + 2 * tq + e;
          if (j < first_lo || j > r_lo) s[n][e] = -INFINITY;
          if (j < first_hi || j > r_hi) s[n][2 + e] = -INFINITY;
        }
    }
    float bm_lo = -INFINITY, bm_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < FWD_KEYS / 8; n++) {
      bm_lo = fmaxf(bm_lo, fmaxf(s[n][0], s[n][1]));
      bm_hi = fmaxf(bm_hi, fmaxf(s[n][2], s[n][3]));
    }
    const float new_lo = fmaxf(m_lo, quad_max(bm_lo)), new_hi = fmaxf(m_hi, quad_max(bm_hi));
    const float base_lo = new_lo == -INFINITY ? 0.0f : new_lo * sl2;
    const float base_hi = new_hi == -INFINITY ? 0.0f : new_hi * sl2;
    const float alpha_lo = fast_exp2(m_lo * sl2 - base_lo), alpha_hi = fast_exp2(m_hi * sl2 - base_hi);
    m_lo = new_lo, m_hi = new_hi;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int n = 0; n < FWD_KEYS / 8; n++) {
      s[n][0] = fast_exp2(fmaf(s[n][0], sl2, -base_lo));
      s[n][1] = fast_exp2(fmaf(s[n][1], sl2, -base_lo));
      s[n][2] = fast_exp2(fmaf(s[n][2], sl2, -base_hi));
      s[n][3] = fast_exp2(fmaf(s[n][3], sl2, -base_hi));
      sum_lo += s[n][0] + s[n][1];
      sum_hi += s[n][2] + s[n][3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;
    l_hi = l_hi * alpha_hi + sum_hi;
    if (__any_sync(0xffffffffu, alpha_lo != 1.0f || alpha_hi != 1.0f)) {  // the max moved for some row
#pragma unroll
      for (int n = 0; n < DV / 8; n++) {
        o[n][0] *= alpha_lo, o[n][1] *= alpha_lo;
        o[n][2] *= alpha_hi, o[n][3] *= alpha_hi;
      }
    }
#pragma unroll
    for (int kk = 0; kk < FWD_KEYS / 16; kk++) {
      uint32_t pa[4];
      c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int n = 0; n < DV / 16; n++) {
        uint32_t bf[4];
        load_b_kn(bf, tV, S::SV, n * 16, kk * 16, lane);
        mma16816(o[2 * n], pa, bf[0], bf[1]);
        mma16816(o[2 * n + 1], pa, bf[2], bf[3]);
      }
    }
  }

  l_lo = quad_sum(l_lo), l_hi = quad_sum(l_hi);
  const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
  const size_t ld = (size_t)H * Dv;
#pragma unroll
  for (int n = 0; n < DV / 8; n++) {
    int c = n * 8 + 2 * tq;
    if (c < Dv) {
      if (r_lo < T)
        *reinterpret_cast<__nv_bfloat162 *>(out + ((size_t)b * T + r_lo) * ld + (size_t)h * Dv + c) =
            __floats2bfloat162_rn(o[n][0] * inv_lo, o[n][1] * inv_lo);
      if (r_hi < T)
        *reinterpret_cast<__nv_bfloat162 *>(out + ((size_t)b * T + r_hi) * ld + (size_t)h * Dv + c) =
            __floats2bfloat162_rn(o[n][2] * inv_hi, o[n][3] * inv_hi);
    }
  }
  if (tq == 0) {
    if (r_lo < T) lse[((size_t)b * T + r_lo) * H + h] = m_lo * scale + logf(l_lo);
    if (r_hi < T) lse[((size_t)b * T + r_hi) * H + h] = m_hi * scale + logf(l_hi);
  }
  // Largest raw logit of the block's real rows, then one atomic per block.
  float m = fmaxf(r_lo < T ? m_lo : -INFINITY, r_hi < T ? m_hi : -INFINITY);
  m = warp_max(m);
  __shared__ float warp_m[WARPS];
  if (lane == 0) warp_m[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < WARPS; w++) m = fmaxf(m, warp_m[w]);
    atomic_max_float(&max_logit[h], m * scale);
  }
}

// ---- backward: per query, stats = (lse log2(e), D = rowsum(dout * out)), laid out (B, H, T) so a
// tile's queries are contiguous (one warp per query and head) ----
__global__ void row_stats_kernel(float2 *stats, const bf16_t *dout, const bf16_t *out, const float *lse, size_t rows,
                                 int T, int H, int Dv) {
  size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;  // (b, t, h) row
  int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float sum = 0.0f;
  const bf16_t *a = dout + r * Dv, *o = out + r * Dv;
  for (int c = 2 * lane; c < Dv; c += 64) {
    float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(a + c));
    float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(o + c));
    sum += x.x * y.x + x.y * y.y;
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    size_t h = r % H, bt = r / H, t = bt % T, b = bt / T;
    stats[(b * H + h) * T + t] = make_float2(lse[r] * LOG2E, sum);
  }
}

// ---- backward, dk and dv: one block per (key block of ROWS, head, row b); each warp holds 16 keys'
// dk and dv in registers and walks the query blocks that can see its keys. Transposed scores:
// S^T = K Q^T (keys x queries), P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - D), dK += dS^T Q. ----
template <int DQK, int DV>
struct DkvSmem {
  static constexpr int SQ = DQK + 8, SV = DV + 8;
  static constexpr int K = ROWS * SQ, V = ROWS * SV, Q = DKV_QUERIES * SQ, O = DKV_QUERIES * SV;
  static constexpr size_t bytes = (size_t)(K + V + 2 * Q + 2 * O) * sizeof(bf16_t) + 2 * DKV_QUERIES * sizeof(float2);
};

template <int DQK, int DV>
__global__ void __launch_bounds__(THREADS, 2)
    attention_dkdv_kernel(bf16_t *dk, bf16_t *dv, const bf16_t *dout, const bf16_t *q, const bf16_t *k,
                          const bf16_t *v, const float2 *stats, const int *doc_next, float scale, int T,
                          int H, int Dqk, int Dv) {
  using S = DkvSmem<DQK, DV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t *sK = reinterpret_cast<bf16_t *>(smem_raw), *sV = sK + S::K, *sQ = sV + S::V, *sO = sQ + 2 * S::Q;
  float2 *sS = reinterpret_cast<float2 *>(sO + 2 * S::O);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int kb = gridDim.x - 1 - blockIdx.x;  // longest first (early keys see the most queries)
  const int h = blockIdx.y, b = blockIdx.z, j0 = kb * ROWS;
  const int *next = doc_next + (size_t)b * T;
  const int last_key = min(j0 + ROWS, T) - 1;
  const int q_end = next[last_key];  // queries [j0, q_end) see some key of the block
  const int mask_from = next[j0];     // query blocks reaching this need the document mask
  const int k_lo = j0 + warp * 16 + g, k_hi = k_lo + 8;
  const int end_lo = k_lo < T ? next[k_lo] : 0, end_hi = k_hi < T ? next[k_hi] : 0;  // keys seen by [k, end)
  const int ib_first = j0 / DKV_QUERIES, ib_last = (q_end - 1) / DKV_QUERIES;

  load_tile<ROWS, DQK>(sK, k, b, h, j0, T, H, Dqk);
  load_tile<ROWS, DV>(sV, v, b, h, j0, T, H, Dv);
  load_tile<DKV_QUERIES, DQK>(sQ, q, b, h, ib_first * DKV_QUERIES, T, H, Dqk);
  load_tile<DKV_QUERIES, DV>(sO, dout, b, h, ib_first * DKV_QUERIES, T, H, Dv);
  load_stats<DKV_QUERIES>(sS, stats, b, h, ib_first * DKV_QUERIES, T, H);
  cp_async_commit();

  float dka[DQK / 8][4], dva[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DQK / 8; n++) dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.0f;
#pragma unroll
  for (int n = 0; n < DV / 8; n++) dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.0f;
  const float sl2 = scale * LOG2E;

  for (int ib = ib_first; ib <= ib_last; ib++) {
    const int buf = (ib - ib_first) & 1, iq0 = ib * DKV_QUERIES;
    cp_async_wait<0>();
    __syncthreads();  // this tile has landed, and every warp is done with the other buffer
    if (ib < ib_last) {  // prefetch the next tile into the other buffer while this one is used
      load_tile<DKV_QUERIES, DQK>(sQ + (buf ^ 1) * S::Q, q, b, h, iq0 + DKV_QUERIES, T, H, Dqk);
      load_tile<DKV_QUERIES, DV>(sO + (buf ^ 1) * S::O, dout, b, h, iq0 + DKV_QUERIES, T, H, Dv);
      load_stats<DKV_QUERIES>(sS + (buf ^ 1) * DKV_QUERIES, stats, b, h, iq0 + DKV_QUERIES, T, H);
      cp_async_commit();
    }
    const bf16_t *tQ = sQ + buf * S::Q, *tO = sO + buf * S::O;
    const float2 *tS = sS + buf * DKV_QUERIES;
    // Skip a query block wholly before this warp's keys (causal).
    if (iq0 + DKV_QUERIES > j0 + warp * 16) {
      float s[DKV_QUERIES / 8][4];
#pragma unroll
      for (int n = 0; n < DKV_QUERIES / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DQK / 16; kk++) {
        uint32_t a[4];
        load_a(a, sK, S::SQ, warp * 16, kk * 16, lane);
#pragma unroll
        for (int n = 0; n < DKV_QUERIES / 16; n++) {
          uint32_t bf[4];
          load_b_nk(bf, tQ, S::SQ, n * 16, kk * 16, lane);
          mma16816(s[2 * n], a, bf[0], bf[1]);
          mma16816(s[2 * n + 1], a, bf[2], bf[3]);
        }
      }
      const bool masked = iq0 < j0 + ROWS || iq0 + DKV_QUERIES > mask_from;
#pragma unroll
      for (int n = 0; n < DKV_QUERIES / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          int c = n * 8 + 2 * tq + e, i = iq0 + c;
          float l2 = tS[c].x;
          float p_lo = fast_exp2(fmaf(s[n][e], sl2, -l2)), p_hi = fast_exp2(fmaf(s[n][2 + e], sl2, -l2));
          if (masked) {
            if (i < k_lo || i >= end_lo) p_lo = 0.0f;
            if (i < k_hi || i >= end_hi) p_hi = 0.0f;
          }
          s[n][e] = p_lo, s[n][2 + e] = p_hi;
        }
      // dV += P^T dO
#pragma unroll
      for (int kk = 0; kk < DKV_QUERIES / 16; kk++) {
        uint32_t pa[4];
        c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < DV / 16; n++) {
          uint32_t bf[4];
          load_b_kn(bf, tO, S::SV, n * 16, kk * 16, lane);
          mma16816(dva[2 * n], pa, bf[0], bf[1]);
          mma16816(dva[2 * n + 1], pa, bf[2], bf[3]);
        }
      }
      // dP^T = V dO^T
      float dp[DKV_QUERIES / 8][4];
#pragma unroll
      for (int n = 0; n < DKV_QUERIES / 8; n++) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DV / 16; kk++) {
        uint32_t a[4];
        load_a(a, sV, S::SV, warp * 16, kk * 16, lane);
#pragma unroll
        for (int n = 0; n < DKV_QUERIES / 16; n++) {
          uint32_t bf[4];
          load_b_nk(bf, tO, S::SV, n * 16, kk * 16, lane);
          mma16816(dp[2 * n], a, bf[0], bf[1]);
          mma16816(dp[2 * n + 1], a, bf[2], bf[3]);
        }
      }
      // dS^T = P^T (dP^T - D), then dK += dS^T Q
#pragma unroll
      for (int n = 0; n < DKV_QUERIES / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          float d = tS[n * 8 + 2 * tq + e].y;
          s[n][e] *= dp[n][e] - d;
          s[n][2 + e] *= dp[n][2 + e] - d;
        }
#pragma unroll
      for (int kk = 0; kk < DKV_QUERIES / 16; kk++) {
        uint32_t da[4];
        c_to_a(da, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < DQK / 16; n++) {
          uint32_t bf[4];
          load_b_kn(bf, tQ, S::SQ, n * 16, kk * 16, lane);
          mma16816(dka[2 * n], da, bf[0], bf[1]);
          mma16816(dka[2 * n + 1], da, bf[2], bf[3]);
        }
      }
    }
  }

  const size_t ldk = (size_t)H * Dqk, ldv = (size_t)H * Dv;
#pragma unroll
  for (int n = 0; n < DQK / 8; n++) {
    int c = n * 8 + 2 * tq;
    if (c < Dqk) {
      if (k_lo < T)
        *reinterpret_cast<__nv_bfloat162 *>(dk + ((size_t)b * T + k_lo) * ldk + (size_t)h * Dqk + c) =
            __floats2bfloat162_rn(dka[n][0] * scale, dka[n][1] * scale);
      if (k_hi < T)
        *reinterpret_cast<__nv_bfloat162 *>(dk + ((size_t)b * T + k_hi) * ldk + (size_t)h * Dqk + c) =
            __floats2bfloat162_rn(dka[n][2] * scale, dka[n][3] * scale);
    }
  }
#pragma unroll
  for (int n = 0; n < DV / 8; n++) {
    int c = n * 8 + 2 * tq;
    if (c < Dv) {
      if (k_lo < T)
        *reinterpret_cast<__nv_bfloat162 *>(dv + ((size_t)b * T + k_lo) * ldv + (size_t)h * Dv + c) =
            __floats2bfloat162_rn(dva[n][0], dva[n][1]);
      if (k_hi < T)
        *reinterpret_cast<__nv_bfloat162 *>(dv + ((size_t)b * T + k_hi) * ldv + (size_t)h * Dv + c) =
            __floats2bfloat162_rn(dva[n][2], dva[n][3]);
    }
  }
}

// ---- backward, dq: one block per (query block of ROWS, head, row b); each warp holds 16 queries' dq
// and walks the key blocks they can see: S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - D),
// dQ += dS K. ----
template <int DQK, int DV>
struct DqSmem {
  static constexpr int SQ = DQK + 8, SV = DV + 8;
  static constexpr int Q = ROWS * SQ, O = ROWS * SV, K = DQ_KEYS * SQ, V = DQ_KEYS * SV;
  static constexpr size_t bytes = (size_t)(Q + O + 2 * K + 2 * V) * sizeof(bf16_t);
};

template <int DQK, int DV>
__global__ void __launch_bounds__(THREADS, 2)
    attention_dq_kernel(bf16_t *dq, const bf16_t *dout, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                        const float2 *stats, const int *doc_begin, float scale, int T, int H, int Dqk,
                        int Dv) {
  using S = DqSmem<DQK, DV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t *sQ = reinterpret_cast<bf16_t *>(smem_raw), *sO = sQ + S::Q, *sK = sO + S::O, *sV = sK + 2 * S::K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int qb = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, i0 = qb * ROWS;
  const int *begin = doc_begin + (size_t)b * T;
  const int last_row = min(i0 + ROWS, T) - 1;
  const int j_first = begin[i0] / DQ_KEYS, j_last = last_row / DQ_KEYS;
  const int mask_before = begin[last_row];
  const int r_lo = i0 + warp * 16 + g, r_hi = r_lo + 8;
  const int first_lo = begin[min(r_lo, T - 1)], first_hi = begin[min(r_hi, T - 1)];
  const float sl2 = scale * LOG2E;
  const float2 stat_lo = r_lo < T ? stats[((size_t)b * H + h) * T + r_lo] : make_float2(0.0f, 0.0f);
  const float2 stat_hi = r_hi < T ? stats[((size_t)b * H + h) * T + r_hi] : make_float2(0.0f, 0.0f);
  const float l2_lo = stat_lo.x, l2_hi = stat_hi.x, d_lo = stat_lo.y, d_hi = stat_hi.y;

  load_tile<ROWS, DQK>(sQ, q, b, h, i0, T, H, Dqk);
  load_tile<ROWS, DV>(sO, dout, b, h, i0, T, H, Dv);
  load_tile<DQ_KEYS, DQK>(sK, k, b, h, j_first * DQ_KEYS, T, H, Dqk);
  load_tile<DQ_KEYS, DV>(sV, v, b, h, j_first * DQ_KEYS, T, H, Dv);
  cp_async_commit();

  float dqa[DQK / 8][4];
#pragma unroll
  for (int n = 0; n < DQK / 8; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.0f;

  for (int jb = j_first; jb <= j_last; jb++) {
    const int buf = (jb - j_first) & 1, j0 = jb * DQ_KEYS;
    cp_async_wait<0>();
    __syncthreads();  // this tile has landed, and every warp is done with the other buffer
    if (jb < j_last) {  // prefetch the next tile into the other buffer while this one is used
      load_tile<DQ_KEYS, DQK>(sK + (buf ^ 1) * S::K, k, b, h, j0 + DQ_KEYS, T, H, Dqk);
      load_tile<DQ_KEYS, DV>(sV + (buf ^ 1) * S::V, v, b, h, j0 + DQ_KEYS, T, H, Dv);
      cp_async_commit();
    }
    const bf16_t *tK = sK + buf * S::K, *tV = sV + buf * S::V;
    if (j0 <= i0 + warp * 16 + 15) {  // some key of the step is causal for some row of this warp
      float s[DQ_KEYS / 8][4], dp[DQ_KEYS / 8][4];
#pragma unroll
      for (int n = 0; n < DQ_KEYS / 8; n++)
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DQK / 16; kk++) {
        uint32_t a[4];
        load_a(a, sQ, S::SQ, warp * 16, kk * 16, lane);
#pragma unroll
        for (int n = 0; n < DQ_KEYS / 16; n++) {
          uint32_t bf[4];
          load_b_nk(bf, tK, S::SQ, n * 16, kk * 16, lane);
          mma16816(s[2 * n], a, bf[0], bf[1]);
          mma16816(s[2 * n + 1], a, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < DV / 16; kk++) {
        uint32_t a[4];
        load_a(a, sO, S::SV, warp * 16, kk * 16, lane);
#pragma unroll
        for (int n = 0; n < DQ_KEYS / 16; n++) {
          uint32_t bf[4];
          load_b_nk(bf, tV, S::SV, n * 16, kk * 16, lane);
          mma16816(dp[2 * n], a, bf[0], bf[1]);
          mma16816(dp[2 * n + 1], a, bf[2], bf[3]);
        }
      }
      const bool masked = j0 + DQ_KEYS > i0 + warp * 16 || j0 < mask_before;
#pragma unroll
      for (int n = 0; n < DQ_KEYS / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          int j = j0 + n * 8 + 2 * tq + e;
          float p_lo = fast_exp2(fmaf(s[n][e], sl2, -l2_lo)), p_hi = fast_exp2(fmaf(s[n][2 + e], sl2, -l2_hi));
          if (masked) {
            if (j < first_lo || j > r_lo) p_lo = 0.0f;
            if (j < first_hi || j > r_hi) p_hi = 0.0f;
          }
          s[n][e] = p_lo * (dp[n][e] - d_lo);
          s[n][2 + e] = p_hi * (dp[n][2 + e] - d_hi);
        }
#pragma unroll
      for (int kk = 0; kk < DQ_KEYS / 16; kk++) {
        uint32_t da[4];
        c_to_a(da, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < DQK / 16; n++) {
          uint32_t bf[4];
          load_b_kn(bf, tK, S::SQ, n * 16, kk * 16, lane);
          mma16816(dqa[2 * n], da, bf[0], bf[1]);
          mma16816(dqa[2 * n + 1], da, bf[2], bf[3]);
        }
      }
    }
  }

  const size_t ld = (size_t)H * Dqk;
#pragma unroll
  for (int n = 0; n < DQK / 8; n++) {
    int c = n * 8 + 2 * tq;
    if (c < Dqk) {
      if (r_lo < T)
        *reinterpret_cast<__nv_bfloat162 *>(dq + ((size_t)b * T + r_lo) * ld + (size_t)h * Dqk + c) =
            __floats2bfloat162_rn(dqa[n][0] * scale, dqa[n][1] * scale);
      if (r_hi < T)
        *reinterpret_cast<__nv_bfloat162 *>(dq + ((size_t)b * T + r_hi) * ld + (size_t)h * Dqk + c) =
            __floats2bfloat162_rn(dqa[n][2] * scale, dqa[n][3] * scale);
    }
  }
}

// ---- host side ----
struct Bounds {
  int *begin, *next;
  float2 *stats;  // (B, H, T): lse log2(e), D
};
Bounds prepare(const unsigned char *doc_start, int B, int T, int H, bool with_stats) {
  const size_t N = (size_t)B * T;
  size_t bytes = 2 * N * sizeof(int) + (with_stats ? N * H * sizeof(float2) : 0);
  char *scratch = (char *)device_scratch(2, bytes);
  Bounds r{(int *)scratch, (int *)scratch + N, with_stats ? (float2 *)(scratch + 2 * N * sizeof(int)) : nullptr};
  doc_bounds_kernel<<<B, BOUNDS_THREADS, 0, device_stream()>>>(r.begin, r.next, doc_start, T);
  CUDA_CHECK_LAUNCH();
  return r;
}

template <typename Kernel>
void raise_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <int DQK, int DV>
void forward(bf16_t *out, float *lse, float *max_logit, const bf16_t *q, const bf16_t *k, const bf16_t *v,
             const int *begin, float scale, int B, int T, int H, int Dqk, int Dv) {
  const size_t bytes = FwdSmem<DQK, DV>::bytes;
  static bool ready = false;
  if (!ready) raise_smem(attention_forward_kernel<DQK, DV>, bytes), ready = true;
  dim3 grid((T + ROWS - 1) / ROWS, H, B);
  attention_forward_kernel<DQK, DV><<<grid, THREADS, bytes, device_stream()>>>(out, lse, max_logit, q, k, v, begin,
                                                                               scale, T, H, Dqk, Dv);
  CUDA_CHECK_LAUNCH();
}

template <int DQK, int DV>
void backward(bf16_t *dq, bf16_t *dk, bf16_t *dv, const bf16_t *dout, const bf16_t *q, const bf16_t *k,
              const bf16_t *v, const Bounds &bounds, float scale, int B, int T, int H, int Dqk,
              int Dv) {
  const size_t kv_bytes = DkvSmem<DQK, DV>::bytes, q_bytes = DqSmem<DQK, DV>::bytes;
  static bool ready = false;
  if (!ready) {
    raise_smem(attention_dkdv_kernel<DQK, DV>, kv_bytes);
    raise_smem(attention_dq_kernel<DQK, DV>, q_bytes);
    ready = true;
  }
  dim3 grid((T + ROWS - 1) / ROWS, H, B);
  attention_dkdv_kernel<DQK, DV><<<grid, THREADS, kv_bytes, device_stream()>>>(
      dk, dv, dout, q, k, v, bounds.stats, bounds.next, scale, T, H, Dqk, Dv);
  CUDA_CHECK_LAUNCH();
  attention_dq_kernel<DQK, DV><<<grid, THREADS, q_bytes, device_stream()>>>(dq, dout, q, k, v, bounds.stats,
                                                                            bounds.begin, scale, T, H, Dqk, Dv);
  CUDA_CHECK_LAUNCH();
}

void check_arguments(const void *const *pointers, int count, float scale, int T, int H, int Dqk, int Dv) {
  CHECK(Dqk > 0 && Dv > 0 && Dqk % 16 == 0 && Dv % 16 == 0 && Dqk <= 256 && Dv <= 256,
        "attention_cuda: Dqk=%d and Dv=%d must be multiples of 16 up to 256", Dqk, Dv);
  CHECK(scale > 0.0f, "attention_cuda: scale %g must be positive", scale);
  CHECK(H > 0 && T > 0 && (size_t)T * H < (1u << 31), "attention_cuda: T=%d H=%d", T, H);
  for (int i = 0; i < count; i++)
    CHECK(((uintptr_t)pointers[i] & 15) == 0, "attention_cuda: tensor %d is not 16-byte aligned", i);
}

}  // namespace

// Dispatch to the smallest instantiation that holds the widths: (192, 128) is MLA's.
#define ATTENTION_DISPATCH(CALL)                                   \
  do {                                                             \
    if (Dqk <= 64 && Dv <= 64) CALL(64, 64);                       \
    else if (Dqk <= 128 && Dv <= 128) CALL(128, 128);              \
    else if (Dqk <= 192 && Dv <= 128) CALL(192, 128);              \
    else CALL(256, 256);                                           \
  } while (0)

extern "C" void attention_forward_cuda(bf16 *out, float *lse, float *max_logit, const bf16 *q, const bf16 *k,
                                       const bf16 *v, const unsigned char *doc_start, float scale, int B, int T,
                                       int H, int Dqk, int Dv) {
  if (B == 0 || T == 0) return;
  const void *pointers[] = {out, q, k, v};
  check_arguments(pointers, 4, scale, T, H, Dqk, Dv);
  Bounds bounds = prepare(doc_start, B, T, H, false);
#define FORWARD(A, C)                                                                                              \
  forward<A, C>((bf16_t *)out, lse, max_logit, (const bf16_t *)q, (const bf16_t *)k, (const bf16_t *)v, bounds.begin, \
                scale, B, T, H, Dqk, Dv)
  ATTENTION_DISPATCH(FORWARD);
#undef FORWARD
}

extern "C" void attention_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const bf16 *out, const float *lse,
                                        const unsigned char *doc_start, float scale, int B, int T, int H, int Dqk,
                                        int Dv) {
  if (B == 0 || T == 0) return;
  const void *pointers[] = {dq, dk, dv, dout, q, k, v, out};
  check_arguments(pointers, 8, scale, T, H, Dqk, Dv);
  Bounds bounds = prepare(doc_start, B, T, H, true);
  const size_t rows = (size_t)B * T * H;
  row_stats_kernel<<<ceil_div(rows * 32, 256), 256, 0, device_stream()>>>(bounds.stats, (const bf16_t *)dout,
                                                                           (const bf16_t *)out, lse, rows, T, H, Dv);
  CUDA_CHECK_LAUNCH();
#define BACKWARD(A, C)                                                                                             \
  backward<A, C>((bf16_t *)dq, (bf16_t *)dk, (bf16_t *)dv, (const bf16_t *)dout, (const bf16_t *)q, (const bf16_t *)k, \
                 (const bf16_t *)v, bounds, scale, B, T, H, Dqk, Dv)
  ATTENTION_DISPATCH(BACKWARD);
#undef BACKWARD
}
