// KDA on the GPU in its chunkwise form (kernels/kda_chunk.c is the blueprint; see kda.h for the contract).
// Fixed chunks of C = 64 tokens; a document start inside a chunk is handled by masks instead of by cutting
// the chunk. With seg_i = the number of document starts (t > 0) at chunk rows <= i and gc the cumulative
// log decay over the whole chunk (g = 0 on rows past T, so gc stays monotone):
//   pairwise terms KK[i][j], Aqk[i][j] are zero unless seg_i == seg_j,
//   the entering state reaches row i only if seg_i == 0:        eg_i = seg_i == 0 ? exp(gc_i) : 0,
//   it survives the chunk only if seg_last == 0:                el = seg_last == 0 ? exp(gc_last) : 0,
//   row i feeds the leaving state only if seg_i == seg_last:    ekl_i = exp(gc_last - gc_i) or 0.
// These masked formulas are exactly the document-respecting function, so their derivatives are the
// exact gradients. Every exponential taken is of a difference gc_i - gc_j with j <= i (or of gc itself),
// so all are <= 1 and nothing overflows, whatever the decay.
//
// Forward:  intra kernel (per chunk, parallel): KK, Aqk, the UT transform by forward substitution
//           (W | U) = (I + L)^-1 diag(beta) (eg K | V), qg = eg qs, kl = ekl k, el -> scratch.
//           state kernel (per batch row and head, sequential over chunks, tensor cores):
//           Vp = U - W S; O = qg S + Aqk Vp; S <- diag(el) S + kl^T Vp.
// Backward: the same two (the state kernel saving S entering each chunk and Vp), a reverse state kernel
//           (dVp = Aqk^T dO + kl dS'; dS <- qg^T dO + diag(el) dS' - W^T dVp, saving dS' and dVp), then
//           two parallel per-chunk kernels: the WY / UT backward (dqg, dkl, dX, back substitution, dL, dAqk,
//           dv, dbeta) and the pairwise backward with the reverse cumulative sum of the gate gradient.
//
// Design note (what is fused, where things live, where fp32 is needed, what limits it):
// - Five kernels, per chunk or per (b, h); nothing between them but device_scratch slot 2 (fp32, per chunk:
//   W U QG KL (64 x 128), Aqk KK (64 x 64), el; the backward adds S0 and dS' (128 x 128), Vp and dVp,
//   six partial gradients and dL, dAqk). The forward's output is fused into its state pass.
// - State passes: one block of 8 warps per (b, h) at V = 128 (1 warp per 16 columns otherwise); each warp
//   holds S^T (or dS^T) for its 16 state columns in fp32 registers (64 per thread) for the whole sequence,
//   and every product is mma.sync m16n8k8 tf32 with fp32 accumulation, the accumulator tiles feeding the
//   next product as A fragments without a trip through shared memory. W, QG, KL, Aqk (stored tf32-rounded
//   by the intra kernel) stream through shared memory by cp.async, one operand pair loading while the
//   other is used. dO goes from global memory straight into A fragments.
// - Per-chunk kernels: q, k, gc (fp32, padded rows) and the 64 x 64 KK / Aqk in shared memory; the
//   off-diagonal 16-row blocks of KK, Aqk and the backward's chunk products on tensor cores (wmma tf32,
//   through gemm_nt); diagonal 16 x 16 blocks pair by pair in fp32 on CUDA cores (their exp(gc_i - gc_j)
//   cannot be factored without overflow when decays are strong); the UT forward / back substitution one
//   column per thread in registers.
// - fp32 is required for: the recurrent state and its gradient (they accumulate over the whole sequence),
//   the cumulative gates and every exponential of them, the substitution (the inverse of I + L amplifies
//   rounding), and all accumulators. tf32 inputs (10-bit mantissa) are used only as tensor-core operands;
//   bf16 only for q, k, v, out, dout and the bf16 gradients, as the contract says.
// - What limits it now (H100, 8 x 4096 x 16 x 128: fwd 6.3 ms, fwd+bwd 22.8 ms; fla's Triton chunk_kda beside it
//   on the same GPU 2.5 / 12.9 ms): the per-chunk kernels. By ncu (2026-12-06, at 2 x 4096, times 4): intra
//   5.7 ms (forward only: its results are kept in `saved` for the backward), WY backward 10.6 ms (225
//   registers, 0.64 instructions a cycle), pairwise backward 4.4 ms (1.97 a cycle), against 0.6 ms (forward)
//   and 1.3 ms (backward) for the state passes. Each per-chunk kernel takes 150-180 KB of shared memory, so one
//   block of 8 warps per SM (12.5% occupancy), and waits on its own latencies. Prefetching two 32-wide slices
//   ahead in gemm_nt instead of one made it slower (23.4 ms). The next steps: smaller shared footprints (bf16 q,
//   k, v; Aqk straight to global) for two blocks per SM; one pass over S0 and dS' for the WY backward's three
//   state products; the pairwise backward's cross-sub-chunk pairs as anchored tensor-core products like the
//   forward's; and fewer fp32 scratch bytes (S0 and dS' are 512 MB each at this shape).
// Sums are in a fixed order (deterministic).
#include "kernels/cuda_common.cuh"
#include "kernels/kda.h"

#include <mma.h>

#define CH 64          // chunk length
#define NT 256         // threads per block

#define AT(b, t, h, X) ((((size_t)(b) * T + (t)) * H + (h)) * (X))

// Per-chunk scratch, chunk index ch = (b * H + h) * NC + c.
struct Scratch {
  float *W, *U, *QG, *KL, *EL, *AQ, *KK;  // (64,K) (64,V) (64,K) (64,K) (K) (64,64) (64,64)
  float *VP, *S0, *DVP, *DS;              // (64,V) (K,V) (64,V) (K,V)
  float *PDQ, *PDK, *PDG, *PDK2, *PDG2, *PDG3, *DL, *DA;  // (64,K) x6, (64,64) x2: partial gradients
};

static __device__ __forceinline__ float4 tf32x4(float4 x) {
  using namespace nvcuda;
  return make_float4(wmma::__float_to_tf32(x.x), wmma::__float_to_tf32(x.y), wmma::__float_to_tf32(x.z),
                     wmma::__float_to_tf32(x.w));
}
static __device__ __forceinline__ float4 ldg4(const float *p) { return __ldg((const float4 *)p); }
static __device__ __forceinline__ float4 lds4(const float *p) { return make_float4(p[0], p[1], p[2], p[3]); }
// Four bf16 (8-byte aligned) as floats.
static __device__ __forceinline__ float4 ldg4(const bf16_t *p) {
  const uint2 u = __ldg((const uint2 *)p);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}

// C (M, N) = A (M, KC) B (N, KC)^T for the per-chunk kernels on the tensor cores (tf32 inputs, fp32
// accumulation), staged through shared memory `tile` (TILE_FLOATS, 128-byte aligned) 32 steps of KC at a
// time; la(m, k) and lb(n, k) return the four values at k..k+3 (k a multiple of 4; KC a multiple of 16). Each
// 64 x 64 output tile goes through shared memory to epi(m, n, value), thread (tx, ty) = (tid % 16, tid / 16)
// getting rows ty + 16 r and columns tx + 16 s, so two products of the same shape give every element to the
// same thread (epilogues may read-modify-write what they own). Synchronizes the block: every thread must
// call it.
#define TLD 36
#define CLD 68
#define TILE_FLOATS (2 * 64 * TLD + 64 * CLD)
template <class LA, class LB, class FE>
static __device__ __forceinline__ void gemm_nt(int M, int N, int KC, float *tile, LA la, LB lb, FE epi) {
  using namespace nvcuda;
  float *As = tile, *Bs = tile + 64 * TLD, *Cs = Bs + 64 * TLD;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4, warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  for (int m0 = 0; m0 < M; m0 += 64)
    for (int n0 = 0; n0 < N; n0 += 64) {
      const int rows = min(64, M - m0), cols = min(64, N - n0);
      wmma::fragment<wmma::accumulator, 16, 16, 8, float> c0, c1;
      wmma::fill_fragment(c0, 0.0f);
      wmma::fill_fragment(c1, 0.0f);
      // The next 32 steps of KC are loaded into registers while the tensor cores work on these.
      float4 av[64 * 8 / NT], bv[64 * 8 / NT];
      auto fetch = [&](int k0) {
        const int kw = min(32, KC - k0);
        const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int u = 0; u < 64 * 8 / NT; u++) {
          const int e = threadIdx.x + u * NT, r = e >> 3, kk = (e & 7) * 4;
          av[u] = r < rows && kk < kw ? la(m0 + r, k0 + kk) : zero;
          bv[u] = r < cols && kk < kw ? lb(n0 + r, k0 + kk) : zero;
        }
      };
      fetch(0);
      for (int k0 = 0; k0 < KC; k0 += 32) {
        __syncthreads();
#pragma unroll
        for (int u = 0; u < 64 * 8 / NT; u++) {
          const int e = threadIdx.x + u * NT, r = e >> 3, kk = (e & 7) * 4;
          *(float4 *)(As + r * TLD + kk) = tf32x4(av[u]);
          *(float4 *)(Bs + r * TLD + kk) = tf32x4(bv[u]);
        }
        __syncthreads();
        if (k0 + 32 < KC) fetch(k0 + 32);
        if (16 * wm < rows && 32 * wn < cols) {
#pragma unroll
          for (int ks = 0; ks < 32; ks += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb0, fb1;
            wmma::load_matrix_sync(fa, As + 16 * wm * TLD + ks, TLD);
            wmma::load_matrix_sync(fb0, Bs + 32 * wn * TLD + ks, TLD);
            wmma::load_matrix_sync(fb1, Bs + (32 * wn + 16) * TLD + ks, TLD);
            wmma::mma_sync(c0, fa, fb0, c0);
            wmma::mma_sync(c1, fa, fb1, c1);
          }
        }
      }
      wmma::store_matrix_sync(Cs + 16 * wm * CLD + 32 * wn, c0, CLD, wmma::mem_row_major);
      wmma::store_matrix_sync(Cs + 16 * wm * CLD + 32 * wn + 16, c1, CLD, wmma::mem_row_major);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < 4; r++)
#pragma unroll
        for (int q = 0; q < 4; q++)
          if (ty + 16 * r < rows && tx + 16 * q < cols)
            epi(m0 + ty + 16 * r, n0 + tx + 16 * q, Cs[(ty + 16 * r) * CLD + tx + 16 * q]);
    }
}

// Tensor-core helpers for the sequential state kernels: mma.sync m16n8k8 with tf32 inputs and fp32
// accumulation. Fragments (g = lane / 4, t = lane % 4): A (16 x 8) a0 (g, t), a1 (g + 8, t), a2 (g, t + 4),
// a3 (g + 8, t + 4); B (8 x 8) b0 (t, g), b1 (t + 4, g); C (16 x 8) c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t),
// c3 (g + 8, 2t + 1). The k order inside an 8-step is free as long as A and B agree: these kernels let
// A's slot t hold k = 2t and slot t + 4 hold k = 2t + 1, so that an accumulator tile (C) is directly the A
// fragment (c0, c2, c1, c3) of the next product, and B's b0, b1 are rows 2t, 2t + 1.
static __device__ __forceinline__ unsigned tf32_bits(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// x rounded to the nearest tf32 (kept as a float): what the per-chunk kernels store for the state kernels'
// B operands, which then go to the tensor cores as they are.
static __device__ __forceinline__ float round_tf32(float x) { return __uint_as_float(tf32_bits(x)); }
static __device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], float b0, float b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}
// An accumulator tile as the A fragment of the next product (rounded to tf32; negated if neg).
static __device__ __forceinline__ void acc_to_a(unsigned (&a)[4], const float (&c)[4], bool neg = false) {
  const unsigned s = neg ? 0x80000000u : 0u;
  a[0] = tf32_bits(c[0]) ^ s, a[1] = tf32_bits(c[2]) ^ s, a[2] = tf32_bits(c[1]) ^ s, a[3] = tf32_bits(c[3]) ^ s;
}
static __device__ __forceinline__ void cp_async16(void *dst, const void *src) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
static __device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// rows x cols floats (cols a multiple of 4, rows contiguous in global memory) into shared memory with leading
// dimension ld (a multiple of 4), 16 bytes a copy, by the block's threads.
static __device__ __forceinline__ void tile_async(float *dst, int ld, const float *src, int rows, int cols) {
  const int per_row = cols / 4;
  for (int e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
    const int r = e / per_row, c4 = (e % per_row) * 4;
    cp_async16(dst + r * ld + c4, src + (size_t)r * cols + c4);
  }
}

// The chunk's gates cumulated over its 64 rows (rows past T have g = 0), beta (0 past T) and seg. The
// loads are issued together before any use (one memory latency, not 64).
static __device__ void load_gates(float *gc, int ldg, float *beta, int *seg, const float *g, const float *beta_in,
                                  const unsigned char *doc_start, int b, int h, int t0, int T, int H, int K) {
  const int tid = threadIdx.x;
  if (tid < K) {
    float gv[CH];
#pragma unroll
    for (int i = 0; i < CH; i++) gv[i] = t0 + i < T ? __ldg(g + AT(b, t0 + i, h, K) + tid) : 0.0f;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < CH; i++) {
      acc += gv[i];
      gc[i * ldg + tid] = acc;
    }
  }
  if (tid < CH) beta[tid] = t0 + tid < T ? __ldg(beta_in + ((size_t)b * T + t0 + tid) * H + h) : 0.0f;
  if (tid >= NT - 32) {  // the last warp: document starts by ballot, seg by population counts
    const int lane = tid & 31;
    auto starts = [&](int i) {
      const int t = t0 + i;
      return doc_start && t < T && t > 0 && __ldg(doc_start + (size_t)b * T + t);
    };
    const unsigned lo = __ballot_sync(0xffffffffu, starts(lane)), hi = __ballot_sync(0xffffffffu, starts(lane + 32));
    const unsigned upto = (2u << lane) - 1u;  // bits 0..lane
    seg[lane] = __popc(lo & upto);
    seg[lane + 32] = __popc(lo) + __popc(hi & upto);
  }
}

// Rows of a (64, K) bf16 tile into fp32 shared memory (leading dimension ld), times mul, zero past T:
// 16-byte loads, all of a thread's (at most 4, K <= 128) in flight together.
static __device__ void load_rows(float *dst, int ld, const bf16_t *src, float mul, int b, int h, int t0, int T, int H,
                                 int K) {
  const int per_row = K / 8, n = CH * per_row;
  uint4 x[4];
#pragma unroll
  for (int u = 0; u < 4; u++) {
    const int e = threadIdx.x + u * NT, i = e / per_row;
    x[u] = make_uint4(0, 0, 0, 0);
    if (e < n && t0 + i < T) x[u] = __ldg((const uint4 *)(src + AT(b, t0 + i, h, K) + (e % per_row) * 8));
  }
#pragma unroll
  for (int u = 0; u < 4; u++) {
    const int e = threadIdx.x + u * NT, i = e / per_row;
    if (e >= n) break;
    float *d = dst + i * ld + (e % per_row) * 8;
    const unsigned w[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
    for (int p = 0; p < 4; p++) {
      d[2 * p] = mul * __uint_as_float(w[p] << 16);
      d[2 * p + 1] = mul * __uint_as_float(w[p] & 0xffff0000u);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Intra-chunk forward: one block per chunk.
static __global__ void __launch_bounds__(NT) kda_intra_kernel(Scratch sc, const bf16_t *q, const bf16_t *k,
                                                              const bf16_t *v, const float *g, const float *beta_in,
                                                              const unsigned char *doc_start, float scale, int T,
                                                              int H, int K, int V, int NC) {
  extern __shared__ __align__(128) float smem[];
  const int ld = K + 1;
  float *tile = smem, *qs = tile + TILE_FLOATS, *ks = qs + CH * ld, *gc = ks + CH * ld, *kks = gc + CH * ld;
  float *aqs = kks + CH * (CH + 1), *beta = aqs + CH * (CH + 1);
  int *seg = (int *)(beta + CH);
  const int ch = blockIdx.x, c = ch % NC, bh = ch / NC, b = bh / H, h = bh % H, t0 = c * CH, tid = threadIdx.x;
  load_rows(qs, ld, q, scale, b, h, t0, T, H, K);
  load_rows(ks, ld, k, 1.0f, b, h, t0, T, H, K);
  load_gates(gc, ld, beta, seg, g, beta_in, doc_start, b, h, t0, T, H, K);
  __syncthreads();
  // Pairwise products inside the 16-row sub-chunks, pair by pair: thread per (i, j), 16 consecutive j per
  // half-warp (conflict-free with the padded rows). Everything else is zeroed here.
  for (int e = tid; e < CH * CH; e += NT) {
    const int i = e >> 6, j = e & 63;
    float kk = 0.0f, qk = 0.0f;
    if ((i >> 4) == (j >> 4) && j <= i && seg[i] == seg[j]) {
      const float *ki = ks + i * ld, *kj = ks + j * ld, *qi = qs + i * ld, *gi = gc + i * ld, *gj = gc + j * ld;
#pragma unroll 8
      for (int a = 0; a < K; a++) {
        const float x = kj[a] * __expf(gi[a] - gj[a]);
        kk = fmaf(ki[a], x, kk);
        qk = fmaf(qi[a], x, qk);
      }
    }
    aqs[e] = qk;
    kks[e] = j < i ? kk : 0.0f;
  }
  // Sub-chunk I against all earlier rows j < I0, anchored at a = gc(I0): one product of the rescaled rows
  // [k_i exp(gc_i - a); qs_i exp(gc_i - a)] (32, K) and k_j exp(a - gc_j) (I0, K), every factor <= 1.
  for (int I0 = 16; I0 < CH; I0 += 16) {
    const float *an = gc + I0 * ld;
    gemm_nt(
        32, I0, K, tile,
        [&](int r, int a) {
          const int i = I0 + (r & 15);
          const float *x = (r < 16 ? ks : qs) + i * ld + a, *gi = gc + i * ld + a;
          return make_float4(x[0] * __expf(gi[0] - an[a]), x[1] * __expf(gi[1] - an[a + 1]),
                             x[2] * __expf(gi[2] - an[a + 2]), x[3] * __expf(gi[3] - an[a + 3]));
        },
        [&](int j, int a) {
          const float *x = ks + j * ld + a, *gj = gc + j * ld + a;
          return make_float4(x[0] * __expf(an[a] - gj[0]), x[1] * __expf(an[a + 1] - gj[1]),
                             x[2] * __expf(an[a + 2] - gj[2]), x[3] * __expf(an[a + 3] - gj[3]));
        },
        [&](int r, int j, float x) {
          const int i = I0 + (r & 15);
          const float v = seg[i] == seg[j] ? x : 0.0f;
          (r < 16 ? kks : aqs)[i * CH + j] = v;
        });
  }
  __syncthreads();
  float *AQ = sc.AQ + (size_t)ch * CH * CH, *KKg = sc.KK + (size_t)ch * CH * CH;
  for (int e = tid; e < CH * CH; e += NT) {
    AQ[e] = round_tf32(aqs[e]);
    KKg[e] = kks[e];
  }
  // qg, kl, el.
  float *QG = sc.QG + (size_t)ch * CH * K, *KL = sc.KL + (size_t)ch * CH * K;
  const int last = seg[CH - 1];
  for (int e = tid; e < CH * K; e += NT) {
    const int i = e / K, a = e % K;
    const float gi = gc[i * ld + a], gl = gc[(CH - 1) * ld + a];
    QG[e] = round_tf32(seg[i] == 0 ? __expf(gi) * qs[i * ld + a] : 0.0f);
    KL[e] = round_tf32(seg[i] == last ? __expf(gl - gi) * ks[i * ld + a] : 0.0f);
  }
  if (tid < K) sc.EL[(size_t)ch * K + tid] = last == 0 ? __expf(gc[(CH - 1) * ld + tid]) : 0.0f;
  float *vs = tile;  // (64, V): free since the last product
  load_rows(vs, V, v, 1.0f, b, h, t0, T, H, V);
  __syncthreads();
  // UT transform by forward substitution, one column of [eg K | V] per thread, in registers.
  if (tid < K + V) {
    float x[CH];
#pragma unroll
    for (int i = 0; i < CH; i++) {
      float rhs;
      if (tid < K) rhs = seg[i] == 0 ? __expf(gc[i * ld + tid]) * ks[i * ld + tid] : 0.0f;
      else rhs = vs[i * V + tid - K];
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < i; j++) s[j & 3] = fmaf(kks[i * CH + j], x[j], s[j & 3]);
      x[i] = beta[i] * (rhs - ((s[0] + s[1]) + (s[2] + s[3])));
    }
    if (tid < K) {
      float *W = sc.W + (size_t)ch * CH * K + tid;
#pragma unroll
      for (int i = 0; i < CH; i++) W[i * K] = round_tf32(x[i]);
    } else {
      float *U = sc.U + (size_t)ch * CH * V + tid - K;
#pragma unroll
      for (int i = 0; i < CH; i++) U[i * V] = x[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward state pass on the tensor cores: one block per (b, h, slice of 16 NW state columns), warp w owning
// columns v0 = col0 + 16 w .. v0 + 15, chunks in order. The warp keeps S^T (its 16 columns x K) in
// registers as K / 8 accumulator tiles; per chunk (all products tf32 in, fp32 accumulated):
//   Vp^T = U^T - S^T W^T                     (16 x 64; S^T's tiles are the A fragments)
//   O^T  = S^T QG^T + Vp^T Aqk^T             (16 x 64; only with out)
//   S^T  = S^T diag(el) + Vp^T KL            (16 x K; Vp^T's tiles are the A fragments)
// W, QG, KL, Aqk (tf32-rounded by the intra kernel) come into shared memory by cp.async, staggered: W and
// QG of the next chunk load while this chunk's Aqk and KL products run, and the other way round. The
// padded leading dimensions make every fragment read conflict-free. Writes the output (if out), the
// final state (if final_state), and with save the state entering each chunk (S0) and Vp for the backward.
template <int NW>
static __global__ void __launch_bounds__(32 * NW) kda_state_kernel(bf16_t *out, float *final_state, Scratch sc,
                                                                   bool save, const float *initial_state, int T,
                                                                   int H, int K, int V, int NC) {
  extern __shared__ __align__(128) float smem[];
  const int ldw = K + 8, ldk = K + 4, lda = CH + 8, KT = K / 8;
  float *Ws = smem, *QGs = Ws + CH * ldw, *KLs = QGs + CH * ldw, *AQs = KLs + CH * ldk, *els = AQs + CH * lda;
  const int slices = V / (16 * NW), slice = blockIdx.x % slices, bh = blockIdx.x / slices, b = bh / H, h = bh % H;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, v0 = slice * 16 * NW + 16 * (threadIdx.x >> 5);
  const bool with_out = out != NULL;
  float S[16][4];  // S^T tile j: columns a = 8 j .. 8 j + 7 of the state's rows
#pragma unroll
  for (int j = 0; j < 16; j++)
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const int a = 8 * j + 2 * t + (r & 1), v = v0 + g + 8 * (r >> 1);
      S[j][r] = j < KT && initial_state ? initial_state[((size_t)bh * K + a) * V + v] : 0.0f;
    }
  auto load_wq = [&](size_t ch) {
    tile_async(Ws, ldw, sc.W + ch * CH * K, CH, K);
    if (with_out) tile_async(QGs, ldw, sc.QG + ch * CH * K, CH, K);
    cp_async_commit();
  };
  load_wq((size_t)bh * NC);
  for (int c = 0; c < NC; c++) {
    const size_t ch = (size_t)bh * NC + c;
    float u[8][4];  // U^T tiles of this chunk, in flight during the first products
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++)
        u[n][r] = __ldg(sc.U + (ch * CH + 8 * n + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1));
    cp_async_wait_all();
    __syncthreads();
    tile_async(KLs, ldk, sc.KL + ch * CH * K, CH, K);
    if (with_out) tile_async(AQs, lda, sc.AQ + ch * CH * CH, CH, CH);
    tile_async(els, K, sc.EL + ch * K, 1, K);
    cp_async_commit();
    if (save)
#pragma unroll
      for (int j = 0; j < 16; j++)
#pragma unroll
        for (int r = 0; r < 4; r++)
          if (j < KT) sc.S0[(ch * K + 8 * j + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1)] = S[j][r];
    float P[8][4], O[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) P[n][r] = O[n][r] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < 16; ks++) {
      if (ks >= KT) break;
      unsigned a[4];
      acc_to_a(a, S[ks]);
#pragma unroll
      for (int n = 0; n < 8; n++) {
        const float2 w = *(const float2 *)(Ws + (8 * n + g) * ldw + 8 * ks + 2 * t);
        mma_tf32(P[n], a, w.x, w.y);
        if (with_out) {
          const float2 q = *(const float2 *)(QGs + (8 * n + g) * ldw + 8 * ks + 2 * t);
          mma_tf32(O[n], a, q.x, q.y);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) u[n][r] -= P[n][r];  // u is now Vp^T
    if (save)
#pragma unroll
      for (int n = 0; n < 8; n++)
#pragma unroll
        for (int r = 0; r < 4; r++) sc.VP[(ch * CH + 8 * n + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1)] = u[n][r];
    cp_async_wait_all();
    __syncthreads();  // KL, Aqk, el are in; W and QG are free
    if (c + 1 < NC) load_wq(ch + 1);
    if (with_out) {
#pragma unroll
      for (int ks = 0; ks < 8; ks++) {
        unsigned a[4];
        acc_to_a(a, u[ks]);
#pragma unroll
        for (int n = 0; n < 8; n++) {
          const float2 x = *(const float2 *)(AQs + (8 * n + g) * lda + 8 * ks + 2 * t);
          mma_tf32(O[n], a, x.x, x.y);
        }
      }
#pragma unroll
      for (int n = 0; n < 8; n++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
          const int tt = c * CH + 8 * n + 2 * t + (r & 1);
          if (tt < T) out[AT(b, tt, h, V) + v0 + g + 8 * (r >> 1)] = __float2bfloat16(O[n][r]);
        }
    }
#pragma unroll
    for (int j = 0; j < 16; j++)
      if (j < KT) {
        const float e0 = els[8 * j + 2 * t], e1 = els[8 * j + 2 * t + 1];
        S[j][0] *= e0, S[j][1] *= e1, S[j][2] *= e0, S[j][3] *= e1;
      }
#pragma unroll
    for (int ks = 0; ks < 8; ks++) {
      unsigned a[4];
      acc_to_a(a, u[ks]);
#pragma unroll
      for (int n = 0; n < 16; n++)
        if (n < KT) mma_tf32(S[n], a, KLs[(8 * ks + 2 * t) * ldk + 8 * n + g], KLs[(8 * ks + 2 * t + 1) * ldk + 8 * n + g]);
    }
  }
  if (final_state)
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
      for (int r = 0; r < 4; r++)
        if (j < KT) final_state[((size_t)bh * K + 8 * j + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1)] = S[j][r];
}

// ---------------------------------------------------------------------------------------------------------
// Backward state pass on the tensor cores: chunks in reverse, the warp keeping dS^T (the gradient of the
// state leaving the chunk, its 16 columns x K) in registers; per chunk:
//   dVp^T = dO^T Aqk + dS^T KL^T                       (16 x 64)
//   dS^T  = dS^T diag(el) + dO^T QG - dVp^T W          (16 x K)
// dO^T comes from global memory straight into A fragments (bf16 values are exact in tf32). Saves dS (as
// DS, before the update) and dVp per chunk; Aqk and KL of the next (earlier) chunk load during the QG and
// W products and the other way round.
template <int NW>
static __global__ void __launch_bounds__(32 * NW) kda_state_backward_kernel(float *dinitial_state, Scratch sc,
                                                                            const bf16_t *dout,
                                                                            const float *dfinal_state, int T, int H,
                                                                            int K, int V, int NC) {
  extern __shared__ __align__(128) float smem[];
  const int ldw = K + 8, ldk = K + 4, lda = CH + 4, KT = K / 8;
  float *KLs = smem, *QGs = KLs + CH * ldw, *Ws = QGs + CH * ldk, *AQs = Ws + CH * ldk, *els = AQs + CH * lda;
  const int slices = V / (16 * NW), slice = blockIdx.x % slices, bh = blockIdx.x / slices, b = bh / H, h = bh % H;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, v0 = slice * 16 * NW + 16 * (threadIdx.x >> 5);
  float dS[16][4];
#pragma unroll
  for (int j = 0; j < 16; j++)
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const int a = 8 * j + 2 * t + (r & 1), v = v0 + g + 8 * (r >> 1);
      dS[j][r] = j < KT && dfinal_state ? dfinal_state[((size_t)bh * K + a) * V + v] : 0.0f;
    }
  auto load_ak = [&](size_t ch) {
    tile_async(AQs, lda, sc.AQ + ch * CH * CH, CH, CH);
    tile_async(KLs, ldw, sc.KL + ch * CH * K, CH, K);
    tile_async(els, K, sc.EL + ch * K, 1, K);
    cp_async_commit();
  };
  load_ak((size_t)bh * NC + NC - 1);
  for (int c = NC - 1; c >= 0; c--) {
    const size_t ch = (size_t)bh * NC + c;
    unsigned dOa[8][4];  // dO^T as A fragments: slot t = row 8 ks + 2 t, slot t + 4 = row 8 ks + 2 t + 1
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const int tt = c * CH + 8 * ks + 2 * t + (r >> 1), v = v0 + g + 8 * (r & 1);
        dOa[ks][r] = tt < T ? (unsigned)__bfloat16_as_ushort(__ldg(dout + AT(b, tt, h, V) + v)) << 16 : 0u;
      }
    cp_async_wait_all();
    __syncthreads();
    tile_async(QGs, ldk, sc.QG + ch * CH * K, CH, K);
    tile_async(Ws, ldk, sc.W + ch * CH * K, CH, K);
    cp_async_commit();
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
      for (int r = 0; r < 4; r++)
        if (j < KT) sc.DS[(ch * K + 8 * j + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1)] = dS[j][r];
    float dVp[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) dVp[n][r] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
#pragma unroll
      for (int n = 0; n < 8; n++)
        mma_tf32(dVp[n], dOa[ks], AQs[(8 * ks + 2 * t) * lda + 8 * n + g], AQs[(8 * ks + 2 * t + 1) * lda + 8 * n + g]);
#pragma unroll
    for (int ks = 0; ks < 16; ks++) {
      if (ks >= KT) break;
      unsigned a[4];
      acc_to_a(a, dS[ks]);
#pragma unroll
      for (int n = 0; n < 8; n++) {
        const float2 x = *(const float2 *)(KLs + (8 * n + g) * ldw + 8 * ks + 2 * t);
        mma_tf32(dVp[n], a, x.x, x.y);
      }
    }
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++)
        sc.DVP[(ch * CH + 8 * n + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1)] = dVp[n][r];
#pragma unroll
    for (int j = 0; j < 16; j++)
      if (j < KT) {
        const float e0 = els[8 * j + 2 * t], e1 = els[8 * j + 2 * t + 1];
        dS[j][0] *= e0, dS[j][1] *= e1, dS[j][2] *= e0, dS[j][3] *= e1;
      }
    cp_async_wait_all();
    __syncthreads();  // QG, W are in; Aqk, KL, el are free
    if (c > 0) load_ak(ch - 1);
#pragma unroll
    for (int ks = 0; ks < 8; ks++) {
      unsigned a[4];
      acc_to_a(a, dVp[ks], true);
#pragma unroll
      for (int n = 0; n < 16; n++)
        if (n < KT) {
          const int r0 = (8 * ks + 2 * t) * ldk + 8 * n + g;
          mma_tf32(dS[n], dOa[ks], QGs[r0], QGs[r0 + ldk]);
          mma_tf32(dS[n], a, Ws[r0], Ws[r0 + ldk]);
        }
    }
  }
  if (dinitial_state)
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
      for (int r = 0; r < 4; r++)
        if (j < KT) dinitial_state[((size_t)bh * K + 8 * j + 2 * t + (r & 1)) * V + v0 + g + 8 * (r >> 1)] = dS[j][r];
}
// ---------------------------------------------------------------------------------------------------------
// WY / UT backward, one block per chunk: the non-pairwise parts of dq, dk, dg into PDQ, PDK, PDG; dL and dAqk
// (masked) into DL, DA; dv and dbeta final.
static __global__ void __launch_bounds__(NT) kda_wy_backward_kernel(bf16_t *dv, float *dbeta, Scratch sc,
                                                                    const bf16_t *dout, const bf16_t *k,
                                                                    const bf16_t *v, const float *g,
                                                                    const float *beta_in,
                                                                    const unsigned char *doc_start, int T, int H,
                                                                    int K, int V, int NC) {
  extern __shared__ __align__(128) float smem[];
  const int ld = K + 1, KV = K + V;
  float *tile = smem, *gc = tile + TILE_FLOATS, *kks = gc + CH * ld, *Ys = kks + CH * (CH + 1), *dLs = Ys + CH * KV;
  float *colpart = dLs + CH * (CH + 1), *delS = colpart + 16 * K, *rowpart = delS + K, *beta = rowpart + (NT / 32) * CH;
  int *seg = (int *)(beta + CH);
  const int ch = blockIdx.x, c = ch % NC, bh = ch / NC, b = bh / H, h = bh % H, t0 = c * CH, tid = threadIdx.x;
  const size_t cK = (size_t)ch * CH * K, cV = (size_t)ch * CH * V, cS = (size_t)ch * K * V, cC = (size_t)ch * CH * CH;
  load_gates(gc, ld, beta, seg, g, beta_in, doc_start, b, h, t0, T, H, K);
#pragma unroll
  for (int u = 0; u < CH * CH / NT; u++) {
    const int e = tid + u * NT;
    kks[e] = __ldg(sc.KK + cC + e);
  }
  for (int e = tid; e < 16 * K; e += NT) colpart[e] = 0.0f;
  for (int e = tid; e < (NT / 32) * CH; e += NT) rowpart[e] = 0.0f;
  __syncthreads();
  const int last = seg[CH - 1], ty = tid >> 4;
  const float *S0 = sc.S0 + cS, *DS = sc.DS + cS, *VP = sc.VP + cV, *DVP = sc.DVP + cV;
  float *PDQ = sc.PDQ + cK, *PDK = sc.PDK + cK, *PDG = sc.PDG + cK, *PDK2 = sc.PDK2 + cK, *PDG2 = sc.PDG2 + cK;
  float *PDG3 = sc.PDG3 + cK;
  auto dO = [&](int i, int a) {
    return t0 + i < T ? ldg4(dout + AT(b, t0 + i, h, V) + a) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  };
  // dqg = dO S0^T
  gemm_nt(
      CH, K, V, tile, dO, [&](int n, int a) { return ldg4(S0 + n * V + a); },
      [&](int i, int n, float x) {
        const float eg = seg[i] == 0 ? __expf(gc[i * ld + n]) : 0.0f;
        PDQ[i * K + n] = eg * x;
        PDG[i * K + n] = x * __ldg(sc.QG + cK + i * K + n);
      });
  // dkl = Vp dS'^T
  gemm_nt(
      CH, K, V, tile, [&](int i, int a) { return ldg4(VP + i * V + a); }, [&](int n, int a) { return ldg4(DS + n * V + a); },
      [&](int i, int n, float x) {
        const float ekl = seg[i] == last ? __expf(gc[(CH - 1) * ld + n] - gc[i * ld + n]) : 0.0f;
        PDK[i * K + n] = ekl * x;
        const float t = x * __ldg(sc.KL + cK + i * K + n);
        PDG2[i * K + n] = -t;
        colpart[ty * K + n] += t;
      });
  // dX = [-dVp S0^T | dVp]
  gemm_nt(
      CH, K, V, tile, [&](int i, int a) { return ldg4(DVP + i * V + a); }, [&](int n, int a) { return ldg4(S0 + n * V + a); },
      [&](int i, int n, float x) { Ys[i * KV + n] = -x; });
  for (int e = tid; e < CH * V; e += NT) Ys[(e / V) * KV + K + e % V] = __ldg(DVP + e);
  // del = rowsum(dS' * S0), a warp per row, four rows at a time.
  const int lane = tid & 31, warp = tid >> 5;
  for (int a0 = warp; a0 < K; a0 += 4 * (NT / 32)) {
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int u = 0; u < 4; u++) {
      const int a = a0 + u * (NT / 32);
#pragma unroll 4
      for (int d = lane; d < V; d += 32)
        if (a < K) x[u] = fmaf(__ldg(DS + a * V + d), __ldg(S0 + a * V + d), x[u]);
    }
#pragma unroll
    for (int u = 0; u < 4; u++) {
      const float sum = warp_sum(x[u]);
      if (lane == 0 && a0 + u * (NT / 32) < K) delS[a0 + u * (NT / 32)] = sum;
    }
  }
  // k and v of the chunk (bf16) for the right-hand sides: the tile is free until dL. Eight bf16 (16 bytes) a
  // load, all of a thread's loads in flight at once (K and V are multiples of 16, so no load straddles k and v).
  bf16_t *kvs = (bf16_t *)tile;  // (64, K + V)
  __syncthreads();
  {
    const int nvec = CH * KV / 8;  // <= 64 * 256 / 8 = 8 * NT
    uint4 x[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int e = tid + u * NT, i = 8 * e / KV, a = 8 * e % KV;
      x[u] = make_uint4(0u, 0u, 0u, 0u);
      if (e < nvec && t0 + i < T)
        x[u] = a < K ? __ldg((const uint4 *)(k + AT(b, t0 + i, h, K) + a))
                     : __ldg((const uint4 *)(v + AT(b, t0 + i, h, V) + a - K));
    }
#pragma unroll
    for (int u = 0; u < 8; u++)
      if (tid + u * NT < nvec) *(uint4 *)(kvs + 8 * (tid + u * NT)) = x[u];
  }
  __syncthreads();
  // Back substitution Y = (I + L)^-T dX, one column per thread, and what the column gives directly.
  if (tid < KV) {
    // Right-looking: once y_j is final, its term leaves every earlier row (row j of KK, 16-byte reads).
    float y[CH];
#pragma unroll
    for (int i = 0; i < CH; i++) y[i] = Ys[i * KV + tid];
#pragma unroll
    for (int j = CH - 1; j > 0; j--) {
      const float by = beta[j] * y[j];
#pragma unroll
      for (int i = 0; i < j; i++) y[i] = fmaf(-kks[j * CH + i], by, y[i]);
    }
#pragma unroll
    for (int i = 0; i < CH; i++) Ys[i * KV + tid] = y[i];
    // dbeta's Y . rhs part: per row, summed over this warp's 32 columns (K + V is a multiple of 32).
#pragma unroll
    for (int i = 0; i < CH; i++) {
      float rhs = __bfloat162float(kvs[i * KV + tid]);
      if (tid < K) rhs = seg[i] == 0 ? __expf(gc[i * ld + tid]) * rhs : 0.0f;
      const float p = warp_sum(y[i] * rhs);
      if (lane == 0) rowpart[warp * CH + i] = p;
    }
    if (tid < K) {
      const int a = tid;
      float dgl = 0.0f;
      for (int w = 0; w < 16; w++) dgl += colpart[w * K + a];
      dgl = fmaf(delS[a], __ldg(sc.EL + (size_t)ch * K + a), dgl);
#pragma unroll
      for (int i = 0; i < CH; i++) {
        const float eg = seg[i] == 0 ? __expf(gc[i * ld + a]) : 0.0f;
        const float kv = __bfloat162float(kvs[i * KV + a]);
        const float by = beta[i] * y[i];
        PDK2[i * K + a] = eg * by;
        PDG3[i * K + a] = by * eg * kv + (i == CH - 1 ? dgl : 0.0f);
      }
    } else {
      const int d = tid - K;
#pragma unroll
      for (int i = 0; i < CH; i++)
        if (t0 + i < T) dv[AT(b, t0 + i, h, V) + d] = __float2bfloat16(beta[i] * y[i]);
    }
  }
  __syncthreads();
  // dL = -Y X^T (strictly lower, same document)
  const float *W = sc.W + cK, *U = sc.U + cV;
  gemm_nt(
      CH, CH, KV, tile, [&](int i, int a) { return lds4(Ys + i * KV + a); },
      [&](int j, int a) { return a < K ? ldg4(W + j * K + a) : ldg4(U + j * V + a - K); },
      [&](int i, int j, float x) {
        const float d = j < i && seg[i] == seg[j] ? -x : 0.0f;
        dLs[i * (CH + 1) + j] = d;
        sc.DL[cC + i * CH + j] = d;
      });
  // dAqk = dO Vp^T (lower, same document)
  gemm_nt(
      CH, CH, V, tile, dO, [&](int j, int a) { return ldg4(VP + j * V + a); },
      [&](int i, int j, float x) { sc.DA[cC + i * CH + j] = j <= i && seg[i] == seg[j] ? x : 0.0f; });
  __syncthreads();
  // dbeta_i = Y_i . rhs_i + sum_j dL_ij KK_ij, one warp per row.
  for (int i = warp; i < CH; i += NT / 32) {
    const int t = t0 + i;
    float s = 0.0f;
    for (int j = lane; j < CH; j += 32) s = fmaf(dLs[i * (CH + 1) + j], kks[i * CH + j], s);
    s = warp_sum(s);
    if (lane == 0 && t < T) {
      for (int w = 0; w < NT / 32; w++) s += rowpart[w * CH + i];
      dbeta[((size_t)b * T + t) * H + h] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pairwise backward and the gate's reverse cumulative sum, one block per chunk:
//   P_i = sum_j<i  wl_ij k_j E_ij,  Q_i = sum_j<=i dA_ij k_j E_ij,  R_i = sum_m>=i (wl_mi k_m + dA_mi q_m) E_mi
// with wl_ij = beta_i dL_ij and E_ij = exp(gc_i - gc_j); dk += P + R, dqs += Q, dgc += k P + q Q - k R.
// A thread takes one channel a and four rows grp + 16 r (r = 0..3, so every item has the same number of
// pairs): each k_j, q_j, gc_j read from shared memory serves up to four rows, and (wl, dA) sit side by side
// so one 8-byte broadcast read gives both. What is left is one exponential per pair (at 16 a cycle per SM
// on the MUFU unit, the kernel's bound by count); sums run in ascending j and m as before.
static __global__ void __launch_bounds__(NT) kda_pairwise_backward_kernel(bf16_t *dq, bf16_t *dk, float *dg,
                                                                          Scratch sc, const bf16_t *q,
                                                                          const bf16_t *k, const float *g,
                                                                          const float *beta_in,
                                                                          const unsigned char *doc_start, float scale,
                                                                          int T, int H, int K, int NC) {
  extern __shared__ __align__(128) float smem[];
  const int ld = K + 1;
  float *qs = smem, *ks = qs + CH * ld, *gc = ks + CH * ld, *dgc = gc + CH * ld;
  float2 *wa = (float2 *)(dgc + CH * ld);  // (wl, dA), 64 x 64; 4 * 64 * (K + 1) floats before it: 8-byte aligned
  float *beta = (float *)(wa + CH * CH);
  int *seg = (int *)(beta + CH);
  const int ch = blockIdx.x, c = ch % NC, bh = ch / NC, b = bh / H, h = bh % H, t0 = c * CH, tid = threadIdx.x;
  const size_t cK = (size_t)ch * CH * K, cC = (size_t)ch * CH * CH;
  load_rows(qs, ld, q, scale, b, h, t0, T, H, K);
  load_rows(ks, ld, k, 1.0f, b, h, t0, T, H, K);
  load_gates(gc, ld, beta, seg, g, beta_in, doc_start, b, h, t0, T, H, K);
  __syncthreads();
#pragma unroll 4
  for (int e = tid; e < CH * CH; e += NT) wa[e] = make_float2(beta[e >> 6] * __ldg(sc.DL + cC + e), __ldg(sc.DA + cC + e));
  __syncthreads();
  for (int e = tid; e < 16 * K; e += NT) {
    const int a = e % K, grp = e / K;
    float pk[4], pq[4], pg[4], gi[4], P[4], Q[4], R[4];
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const size_t o = cK + (size_t)(grp + 16 * r) * K + a;
      pk[r] = __ldg(sc.PDK + o) + __ldg(sc.PDK2 + o);
      pq[r] = __ldg(sc.PDQ + o);
      pg[r] = __ldg(sc.PDG + o) + __ldg(sc.PDG2 + o) + __ldg(sc.PDG3 + o);
      gi[r] = gc[(grp + 16 * r) * ld + a];
      P[r] = Q[r] = R[r] = 0.0f;
    }
    // P, Q: row r takes j <= grp + 16 r; segment s (j in (grp + 16 (s - 1), grp + 16 s]) serves rows s..3.
#pragma unroll
    for (int s = 0; s < 4; s++) {
      const int j1 = grp + 16 * s;
      for (int j = s == 0 ? 0 : j1 - 15; j <= j1; j++) {
        const float kj = ks[j * ld + a], gj = gc[j * ld + a];
#pragma unroll
        for (int r = s; r < 4; r++) {
          const float x = kj * __expf(gi[r] - gj);
          const float2 w = wa[(grp + 16 * r) * CH + j];
          P[r] = fmaf(w.x, x, P[r]);
          Q[r] = fmaf(w.y, x, Q[r]);
        }
      }
    }
    // R: row r takes m >= grp + 16 r; segment s (m in [grp + 16 s, grp + 16 (s + 1)), the last to 63) serves
    // rows 0..s.
#pragma unroll
    for (int s = 0; s < 4; s++) {
      const int m1 = s == 3 ? CH : grp + 16 * (s + 1);
      for (int m = grp + 16 * s; m < m1; m++) {
        const float km = ks[m * ld + a], qm = qs[m * ld + a], gm = gc[m * ld + a];
#pragma unroll
        for (int r = 0; r <= s; r++) {
          const float2 w = wa[m * CH + grp + 16 * r];
          const float x = fmaf(w.x, km, w.y * qm);
          R[r] = fmaf(x, __expf(gm - gi[r]), R[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const int i = grp + 16 * r, t = t0 + i;
      const float ki = ks[i * ld + a], qi = qs[i * ld + a];
      dgc[i * ld + a] = pg[r] + ki * (P[r] - R[r]) + qi * Q[r];
      if (t < T) {
        dk[AT(b, t, h, K) + a] = __float2bfloat16(pk[r] + P[r] + R[r]);
        dq[AT(b, t, h, K) + a] = __float2bfloat16(scale * (pq[r] + Q[r]));
      }
    }
  }
  __syncthreads();
  if (tid < K) {
    float acc = 0.0f;
    for (int i = CH - 1; i >= 0; i--) {
      acc += dgc[i * ld + tid];
      if (t0 + i < T) dg[AT(b, t0 + i, h, K) + tid] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
static void check_shape(int K, int V) {
  CHECK(K % 16 == 0 && V % 16 == 0 && K > 0 && V > 0 && K <= 128 && V <= 128,
        "KDA on the GPU needs K and V multiples of 16 up to 128 (got K %d, V %d)", K, V);
}

// The forward's per-chunk intermediates, floats per chunk: W, QG, KL (64 x K), U (64 x V), Aqk, KK (64 x 64), el (K).
static size_t intra_per_chunk(int K, int V) { return 3 * (size_t)CH * K + (size_t)CH * V + 2 * CH * CH + K; }

extern "C" size_t kda_chunk_saved_floats(int B, int T, int H, int K, int V) {
  return (size_t)B * H * ((T + CH - 1) / CH) * intra_per_chunk(K, V);
}

// Per-chunk buffers for nch chunks: the intra kernel's outputs in `saved` (the caller's, kept from the forward
// for the backward) or, when saved is NULL, in device scratch slot 2; the backward's own in slot 2.
static Scratch scratch_get(size_t nch, int K, int V, bool backward, float *saved) {
  const size_t cK = CH * (size_t)K, cV = CH * (size_t)V, cC = CH * CH, kv = (size_t)K * V;
  size_t per = backward ? 2 * cV + 2 * kv + 6 * cK + 2 * cC : 0;
  if (!saved) per += intra_per_chunk(K, V);
  float *p = per ? (float *)device_scratch(2, nch * per * sizeof(float)) : NULL;
  Scratch s = {};
  auto take = [&](float *&from, size_t n) {
    float *r = from;
    from += nch * n;
    return r;
  };
  float *in = saved ? saved : p;  // every size is a multiple of 16 floats: all stay 64-byte aligned
  s.W = take(in, cK), s.U = take(in, cV), s.QG = take(in, cK), s.KL = take(in, cK), s.AQ = take(in, cC);
  s.KK = take(in, cC), s.EL = take(in, K);
  if (!saved) p = in;
  if (backward) {
    s.VP = take(p, cV), s.S0 = take(p, kv), s.DVP = take(p, cV), s.DS = take(p, kv);
    s.PDQ = take(p, cK), s.PDK = take(p, cK), s.PDG = take(p, cK), s.PDK2 = take(p, cK), s.PDG2 = take(p, cK);
    s.PDG3 = take(p, cK), s.DL = take(p, cC), s.DA = take(p, cC);
  }
  return s;
}

static size_t intra_smem(int K) {
  return (TILE_FLOATS + 3 * (size_t)CH * (K + 1) + 2 * CH * (CH + 1) + 2 * CH) * sizeof(float);
}
// The state kernels' shared memory: W, QG (K + 8), KL (K + 4), Aqk (72), el forward; KL (K + 8), QG, W
// (K + 4), Aqk (68), el backward.
static size_t state_smem(int K) { return ((size_t)CH * (3 * K + 20 + CH + 8) + K) * sizeof(float); }
static size_t state_backward_smem(int K) { return ((size_t)CH * (3 * K + 16 + CH + 4) + K) * sizeof(float); }
// Warps per state block (16 state columns each): 8 when V is a multiple of 128, so that one block holds all
// of a (b, h)'s state and its threads share the per-chunk loads of W, QG, KL and Aqk; else 1. (On an H100
// at K = V = 128: one warp per block, 128 blocks at B * H = 16, took about 17.6 us a chunk in the forward
// state pass, twice the old SIMT pass; 8 warps, 128 blocks at B * H = 128, about 9 us.)
static int state_warps(int B, int H, int V) { return V % 128 == 0 ? 8 : 1; }
static size_t wy_smem(int K, int V) {
  return ((size_t)CH * (K + 1) + 2 * CH * (CH + 1) + CH * (K + V) + 17 * K + (NT / 32) * CH + TILE_FLOATS + 2 * CH) *
         sizeof(float);
}
static size_t pair_smem(int K) { return (4 * (size_t)CH * (K + 1) + 2 * CH * CH + 2 * CH) * sizeof(float); }

template <class F>
static void allow_smem(F *kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <int NW>
static void launch_state(bool backward, bf16 *out, float *state_out, const Scratch &sc, bool save,
                         const float *state_in, const bf16 *dout, int B, int T, int H, int K, int V, int NC) {
  const int blocks = B * H * (V / (16 * NW));
  if (!backward) {
    const size_t smem = state_smem(K);
    allow_smem(kda_state_kernel<NW>, smem);
    kda_state_kernel<NW><<<blocks, 32 * NW, smem, device_stream()>>>((bf16_t *)out, state_out, sc, save, state_in, T,
                                                                     H, K, V, NC);
  } else {
    const size_t smem = state_backward_smem(K);
    allow_smem(kda_state_backward_kernel<NW>, smem);
    kda_state_backward_kernel<NW><<<blocks, 32 * NW, smem, device_stream()>>>(state_out, sc, (const bf16_t *)dout,
                                                                              state_in, T, H, K, V, NC);
  }
  CUDA_CHECK_LAUNCH();
}
// Forward: (out, final state) from the initial state; backward: dinitial_state from dout, dfinal_state.
static void state_pass(bool backward, bf16 *out, float *state_out, const Scratch &sc, bool save, const float *state_in,
                       const bf16 *dout, int B, int T, int H, int K, int V, int NC) {
  if (state_warps(B, H, V) == 8) launch_state<8>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC);
  else launch_state<1>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC);
}

static void forward_pieces(const Scratch &sc, const bf16 *q, const bf16 *k, const bf16 *v, const float *g,
                           const float *beta, const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                           int V, int NC) {
  const size_t smem = intra_smem(K);
  allow_smem(kda_intra_kernel, smem);
  kda_intra_kernel<<<B * H * NC, NT, smem, device_stream()>>>(sc, (const bf16_t *)q, (const bf16_t *)k,
                                                              (const bf16_t *)v, g, beta, doc_start, scale, T, H, K,
                                                              V, NC);
  CUDA_CHECK_LAUNCH();
}

extern "C" void kda_chunk_forward_cuda(bf16 *out, float *final_state, const bf16 *q, const bf16 *k, const bf16 *v,
                                       const float *g, const float *beta, const float *initial_state,
                                       const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                                       int V, float *saved) {
  check_shape(K, V);
  if (B == 0 || T == 0 || H == 0) return;
  const int NC = (T + CH - 1) / CH;
  Scratch sc = scratch_get((size_t)B * H * NC, K, V, false, saved);
  forward_pieces(sc, q, k, v, g, beta, doc_start, scale, B, T, H, K, V, NC);
  state_pass(false, out, final_state, sc, false, initial_state, NULL, B, T, H, K, V, NC);
}

extern "C" void kda_chunk_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, float *dg, float *dbeta, float *dinitial_state,
                                        const bf16 *dout, const float *dfinal_state, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const float *g, const float *beta, const float *initial_state,
                                        const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                                        int V, const float *saved) {
  check_shape(K, V);
  if (B == 0 || T == 0 || H == 0) return;
  const int NC = (T + CH - 1) / CH, chunks = B * H * NC;
  CHECK(((uintptr_t)k | (uintptr_t)v) % 16 == 0, "KDA backward on the GPU needs k and v 16-byte aligned");
  Scratch sc = scratch_get((size_t)chunks, K, V, true, (float *)saved);  // the backward only reads saved
  if (!saved) forward_pieces(sc, q, k, v, g, beta, doc_start, scale, B, T, H, K, V, NC);
  state_pass(false, NULL, NULL, sc, true, initial_state, NULL, B, T, H, K, V, NC);
  state_pass(true, NULL, dinitial_state, sc, false, dfinal_state, dout, B, T, H, K, V, NC);
  size_t smem = wy_smem(K, V);
  allow_smem(kda_wy_backward_kernel, smem);
  kda_wy_backward_kernel<<<chunks, NT, smem, device_stream()>>>((bf16_t *)dv, dbeta, sc, (const bf16_t *)dout,
                                                                (const bf16_t *)k, (const bf16_t *)v, g, beta,
                                                                doc_start, T, H, K, V, NC);
  CUDA_CHECK_LAUNCH();
  smem = pair_smem(K);
  allow_smem(kda_pairwise_backward_kernel, smem);
  kda_pairwise_backward_kernel<<<chunks, NT, smem, device_stream()>>>((bf16_t *)dq, (bf16_t *)dk, dg, sc,
                                                                      (const bf16_t *)q, (const bf16_t *)k, g, beta,
                                                                      doc_start, scale, T, H, K, NC);
  CUDA_CHECK_LAUNCH();
}
