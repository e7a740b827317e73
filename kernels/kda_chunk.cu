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
// Forward:  intra kernel (per chunk, parallel): KK, Aqk, M = (I + L)^-1 (L = diag(beta) KK) explicitly,
//           (W | U) = M diag(beta) (eg K | V), qg = eg qs, kl = ekl k, el, M^T -> scratch.
//           state kernel (per batch row and head, sequential over chunks, tensor cores):
//           Vp = U - W S; O = qg S + Aqk Vp; S <- diag(el) S + kl^T Vp (saving S entering each chunk and
//           Vp when the caller keeps `saved` for the backward).
// Backward: the same two unless `saved` has their results (then neither runs), a reverse state kernel
//           (dVp = Aqk^T dO + kl dS'; dS <- qg^T dO + diag(el) dS' - W^T dVp, saving dS' and dVp), then
//           two parallel per-chunk kernels: the WY / UT backward (dqg, dkl, dX, Y = M^T dX, dL, dAqk,
//           dv, dbeta) and the pairwise backward with the reverse cumulative sum of the gate gradient.
//
// Design note (what is fused, where things live, where fp32 is needed, what limits it):
// - Five kernels, per chunk or per (b, h) (a sixth, the forward state pass without the output, recomputes what a
//   backward without `saved` needs); nothing between them but per-chunk buffers: the forward's W U QG KL (64 x
//   128), Aqk (64 x 64) (bf16), KK M^T (64 x 64), el (fp32), Vp (64 x 128) and S0 (128 x 128) (bf16) in the
//   caller's `saved` (or device_scratch slot 2), the backward's dS' (128 x 128), dVp, three partial gradients
//   (dq, dk and its UT part), dL, dAqk (bf16), the last row's gate term (fp32) in slot 2, and dX's k half (64 x
//   128, bf16) between the WY backward's two phases. The forward's output is fused into its state pass.
// - State passes: one block of 8 warps per (b, h) at V = 128 (4 warps, two blocks, when that leaves more than
//   half of the SMs idle; 4 or 1 warp per block when V is not a multiple of 128; see state_warps); each warp
//   holds S^T (or dS^T) for its 16 state columns in fp32 registers (64 per thread) for the whole sequence,
//   and every product is mma.sync m16n8k16 on bf16 with fp32 accumulation, the accumulator tiles feeding the
//   next product as A fragments (rounded to bf16) without a trip through shared memory. W, QG, KL, Aqk (stored
//   bf16 by the intra kernel) stream through shared memory by cp.async, one operand pair loading while the
//   other is used, their fragments by ldmatrix; dO comes with Aqk and KL.
// - Per-chunk kernels: q, k (bf16, row pitch K + 2), gc (fp32, padded rows) and the 64 x 64 KK / Aqk / M in shared
//   memory; the matrix products on tensor cores (mma.sync tf32, fp32 accumulated); in the pairwise ones each
//   exponential exp(gc_i - gc_j) split at an anchor row m into exp(gc_i - gc_m) exp(gc_m - gc_j): across 16-row
//   sub-chunks (KK, Aqk, the pairwise backward's P, Q, R) with both factors <= 1, each warp building its fragments
//   straight from shared memory (small products: no staging tile, no block barrier); inside a sub-chunk, in the
//   forward, three 8 x 8 blocks with anchors 4, 12 (factors within e^+-64) and 8, falling back to one fp32 exponential
//   per pair and channel on the CUDA cores for a chunk whose gate falls by more than 64 over four rows (the forward's
//   pairs are eight units, one a warp: a sub-chunk's KK and Aqk together, or 16-32 columns of one sub-chunk's cross
//   pairs, each sharing its B fragments and exponentials between KK and Aqk); in the pairwise
//   backward on the CUDA cores, a running product along the sub-chunk (one multiplication per pair). M = (I + L)^-1 is
//   built from its four 16 x 16 diagonal blocks (forward substitution on CUDA cores), the blocks below them on the
//   tensor cores in 3xTF32, one warp per column block (no block barriers); W | U = M diag(beta) (eg K | V) by warps
//   that own its column tiles (fragments from shared memory, row order chosen for 32 banks). The WY backward, 8 warps
//   in two blocks per SM, reads S0 and dS' once for its four chunk products (state_products: dqg, dkl, dX's k half into
//   a per-chunk scratch and, from the same dO and Vp tiles, dAqk; every operand bf16, so mma.sync m16n8k16 on bf16
//   with ldmatrix fragments), streamed by cp.async through three 32-column stages (two slices in flight); then M^T
//   (into the third panel buffer, beside the first two panels) and over panels of 32
//   columns of [k | v] (dX: that scratch or dVp; X = [W | U]; raw k | v), three buffers deep by cp.async, Y_p = M^T
//   dX_p (M^T's fragments in registers), Y's per-element work (dk's UT part, dv, dbeta's row sums) in its epilogue, and
//   dL += Y_p X_p^T with dL's accumulators in registers across the panels; dL's mask and dbeta's dL . KK part at the
//   end. The intra kernel and the WY backward fit two blocks per SM (about 83 and 102 KB), and so does the pairwise
//   backward (about 107 KB: units of (sub-chunk, 32 channels), each warp's P, Q, R turned around through a 1 KB buffer
//   into the lanes that run the in-sub-chunk pass, instead of three 64 x (K + 1) fp32 arrays; until session 22 about
//   200 KB, one block); every per-chunk kernel's block is 8 warps. Every kernel is also instantiated with K = V = 128
//   fixed at compile time (the default models' shape), which folds its index arithmetic (the state passes: 40% fewer
//   instructions).
// - The L2 norms of q and k are inside: the intra and pairwise kernels normalize the rows as they load them
//   (load_rows_l2norm, four threads a row), the WY backward scales its raw k by the inverse norms the intra
//   kernel saved (64 floats a chunk), and the pairwise kernel ends with the norms' backward (its upper four
//   warps, while the lower ones run the gate's reverse sum). Measured on an H100 at 8 x 4096 x 16 (session 19):
//   with the softplus gate fwd 2.59 -> 2.43 ms, fwd+bwd 8.11 -> 7.91 (bounded 8.09 -> 7.83) against the norms as
//   separate kernels; unit-norm inputs (bench_kda's op rows) pay the norms now: 7.12 -> 7.37. The per-kernel
//   times below were measured before, with the norms as separate kernels.
// - The gate gradient dg_t = sum_i>=t dgc_i leaves out what cancels exactly (a diagonal pair's q_i dA_ii k_i,
//   the last row's kl term): with steep decays dg is ~e^-10 of those terms, and their rounding was a 3% error.
// - Every exponential is exp_ftz (ex2.approx.ftz of x log2(e): __expf without its subnormal rescaling, two
//   instructions instead of five; a result below 2^-126 becomes 0). The per-chunk kernels issue about one per
//   operand element they build, so this alone took 5% off the forward (session 27).
// - fp32 is required for: the recurrent state and its gradient (they accumulate over the whole sequence),
//   the cumulative gates and every exponential of them, M (built in fp32 or 3xTF32; it enters products as tf32),
//   and all accumulators. tf32 inputs (10-bit mantissa) are used only as tensor-core operands (the per-chunk
//   kernels' own products); bf16 for q, k, v, out, dout and the bf16 gradients, as the contract says, and for the
//   per-chunk buffers between the kernels: W, U, QG, KL, Aqk (the state passes' operands, with the states rounded to
//   bf16 as A operands), S0, Vp, dS', dVp and dX's k half (the WY backward's), PDQ, PDK, PDK2, dL and dAqk (the
//   pairwise backward's; dbeta and DGL stay fp32). The offline model
//   (bench/dev/bf16_states.py, relative L2 against fp64 at T = 2048): every output and gradient within about 5e-3
//   (dk 5.3e-3 and dg 5.0e-3 at decays near 1, O 4.3e-3, dS0 3.1e-3), about three bf16 roundings; tf32 buffers
//   gave 6.5e-4. The GPU tests' worst (outputs rounded to bf16 too): 5.6e-3 (dg), 2.6e-3 with fp32 buffers; the
//   contract is 1e-2.
// - What limits it now (H100, 8 x 4096 x 16 x 128 with the softplus gate, the norms inside, session 27: fwd 1.87 ms,
//   fwd+bwd 5.24 ms; fla's Triton chunk_kda 2.37 / 12.33 ms in the same command). Per kernel (ncu, kernels serialized;
//   ms, DRAM GB, TB/s; measured on this file plus two dropped changes, together neutral): intra 1.08 (0.91 with the
//   bounded gate or the op's raw inputs: bench/README, "Steep gates"), 1.56, 1.45; state 0.61, 1.15, 1.87; state
//   backward 0.50, 1.01, 2.03; WY backward 1.38, 2.99, 2.17; pairwise backward 1.23, 1.93, 1.57; the gate's kernels
//   0.16 and 0.19. Session 26's bf16 buffers took the bytes to 8.8 GB (fwd+bwd 6.82 -> 5.79 ms), and the kernels that
//   streamed at 2.7 TB/s now run at about 2: they wait on latency and instructions more than on bytes. Session 27 cut
//   instructions: the intra kernel built its operand elements one at a time, about one exponential each, five
//   instructions as __expf (now two), the same ones twice in the KK and Aqk warps (now once); 1.42 -> 1.08 ms (67.7 K
//   warp instructions a block after the first of those changes, ncu at 2 x 4096). The pairwise backward's tail (dg's
//   prefix sums and the norms' backward, 49% of a block's cycles) was a chain of memory latencies, one a row; now 16 or
//   4 rows' loads fly together (1.40 -> 1.23 ms). The backward kernels' phases (prologue loads of q, k and the gates, a
//   serial memory latency; the state products; the panels) ran one after another at one block per SM; a second block
//   per SM overlaps them (session 21, the WY backward at 108 KB instead of 215: fwd+bwd 7.81 -> 7.46 ms; session 22,
//   the pairwise backward at 107 KB instead of 200: 7.52 -> 7.32 ms). With few heads and long sequences (1 x 65536 x
//   16) the state passes are still the largest part: one warp per SM sub-partition, each instruction waiting on the one
//   before (the bf16 products halved that chain: fwd 6.3 -> 6.1 ms there). bench/README has the per-phase tables. Tried
//   and dropped: fp16 per-chunk buffers (session 25: the widening on the state passes' chain, and QG's, W's rows below
//   fp16's range under steep decays), an L2 prefetch of the next chunk's operands in the state passes (session 26: 1 x
//   65536 fwd -1.4% but fwd+bwd +2.7%, 2 x 16384 +1.7%); the gates' loads in flight while q and k load and normalize
//   (session 27: fwd+bwd +3%, the backward kernels' prologue longer).
// - Few (b, h), long sequences (the state passes' blocks on at most half of the SMs, e.g. 2 x 16384 x 16 and
//   1 x 65536 x 16): the chunks are cut into segments, and the per-chunk kernels of one segment run on a second
//   stream beside the state pass of another (forward: intra(s + 1) beside state(s), the output inside the state
//   pass as uncut; backward: WY and pairwise(s) beside state_backward(s - 1)); the state crosses segments through
//   memory in fp32 (see segments). On an H100: 1 x 65536 x 16 fwd 7.93 -> 6.04 ms, fwd+bwd 21.5 -> 16.9 ms;
//   2 x 16384 x 16 fwd+bwd 8.24 -> 7.63 ms. (Until session 19 the cut forward moved the output to a separate
//   kernel after the saved states, one segment behind, so that the state pass was shorter: that kernel ran at a
//   fifth of its byte floor and cost 1 ms of the forward at 64 and 128 state blocks; removed.)
// Sums are in a fixed order (deterministic).
#include "kernels/cuda_common.cuh"
#include "kernels/kda.h"

#include <type_traits>

#define CH 64          // chunk length
#define NT 256         // threads per block (every per-chunk kernel; the WY backward two blocks per SM)
#define DIAG_RANGE 64.0f  // the intra kernel's sub-chunk products on the tensor cores: see there
#define SEGMENTS_MAX 8         // few (b, h): the chunks cut into at most this many segments (see segments),
#define SEGMENT_CHUNKS_MIN 64  // each of at least this many chunks

#define AT(b, t, h, X) ((((size_t)(b) * T + (t)) * H + (h)) * (X))
// In unrolled loops over rows, address row t0 + i as p + AT(b, t0, h, X) + i * (H X): one multiply-add an
// address instead of AT's whole index arithmetic (about 17 instructions a row in the per-chunk kernels' SASS).

// Per-chunk scratch, chunk index ch = (b * H + h) * NC + c.
struct Scratch {
  bf16_t *W, *U, *QG, *KL, *AQ;  // (64,K) (64,V) (64,K) (64,K) (64,64), bf16: the state passes' operands (and X)
  float *EL, *KK, *MT;             // (K) (64,64) x2
  float *RK;                       // (64): k's inverse L2 norms
  bf16_t *VP, *S0, *DVP, *DS;          // (64,V) (K,V) (64,V) (K,V), bf16: only the WY backward reads them
  bf16_t *PDQ, *PDK, *PDK2, *DL, *DA;  // (64,K) x3, (64,64) x2, bf16: the WY backward's partial gradients
  float *DGL;                          // (K): the gate gradient at gc_last
  bf16_t *DXK;                         // (64,K) bf16: the WY backward's dX, k half (-dVp S0^T), between its phases
};

// Tensor-core helpers: mma.sync m16n8k8 with tf32 inputs and fp32
// accumulation. Fragments (g = lane / 4, t = lane % 4): A (16 x 8) a0 (g, t), a1 (g + 8, t), a2 (g, t + 4),
// a3 (g + 8, t + 4); B (8 x 8) b0 (t, g), b1 (t + 4, g); C (16 x 8) c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t),
// c3 (g + 8, 2t + 1). The per-chunk kernels' products read both operands from shared memory in that order
// (their tiles' own index functions).
// x rounded to tf32 (nearest, ties away from zero, as cvt.rna.tf32.f32 for finite x): half of tf32's last
// place added to the bits of the magnitude, the 13 bits below it dropped. Two integer instructions; sm_90
// runs cvt.rna.tf32 as a sequence of about five.
static __device__ __forceinline__ unsigned tf32_bits(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }
// x rounded to the nearest tf32 (kept as a float), as a B operand.
static __device__ __forceinline__ float round_tf32(float x) { return __uint_as_float(tf32_bits(x)); }
// e^x as __expf computes it (ex2.approx of x log2(e)), but with .ftz: two instructions instead of five (__expf's
// ex2.approx without .ftz rescales an input below -126 around the MUFU, to return subnormals). Every exponential
// here is of a gate (or a difference of two); a value below 2^-126 (then 0) changes nothing a result can show.
static __device__ __forceinline__ float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
}
static __device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], float b0, float b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}
// mma.sync m16n8k16 with bf16 inputs and fp32 accumulation (the state passes' products and the WY backward's state
// products, whose operands are all stored bf16). Fragments, each register two bf16 (the lower column first): A (16 x
// 16) a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..); B (16 x 8) b0 (2t.., g), b1 (2t +
// 8.., g); C as above.
static __device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8 x 8 bf16 matrices from shared memory (ldmatrix .x4): lane l gives the address of row l % 8 of matrix
// l / 8 (16 contiguous bytes); register i gets matrix i's (row g, columns 2t, 2t + 1). So matrices (rows 0-7,
// columns 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) of a row-major 16 x 16 tile are its A fragment, and (n
// 0-7, k 0-7), (n 0-7, k 8-15) of a B stored n-major (k contiguous) are its b0, b1.
// c0 and c1 += A B for two n-tiles whose B fragments one ldmatrix .x4 gave (b0, b1 of the first, then the second's).
static __device__ __forceinline__ void mma_pair(float (&c0)[4], float (&c1)[4], const unsigned (&a)[4],
                                                const unsigned (&b)[4]) {
  mma_bf16(c0, a, b[0], b[1]);
  mma_bf16(c1, a, b[2], b[3]);
}
static __device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
// The same transposed (ldmatrix .x4 .trans): register i gets matrix i's (rows 2t, 2t + 1, column g). So a B
// stored k-major (n contiguous: matrices (k 0-7, n 0-7), (k 8-15, n 0-7)) gives b0, b1, and an A stored
// column-major (matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15)) its fragment.
static __device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const void *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
// Two accumulator tiles (C of m16n8, columns 8 j.. and 8 j + 8..) as the A fragment (16 x 16) of an m16n8k16
// product, rounded to bf16 (nearest even; negated if neg): that A layout is two C layouts side by side.
static __device__ __forceinline__ unsigned bf16x2_bits(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *(const unsigned *)&v;
}
static __device__ __forceinline__ void acc_to_a_bf16(unsigned (&a)[4], const float (&c0)[4], const float (&c1)[4],
                                                     bool neg = false) {
  const unsigned s = neg ? 0x80008000u : 0u;
  a[0] = bf16x2_bits(c0[0], c0[1]) ^ s, a[1] = bf16x2_bits(c0[2], c0[3]) ^ s;
  a[2] = bf16x2_bits(c1[0], c1[1]) ^ s, a[3] = bf16x2_bits(c1[2], c1[3]) ^ s;
}
// d += a b at about fp32's accuracy on the tensor cores (3xTF32): a = ah + al, b = bh + bl, each part tf32,
// al bh + ah bl + ah bh accumulated (the smallest first), al bl dropped. For products whose result is kept
// in fp32 (M's blocks).
static __device__ __forceinline__ void mma_3xtf32(float (&d)[4], const float (&a)[4], float b0, float b1) {
  unsigned ah[4], al[4];
#pragma unroll
  for (int r = 0; r < 4; r++) ah[r] = tf32_bits(a[r]), al[r] = tf32_bits(a[r] - __uint_as_float(ah[r]));
  const float b0h = round_tf32(b0), b1h = round_tf32(b1);
  mma_tf32(d, al, b0h, b1h);
  mma_tf32(d, ah, round_tf32(b0 - b0h), round_tf32(b1 - b1h));
  mma_tf32(d, ah, b0h, b1h);
}
// A warp's 16 x 8 NTL output block (NTL 16 x 8 C fragments) into the output tile Cs (row pitch ld) at p = Cs +
// 16 wm ld + 8 NTL wn: thread (g, t) writes (g, 8 nt + 2t .. + 1) and (g + 8, ..).
template <int NTL>
static __device__ __forceinline__ void store_c(float *p, int ld, const float (&c)[NTL][4]) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < NTL; nt++) {
    *(float2 *)(p + g * ld + 8 * nt + 2 * t) = make_float2(c[nt][0], c[nt][1]);
    *(float2 *)(p + (g + 8) * ld + 8 * nt + 2 * t) = make_float2(c[nt][2], c[nt][3]);
  }
}
// One 8-deep step of a 64-row product over at most 32 8-column tiles, by a block of NW warps, warp owning the
// tiles warp + NW nt (nt < NTW = 32 / NW; those below nn): acc[mt][nt] += M(rows 16 mt.., k slots k0 | k1)
// B(k0 | k1, the tile's columns), A fragments read straight from M (row pitch lm), B's values from b(k, n),
// rounded to tf32 here (zeros past the last tile); M's values are tf32 already. The intra kernel's
// W | U = M (beta eg K | V) (8 warps).
template <int NW = 8, int NTW, class FB>
static __device__ __forceinline__ void column_tiles_step(float (&acc)[4][NTW][4], const float *M, int lm, int k0,
                                                         int k1, int nn, FB b) {
  static_assert(NW * NTW == 32, "the warps' tiles cover 32 column tiles");
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
  float bv[NTW][2];
#pragma unroll
  for (int nt = 0; nt < NTW; nt++) {
    const int n = 8 * (warp + NW * nt) + g;
    const bool in = warp + NW * nt < nn;
    bv[nt][0] = in ? round_tf32(b(k0, n)) : 0.0f;
    bv[nt][1] = in ? round_tf32(b(k1, n)) : 0.0f;
  }
#pragma unroll
  for (int mt = 0; mt < 4; mt++) {
    const float *m0 = M + (16 * mt + g) * lm, *m8 = m0 + 8 * lm;
    const unsigned a[4] = {__float_as_uint(m0[k0]), __float_as_uint(m8[k0]), __float_as_uint(m0[k1]),
                           __float_as_uint(m8[k1])};  // (M is stored tf32-rounded)
#pragma unroll
    for (int nt = 0; nt < NTW; nt++) mma_tf32(acc[mt][nt], a, bv[nt][0], bv[nt][1]);
  }
}
// The result of column_tiles_step products (NW warps, as there) in bf16: columns n < nw to X0 (row pitch nw), the
// others to X1 (row pitch n1, column n - nw). Thread (g, t) holds rows 16 mt + g (+ 8) of its tiles' columns 2t,
// 2t + 1: one address a tile, the rows at constant offsets.
template <int NW = 8, int NTW>
static __device__ __forceinline__ void column_tiles_store(const float (&acc)[4][NTW][4], int nn, bf16_t *X0, int nw,
                                                          bf16_t *X1, int n1) {
  static_assert(NW * NTW == 32, "the warps' tiles cover 32 column tiles");
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < NTW; nt++) {
    if (warp + NW * nt >= nn) continue;
    const int n = 8 * (warp + NW * nt) + 2 * t, pitch = n < nw ? nw : n1;
    bf16_t *p = (n < nw ? X0 + n : X1 + n - nw) + g * pitch;
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
      for (int hf = 0; hf < 2; hf++)
        *(__nv_bfloat162 *)(p + (16 * mt + 8 * hf) * pitch) =
            __floats2bfloat162_rn(acc[mt][nt][2 * hf], acc[mt][nt][2 * hf + 1]);
  }
}

#define CLD 68  // the state products' output tile's pitch (64 x CLD floats, over a stage)
static __device__ __forceinline__ void cp_async16(void *dst, const void *src) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
// bytes (a multiple of 16) from p (16-byte aligned) into L2, one instruction (sm_90's bulk prefetch).
static __device__ __forceinline__ void l2_prefetch(const void *p, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
static __device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// rows x cols floats (cols a multiple of 4, rows contiguous in global memory) into shared memory with leading
// dimension ld (a multiple of 4), 16 bytes a copy, by the block's NTH threads. When the copies divide evenly
// (always at the fixed shape, where rows and cols are constants too) a thread copies the same column piece of
// rows r0, r0 + NTH / (cols / 4), ...: one address computation, then constant offsets.
// (E: fp32 or bf16; cols and ld then count its elements, 16 bytes = PE of them.)
template <int NTH, class E>
static __device__ __forceinline__ void tile_async(E *dst, int ld, const E *src, int rows, int cols) {
  constexpr int PE = 16 / sizeof(E);
  const int per_row = cols / PE, n = rows * per_row;
  if (NTH % per_row == 0 && n % NTH == 0) {
    const int step = NTH / per_row, r0 = threadIdx.x / per_row, c4 = (threadIdx.x % per_row) * PE;
    E *d = dst + r0 * ld + c4;
    const E *s = src + (size_t)r0 * cols + c4;
#pragma unroll
    for (int i = 0; i < n / NTH; i++) cp_async16(d + i * step * ld, s + (size_t)i * step * cols);
  } else {
    for (int e = threadIdx.x; e < n; e += NTH) {
      const int r = e / per_row, c4 = (e % per_row) * PE;
      cp_async16(dst + r * ld + c4, src + (size_t)r * cols + c4);
    }
  }
}

// The WY backward's three products with the chunk's states in one pass over the V columns, 64 state rows at a
// time: P0 = dO S0^T, P1 = Vp dS'^T, P2 = dVp S0^T (64 x 64 each, fp32 accumulated), so that S0 and dS' are read
// once, and on the first pass P3 = dO Vp^T (64 x 64, the chunk's dAqk) from the same dO and Vp tiles. Also del_a =
// sum_d dS'_ad S0_ad. Every operand is bf16 as stored (dO the caller's; S0, Vp by the forward state pass, dS', dVp
// by the backward one), so the products are mma.sync m16n8k16 on bf16, their fragments loaded by ldmatrix.
// The operands stream by cp.async through SP_STAGES = 3 shared-memory stages, 32 columns a slice, the slices in
// order over (n0, k0), the next two slices in flight while one is used: the phase waits on memory latency, not
// on its products, so what it has in flight sets its speed (the stages take M^T's place too: M^T loads after
// this phase; the kernel still fits two blocks per SM). Each tile is 64 rows of 32 bf16, four 16-byte pieces a
// row, XOR-swizzled (sp_at, in 4-byte words) so that the eight rows of an ldmatrix phase and the eight pieces of a
// quarter warp's copies hit 32 banks. The block's NT = 256 threads: a thread copies one piece of each of the five
// tiles (row pr, columns 8 pp .. 8 pp + 7) and, once they are there, sums its part of del from its S0 and dS'
// pieces. A last slice of 16 columns (V not a multiple of 32) fills pieces 0 and 1 only.
// Warp w computes a 16 x 32 block of each product, rows 16 (w / 2).., columns 32 (w % 2)... epi(p, i, a, value)
// gets thread (tx, ty) = (tid % 16, tid / 16) the rows ty + 16 r (r < 4) and columns tx + 16 q of each tile; the
// output tile overlays the stage just used. Synchronizes the block; `stages` (SP_FLOATS) is free again when it
// returns.
#define SP_TILE (64 * 32 / 2)    // floats: a 64 x 32 bf16 tile
#define SP_STAGE (5 * SP_TILE)   // Vp, dVp, S0, dS', dO
#define SP_STAGES 3
// Word (4 bytes: two bf16 columns) w < 16 of a stage tile's row r: the row's four 16-byte pieces permuted by
// (r / 2) % 4, so that rows r0 .. r0 + 7 (r0 a multiple of 8) of one piece fall in eight different groups of four
// banks.
static __device__ __forceinline__ int sp_at(int r, int w) {
  return r * 16 + ((((w >> 2) ^ (r >> 1)) & 3) << 2) + (w & 3);
}
#define SP_FLOATS (SP_STAGES * SP_STAGE)
static_assert(64 * CLD <= SP_STAGE, "the output tile must fit in a stage");
template <int N>
static __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
// 16 bytes, or 16 zeros when !valid (src is not read then, but must be a mapped address).
static __device__ __forceinline__ void cp_async16z(void *dst, const void *src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
// The same, asking L2 to fetch the 256-byte segment around src: a state-products slice reads 64 bytes of a
// 256-byte row (V = 128), so the next three slices' pieces of that row come in with it (session 24: fwd+bwd 1-3%
// faster, with fp32 rows).
static __device__ __forceinline__ void cp_async16_l2(void *dst, const void *src) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
static __device__ __forceinline__ void cp_async16z_l2(void *dst, const void *src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
// A bf16 pair (the lower column in the low half) as two floats.
static __device__ __forceinline__ float bf_lo(unsigned w) { return __uint_as_float(w << 16); }
static __device__ __forceinline__ float bf_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
template <class FE>
static __device__ __forceinline__ void state_products(const bf16_t *dout, const bf16_t *VP, const bf16_t *DVP,
                                                      const bf16_t *S0, const bf16_t *DS, float *stages, float *delS,
                                                      int b, int h, int t0, int T, int H, int K, int V, FE epi) {
  static_assert(NT == 256, "state_products' thread maps are for 8 warps");
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int lane = tid & 31;
  // slice s: state rows n0 = 64 (s / nv), columns k0 = 32 (s % nv)
  const int nv = (V + 31) / 32, ns = (K + 63) / 64 * nv;
  // The thread's pieces: row pr, columns 8 pp .. 8 pp + 7 (at word pa of each tile); the eight threads of a
  // quarter warp take eight rows of one piece.
  const int pr = (tid & 7) + 8 * (tid >> 5), pp = (tid >> 3) & 3, pa = sp_at(pr, 4 * pp);
  auto issue = [&](int s) {
    if (s < ns) {
      float *st = stages + (s % SP_STAGES) * SP_STAGE;
      const int n0 = 64 * (s / nv), k0 = 32 * (s % nv), c = k0 + 8 * pp;
      if (c < V) {  // (only a last 16-column slice leaves pieces 2 and 3 out)
        const bool row_in = n0 + pr < K, t_in = t0 + pr < T;
        cp_async16_l2(st + pa, VP + pr * V + c);
        cp_async16_l2(st + SP_TILE + pa, DVP + pr * V + c);
        cp_async16z_l2(st + 2 * SP_TILE + pa, S0 + (size_t)(row_in ? n0 + pr : 0) * V + c, row_in);
        cp_async16z_l2(st + 3 * SP_TILE + pa, DS + (size_t)(row_in ? n0 + pr : 0) * V + c, row_in);
        cp_async16z(st + 4 * SP_TILE + pa, dout + AT(b, t_in ? t0 + pr : t0, h, V) + c, t_in);
      }
    }
    cp_async_commit();  // (empty past the last slice: the group count stays the same for every thread)
  };
  // ldmatrix addresses (words from a tile's start) for the columns 16 kk.. (pieces 2 kk, 2 kk + 1): lane l names
  // row l % 8 of matrix l / 8. A (rows 16 wm..): matrices (rows 0-7, piece 2 kk), (8-15, 2 kk), (0-7, 2 kk + 1),
  // (8-15, 2 kk + 1); B (rows 32 wn + 16 j.., n-tiles 2 j and 2 j + 1): (n-tile 2 j, piece 2 kk), (2 j, 2 kk + 1),
  // (2 j + 1, 2 kk), (2 j + 1, 2 kk + 1).
  const int lr = lane & 7, lm = lane >> 3;
  const int arow = 16 * wm + lr + 8 * (lm & 1), brow = 32 * wn + lr + 8 * (lm >> 1);
  auto a_at = [&](int kk) { return sp_at(arow, 8 * kk + 4 * (lm >> 1)); };
  auto b_at = [&](int j, int kk) { return sp_at(brow + 16 * j, 8 * kk + 4 * (lm & 1)); };
  // c[nt] += A B_nt for the warp's four n-tiles, b[j] holding n-tiles 2 j, 2 j + 1
  auto mma4 = [](float(&c)[4][4], const unsigned(&a)[4], const unsigned(&b)[2][4]) {
    mma_pair(c[0], c[1], a, b[0]), mma_pair(c[2], c[3], a, b[1]);
  };
  float acc[4][4][4];  // product p's 16 x 32 block of the warp: rows 16 wm.., columns 32 wn + 8 nt..
  float dl = 0.0f;     // the thread's part of del for row n0 + pr
#pragma unroll
  for (int s = 0; s < SP_STAGES - 1; s++) issue(s);
  for (int s = 0; s < ns; s++) {
    const int n0 = 64 * (s / nv), k0 = 32 * (s % nv), cols = min(64, K - n0), steps = min(32, V - k0) / 16;
    float *st = stages + (s % SP_STAGES) * SP_STAGE;
    if (k0 == 0) {
#pragma unroll
      for (int p = 0; p < 4; p++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++) acc[p][nt][0] = acc[p][nt][1] = acc[p][nt][2] = acc[p][nt][3] = 0.0f;
      dl = 0.0f;
    }
    cp_async_wait<SP_STAGES - 2>();  // this thread's copies of slice s are there
    if (pp < 2 * steps) {
      const uint4 x = *(const uint4 *)(st + 2 * SP_TILE + pa), y = *(const uint4 *)(st + 3 * SP_TILE + pa);
      const unsigned xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int e = 0; e < 4; e++) dl = fmaf(bf_lo(xs[e]), bf_lo(ys[e]), fmaf(bf_hi(xs[e]), bf_hi(ys[e]), dl));
    }
    __syncthreads();  // slice s is in place; every warp is past its products of slice s - 1
    issue(s + SP_STAGES - 1);  // into slice s - 1's stage
    // A: dO, Vp, dVp (rows 16 wm..); B: S0, dS' (rows 32 wn..), and Vp for P3.
    const float *Vs = st, *DVs = st + SP_TILE, *Ss = st + 2 * SP_TILE, *DSs = st + 3 * SP_TILE;
    const float *DOs = st + 4 * SP_TILE;
    if (32 * wn < cols) {
#pragma unroll
      for (int kk = 0; kk < 2; kk++) {
        if (kk >= steps) break;
        unsigned a[4], bs[2][4], bd[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) ldsm_x4(bs[j], Ss + b_at(j, kk)), ldsm_x4(bd[j], DSs + b_at(j, kk));
        ldsm_x4(a, DOs + a_at(kk));
        mma4(acc[0], a, bs);
        ldsm_x4(a, Vs + a_at(kk));
        mma4(acc[1], a, bd);
        ldsm_x4(a, DVs + a_at(kk));
        mma4(acc[2], a, bs);
      }
    }
    if (n0 == 0) {  // P3 = dO Vp^T: Vp's rows (A operand 1) as the B operand
#pragma unroll
      for (int kk = 0; kk < 2; kk++) {
        if (kk >= steps) break;
        unsigned a[4], bv[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) ldsm_x4(bv[j], Vs + b_at(j, kk));
        ldsm_x4(a, DOs + a_at(kk));
        mma4(acc[3], a, bv);
      }
    }
    if (k0 + 32 < V) continue;
    // The last slice of these 64 state rows: del (a row's four threads are lanes l, l + 8, l + 16, l + 24), then
    // the products through the output tile Cs, over this slice's stage.
    dl += __shfl_xor_sync(0xffffffffu, dl, 8);
    dl += __shfl_xor_sync(0xffffffffu, dl, 16);
    if (pp == 0 && pr < cols) delS[n0 + pr] = dl;
    float *Cs = st;
#pragma unroll
    for (int p = 0; p < 4; p++) {
      if (p == 3 && n0 != 0) break;
      __syncthreads();  // every warp is past its reads of the stage (or of the last tile)
      if (p == 3 || 32 * wn < cols) store_c(Cs + 16 * wm * CLD + 32 * wn, CLD, acc[p]);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < 4; r++)
#pragma unroll
        for (int q = 0; q < 4; q++)
          if (p == 3 || tx + 16 * q < cols) epi(p, ty + 16 * r, n0 + tx + 16 * q, Cs[(ty + 16 * r) * CLD + tx + 16 * q]);
    }
  }
  __syncthreads();  // every thread is past its reads of the last output tile
}

// The chunk's gates cumulated over its 64 rows (rows past T have g = 0), beta (0 past T) and seg, by a block of
// NTH threads. The loads are issued together before any use (one memory latency, not 64).
template <int NTH = NT>
static __device__ void load_gates(float *gc, int ldg, float *beta, int *seg, const float *g, const float *beta_in,
                                  const unsigned char *doc_start, int b, int h, int t0, int T, int H, int K) {
  const int tid = threadIdx.x;
  if (tid < K) {
    const size_t row = (size_t)H * K;
    const float *gp = g + AT(b, t0, h, K) + tid;  // (t0 + i, tid), i going up (read only while t0 + i < T)
    const int rows = min(CH, T - t0);
    float gv[CH];
#pragma unroll
    for (int i = 0; i < CH; i++, gp += row) gv[i] = i < rows ? __ldg(gp) : 0.0f;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < CH; i++) {
      acc += gv[i];
      gc[i * ldg + tid] = acc;
    }
  }
  if (tid < CH) beta[tid] = t0 + tid < T ? __ldg(beta_in + ((size_t)b * T + t0 + tid) * H + h) : 0.0f;
  if (tid >= NTH - 32) {  // the last warp: document starts by ballot, seg by population counts
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

// q and k rows kept in shared memory L2-normalized, in bf16 (q is scaled when read), with a row pitch of K + 2
// so that the rows of one channel spread over the banks.
#define QK_PITCH(K) ((K) + 2)
// Rows t0 .. t0 + 63 of a (B, T, H, K) bf16 tensor into shared memory (row pitch `pitch`, even), each row
// x / sqrt(|x|^2 + KDA_L2NORM_EPS) rounded to bf16 (l2norm_forward of kernels/norm.h), zero past T; the
// inverse norms into inv[64] (global or shared memory) when inv is not NULL. Four threads a row: thread r of
// the quad loads the 8-byte pieces r, r + 4, .. (all of them in flight together), the sum of squares meets by
// two shuffles. Every kernel normalizes with this one function, so they all see the same bits.
static_assert(NT == 4 * CH, "load_rows_l2norm takes four threads a row");
static __device__ void load_rows_l2norm(bf16_t *dst, int pitch, float *inv, const bf16_t *src, int b, int h, int t0,
                                        int T, int H, int K) {
  const int i = threadIdx.x >> 2, r = threadIdx.x & 3, n = K / 16;  // n <= 8 pieces a thread (K <= 128)
  const uint2 *row = (const uint2 *)(src + AT(b, t0, h, K) + i * (size_t)H * K) + r;  // read only while t0 + i < T
  uint2 x[8];
  float ss = 0.0f;
#pragma unroll
  for (int u = 0; u < 8; u++) {
    x[u] = make_uint2(0u, 0u);
    if (u < n && t0 + i < T) x[u] = __ldg(row + 4 * u);
  }
#pragma unroll
  for (int u = 0; u < 8; u++) {
    if (u >= n) break;
    const float2 lo = __bfloat1622float2(*(const __nv_bfloat162 *)&x[u].x);
    const float2 hi = __bfloat1622float2(*(const __nv_bfloat162 *)&x[u].y);
    ss = fmaf(lo.x, lo.x, fmaf(lo.y, lo.y, fmaf(hi.x, hi.x, fmaf(hi.y, hi.y, ss))));
  }
  ss += __shfl_xor_sync(0xffffffffu, ss, 1);
  ss += __shfl_xor_sync(0xffffffffu, ss, 2);
  const float s = rsqrtf(ss + KDA_L2NORM_EPS);
  if (inv && r == 0) inv[i] = s;
#pragma unroll
  for (int u = 0; u < 8; u++) {
    if (u >= n) break;
    const float2 lo = __bfloat1622float2(*(const __nv_bfloat162 *)&x[u].x);
    const float2 hi = __bfloat1622float2(*(const __nv_bfloat162 *)&x[u].y);
    __nv_bfloat162 *d = (__nv_bfloat162 *)(dst + i * pitch + 4 * (r + 4 * u));
    d[0] = __floats2bfloat162_rn(lo.x * s, lo.y * s);
    d[1] = __floats2bfloat162_rn(hi.x * s, hi.y * s);
  }
}
// x * s rounded to bf16, as load_rows_l2norm stores a normalized element.
static __device__ __forceinline__ float l2norm_bf16(float x, float s) {
  return __bfloat162float(__float2bfloat16(x * s));
}
static __device__ __forceinline__ float bf(const bf16_t *p) { return __bfloat162float(*p); }
// Two neighbouring bf16 (p 4-byte aligned) in one load; bf_lo, bf_hi take them apart.
static __device__ __forceinline__ unsigned bf2(const bf16_t *p) { return *(const unsigned *)p; }

// ---------------------------------------------------------------------------------------------------------
// q's region, later M (64 x 65 floats), in bf16 elements.
static __host__ __device__ int q_region(int K) { return CH * QK_PITCH(K) > 2 * CH * (CH + 1) ? CH * QK_PITCH(K) : 2 * CH * (CH + 1); }
// Intra-chunk forward: one block per chunk.
// KS, VS: K and V fixed at compile time (0: the arguments K_, V_), as for the other per-chunk kernels: the
// shape every layer of the default models uses (128, 128) gets its index arithmetic folded.
template <int KS, int VS>
static __global__ void __launch_bounds__(NT, 2) kda_intra_kernel(Scratch sc, const bf16_t *q, const bf16_t *k,
                                                                 const bf16_t *v, const float *g, const float *beta_in,
                                                                 const unsigned char *doc_start, float scale, int T,
                                                                 int H, int K_, int V_, int NC, int c_begin, int c_end) {
  const int K = KS ? KS : K_, V = VS ? VS : V_;
  __builtin_assume(threadIdx.x < NT);
  // About 83 KB of shared memory at K = V = 128 (q, k, v in bf16; Aqk straight to global memory), so two
  // blocks share an SM.
  extern __shared__ __align__(128) float smem[];
  const int ld = K + 1, pl = QK_PITCH(K);
  float *gc = smem, *kks = gc + CH * ld, *beta = kks + CH * (CH + 1);
  int *seg = (int *)(beta + CH);
  bf16_t *qh = (bf16_t *)(seg + CH), *kh = qh + q_region(K);
  // one block per chunk of the range [c_begin, c_end) of every (b, h)
  const int nr = c_end - c_begin, bh = blockIdx.x / nr, c = c_begin + blockIdx.x % nr, ch = bh * NC + c;
  const int b = bh / H, h = bh % H, t0 = c * CH, tid = threadIdx.x;
  bf16_t *AQ = sc.AQ + (size_t)ch * CH * CH;
  load_rows_l2norm(qh, pl, NULL, q, b, h, t0, T, H, K);
  load_rows_l2norm(kh, pl, sc.RK + (size_t)ch * CH, k, b, h, t0, T, H, K);  // k's inverse norms for the WY backward
  load_gates(gc, ld, beta, seg, g, beta_in, doc_start, b, h, t0, T, H, K);
  __syncthreads();
  // Pairwise products inside the 16-row sub-chunks (KK and Aqk for j <= i). Entries above the sub-chunk diagonal
  // are zeroed here; the products below write those left of it.
  for (int e = tid; e < CH * CH; e += NT) {
    const int i = e >> 6, j = e & 63;
    if ((j >> 4) > (i >> 4) || ((j >> 4) == (i >> 4) && j > i)) AQ[e] = __float2bfloat16(0.0f), kks[e] = 0.0f;
  }
  // The pairs inside each 16-row sub-chunk. On the tensor cores when no channel's cumulative gate falls by more
  // than DIAG_RANGE over four rows around the anchors below (a mean decay above -16 a token): each sub-chunk's
  // 16 x 16 block as three 8 x 8 blocks, exp(gc_i - gc_j) = exp(gc_i - gc_m) exp(gc_m - gc_j) with anchor m =
  // row 4 for the top-left block, 12 for the bottom-right (every factor within e^-64..e^64) and 8 for the
  // bottom-left (every factor <= 1); warp w < 4 takes sub-chunk w, KK and Aqk together (they share the B
  // fragments and the exponentials), below. Else pair by pair in fp32, here.
  bool steep = false;
  for (int e = tid; e < 4 * K; e += NT) {
    const float *gb = gc + 16 * (e / K) * ld + e % K;
    steep |= gb[0] - gb[4 * ld] > DIAG_RANGE || gb[4 * ld] - gb[7 * ld] > DIAG_RANGE ||
             gb[8 * ld] - gb[12 * ld] > DIAG_RANGE || gb[12 * ld] - gb[15 * ld] > DIAG_RANGE;
  }
  steep = __syncthreads_or(steep);
  if (steep) {
    // 136 pairs j <= i in each sub-chunk: four neighbouring lanes share a pair, lane c taking the channels a0 + 8 c
    // + r (a0 a multiple of 32, r < 8), so that the eight pairs of a warp, neighbours in j, read gc_j from 32
    // different banks; the four partial sums meet by shuffles.
    for (int w = tid; w < 4 * 4 * 136; w += NT) {  // 2176 = 68 whole warps: the shuffles see full warps
      const int c = w & 3, p = (w >> 2) % 136, blk = (w >> 2) / 136;
      int il = (int)((sqrtf(8.0f * p + 1.0f) - 1.0f) * 0.5f);  // p = il (il + 1) / 2 + jl, 0 <= jl <= il
      if ((il + 1) * (il + 2) / 2 <= p) il++;
      if (il * (il + 1) / 2 > p) il--;
      const int i = 16 * blk + il, j = 16 * blk + p - il * (il + 1) / 2;
      float kk = 0.0f, qk = 0.0f;
      if (seg[i] == seg[j]) {
        const bf16_t *ki = kh + i * pl, *kj = kh + j * pl, *qi = qh + i * pl;
        const float *gi = gc + i * ld, *gj = gc + j * ld;
        for (int a0 = 8 * c; a0 < K; a0 += 32)
#pragma unroll
          for (int r = 0; r < 8; r++) {
            const int a = a0 + r;
            const float x = bf(kj + a) * exp_ftz(gi[a] - gj[a]);
            kk = fmaf(bf(ki + a), x, kk);
            qk = fmaf(bf(qi + a), x, qk);
          }
      }
      kk += __shfl_xor_sync(0xffffffffu, kk, 1);
      qk += __shfl_xor_sync(0xffffffffu, qk, 1);
      kk += __shfl_xor_sync(0xffffffffu, kk, 2);
      qk += __shfl_xor_sync(0xffffffffu, qk, 2);
      if (c == 0) {
        AQ[i * CH + j] = __float2bfloat16(scale * qk);
        kks[i * CH + j] = j < i ? kk : 0.0f;
      }
    }
  }
  // Eight units on the tensor cores, one a warp, fragments built straight from shared memory (no staging, no
  // block barrier; no two units write the same entries), k slots on channels 8 t + .. so that a warp's reads of
  // gc rows hit 32 banks (K a multiple of 32). Warp w < 4 (unless steep): sub-chunk w's block, as above, KK and
  // Aqk (six m16n8k8 products a step of 8 channels). Warp 4 + u: sub-chunk I against 8 n columns j < I0 of the
  // earlier rows, anchored at gc_I0, [k_i; qs_i] exp(gc_i - gc_I0) against k_j exp(gc_I0 - gc_j), every factor
  // <= 1, KK and Aqk sharing the B fragments and the A rows' exponentials: (I0, first column, n) = (48, 0, 24),
  // (48, 24, 24), (32, 0, 32), (16, 0, 16), so that every unit costs about the same.
  {
    const int warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
    // k slots t and t + 4 of step ks: channels a and a + 1 (one 4-byte load of a bf16 row), a = slot(ks)
    auto slot = [&](int ks) { return K % 32 == 0 ? 8 * t + 2 * (ks & 3) + 32 * (ks >> 2) : 8 * ks + 2 * t; };
    if (warp < 4 && !steep) {
      const int i0 = 16 * warp;
      const bf16_t *kr = kh + (i0 + g) * pl, *qr = qh + (i0 + g) * pl;  // rows i0 + g, + 8 at + 8 pl
      const float *gr = gc + (i0 + g) * ld, *g4 = gc + (i0 + 4) * ld, *g8 = gc + (i0 + 8) * ld;
      const float *g12 = gc + (i0 + 12) * ld;
      // top-left (rows g), bottom-right and bottom-left (rows g + 8), of KK and of Aqk
      float kx[4] = {}, ky[4] = {}, kz[4] = {}, qx[4] = {}, qy[4] = {}, qz[4] = {};
      for (int ks = 0; ks < K / 8; ks++) {
        unsigned kax[4], kaz[4], qax[4], qaz[4];
        float bx[2], by[2], bz[2];
        const int a0 = slot(ks);
        const unsigned kw = bf2(kr + a0), kw8 = bf2(kr + 8 * pl + a0), qw = bf2(qr + a0), qw8 = bf2(qr + 8 * pl + a0);
#pragma unroll
        for (int hk = 0; hk < 2; hk++) {  // k slot t + 4 hk: channel a0 + hk
          const int a = a0 + hk;
          const float lo = gr[a], hi = gr[8 * ld + a];  // gc of rows i0 + g and i0 + g + 8
          const float k_lo = hk ? bf_hi(kw) : bf_lo(kw), k_hi = hk ? bf_hi(kw8) : bf_lo(kw8);
          const float q_lo = scale * (hk ? bf_hi(qw) : bf_lo(qw)), q_hi = scale * (hk ? bf_hi(qw8) : bf_lo(qw8));
          const float ex = exp_ftz(lo - g4[a]), ey = exp_ftz(hi - g12[a]), ez = exp_ftz(hi - g8[a]);
          kax[2 * hk] = tf32_bits(k_lo * ex), kax[2 * hk + 1] = tf32_bits(k_hi * ey);
          qax[2 * hk] = tf32_bits(q_lo * ex), qax[2 * hk + 1] = tf32_bits(q_hi * ey);
          kaz[2 * hk] = qaz[2 * hk] = 0u;
          kaz[2 * hk + 1] = tf32_bits(k_hi * ez), qaz[2 * hk + 1] = tf32_bits(q_hi * ez);
          bx[hk] = round_tf32(k_lo * exp_ftz(g4[a] - lo));
          by[hk] = round_tf32(k_hi * exp_ftz(g12[a] - hi));
          bz[hk] = round_tf32(k_lo * exp_ftz(g8[a] - lo));
        }
        mma_tf32(kx, kax, bx[0], bx[1]);
        mma_tf32(ky, kax, by[0], by[1]);
        mma_tf32(kz, kaz, bz[0], bz[1]);
        mma_tf32(qx, qax, bx[0], bx[1]);
        mma_tf32(qy, qax, by[0], by[1]);
        mma_tf32(qz, qaz, bz[0], bz[1]);
      }
      auto put = [&](int i, int j, float xk, float xq) {
        if (j > i) return;
        const bool same = seg[i] == seg[j];
        AQ[i * CH + j] = __float2bfloat16(same ? xq : 0.0f);
        kks[i * CH + j] = same && j < i ? xk : 0.0f;
      };
#pragma unroll
      for (int u = 0; u < 2; u++) {
        put(i0 + g, i0 + 2 * t + u, kx[u], qx[u]);
        put(i0 + 8 + g, i0 + 8 + 2 * t + u, ky[2 + u], qy[2 + u]);
        put(i0 + 8 + g, i0 + 2 * t + u, kz[2 + u], qz[2 + u]);
      }
    } else if (warp >= 4) {
      const int u = warp - 4, I0 = u < 2 ? 48 : u == 2 ? 32 : 16, n0 = u == 1 ? 24 : 0;
      const int nn = u < 2 ? 3 : u == 2 ? 4 : 2;  // (warp-uniform) 8-column tiles n0 + 8 nt, nt < nn
      const bf16_t *kr = kh + (I0 + g) * pl, *qr = qh + (I0 + g) * pl, *kc = kh + (n0 + g) * pl;
      const float *gr = gc + (I0 + g) * ld, *gj = gc + (n0 + g) * ld, *an = gc + I0 * ld;
      float ck[4][4] = {}, cq[4][4] = {};
      for (int ks = 0; ks < K / 8; ks++) {
        unsigned ak[4], aq[4];
        float bk[4][2];
        const int a0 = slot(ks);
        const unsigned kw = bf2(kr + a0), kw8 = bf2(kr + 8 * pl + a0), qw = bf2(qr + a0), qw8 = bf2(qr + 8 * pl + a0);
        unsigned cw[4];
        auto half = [](unsigned w, int hk) { return hk ? bf_hi(w) : bf_lo(w); };
#pragma unroll
        for (int nt = 0; nt < 4; nt++) cw[nt] = nt < nn ? bf2(kc + 8 * nt * pl + a0) : 0u;
#pragma unroll
        for (int hk = 0; hk < 2; hk++) {  // k slot t + 4 hk: channel a0 + hk
          const int a = a0 + hk;
          const float e_lo = exp_ftz(gr[a] - an[a]), e_hi = exp_ftz(gr[8 * ld + a] - an[a]);
          ak[2 * hk] = tf32_bits(half(kw, hk) * e_lo);
          ak[2 * hk + 1] = tf32_bits(half(kw8, hk) * e_hi);
          aq[2 * hk] = tf32_bits(scale * half(qw, hk) * e_lo);
          aq[2 * hk + 1] = tf32_bits(scale * half(qw8, hk) * e_hi);
#pragma unroll
          for (int nt = 0; nt < 4; nt++)
            if (nt < nn) bk[nt][hk] = round_tf32(half(cw[nt], hk) * exp_ftz(an[a] - gj[8 * nt * ld + a]));
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
          if (nt >= nn) continue;
          mma_tf32(ck[nt], ak, bk[nt][0], bk[nt][1]);
          mma_tf32(cq[nt], aq, bk[nt][0], bk[nt][1]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; nt++) {
        if (nt >= nn) continue;
#pragma unroll
        for (int r = 0; r < 4; r++) {
          const int i = I0 + g + 8 * (r >> 1), j = n0 + 8 * nt + 2 * t + (r & 1);
          const bool same = seg[i] == seg[j];
          kks[i * CH + j] = same ? ck[nt][r] : 0.0f;
          AQ[i * CH + j] = __float2bfloat16(same ? cq[nt][r] : 0.0f);
        }
      }
    }
  }
  __syncthreads();
  float *KKg = sc.KK + (size_t)ch * CH * CH;
  for (int e = tid; e < CH * CH / 4; e += NT) ((float4 *)KKg)[e] = ((const float4 *)kks)[e];
  // qg, kl, el.
  // (bf16, two channels a store)
  __nv_bfloat162 *QG = (__nv_bfloat162 *)(sc.QG + (size_t)ch * CH * K);
  __nv_bfloat162 *KL = (__nv_bfloat162 *)(sc.KL + (size_t)ch * CH * K);
  const int last = seg[CH - 1];
  {
    // thread: channels a, a + 1 of rows i0, i0 + step, .. (threads past step rows' pairs idle)
    const int pr = K / 2, step = NT / pr, a = 2 * (tid % pr);
    const float gl0 = gc[(CH - 1) * ld + a], gl1 = gc[(CH - 1) * ld + a + 1];
    if (tid < step * pr) {
      for (int i = tid / pr; i < CH; i += step) {
        const float gi0 = gc[i * ld + a], gi1 = gc[i * ld + a + 1];
        const float2 qv = __bfloat1622float2(*(const __nv_bfloat162 *)(qh + i * pl + a));
        const float2 kv = __bfloat1622float2(*(const __nv_bfloat162 *)(kh + i * pl + a));
        const bool in_q = seg[i] == 0, in_k = seg[i] == last;
        const float q0 = exp_ftz(gi0) * (scale * qv.x), q1 = exp_ftz(gi1) * (scale * qv.y);
        const float k0 = exp_ftz(gl0 - gi0) * kv.x, k1 = exp_ftz(gl1 - gi1) * kv.y;
        QG[i * pr + a / 2] = __floats2bfloat162_rn(in_q ? q0 : 0.0f, in_q ? q1 : 0.0f);
        KL[i * pr + a / 2] = __floats2bfloat162_rn(in_k ? k0 : 0.0f, in_k ? k1 : 0.0f);
      }
    }
  }
  if (tid < K) sc.EL[(size_t)ch * K + tid] = last == 0 ? exp_ftz(gc[(CH - 1) * ld + tid]) : 0.0f;
  // M = (I + diag(beta) KK)^-1 (unit lower triangular) in 16-row blocks, into Ms over q (free from here on):
  // the diagonal blocks D_I by forward substitution, one column per thread; then the blocks below them,
  // M_IJ = -D_I sum_{J <= P < I} diag(beta_I) KK_IP M_PJ, which need only column block J's earlier blocks:
  // warp J (< 3) builds column block J top to bottom on its own (no block barrier between the rows).
  // v's rows (bf16, 16 bytes a load) are loaded now and stored over KK once M is built.
  uint4 vx[4];
  const int vrow = V / 8;
  const bf16_t *vb = v + AT(b, t0, h, V);
#pragma unroll
  for (int u = 0; u < 4; u++) {
    const int e = tid + u * NT, i = e / vrow;
    vx[u] = make_uint4(0u, 0u, 0u, 0u);
    if (e < CH * vrow && t0 + i < T) vx[u] = __ldg((const uint4 *)(vb + i * ((size_t)H * V) + (e % vrow) * 8));
  }
  __syncthreads();  // every thread is past its reads of q
  float *Ms = (float *)qh;  // (64, 65): 64 * 65 floats = 64 * QK_PITCH(128) bf16 at K = 128, less otherwise
  const int lm = CH + 1;
  if (tid < CH) {
    const int j = tid, j0 = j & ~15;
    for (int i = 0; i < j0; i++) Ms[i * lm + j] = 0.0f;
    float x[16];
#pragma unroll
    for (int r = 0; r < 16; r++) {
      const int i = j0 + r;
      float s = i == j ? 1.0f : 0.0f;
      if (i > j) {
#pragma unroll
        for (int m = 0; m < r; m++)
          if (j0 + m >= j) s = fmaf(-beta[i] * kks[i * CH + j0 + m], x[m], s);
      }
      x[r] = i >= j ? s : 0.0f;
      Ms[i * lm + j] = x[r];
    }
  }
  __syncthreads();
  if (tid < 96) {
    // Transposed, so that one product's accumulator tiles are the next one's A fragments (k order 2t, 2t + 1):
    // T^T = sum_P M_PJ^T (diag(beta_I) KK_IP)^T (16 j x 16 i), then M_IJ^T = -T^T D_I^T, on the tensor cores in
    // 3xTF32 (M is an fp32 quantity: see the design note).
    const int J0 = 16 * (tid >> 5), g = (tid & 31) >> 2, t = tid & 3;
    for (int I0 = J0 + 16; I0 < CH; I0 += 16) {
      float tt[2][4] = {}, mt[2][4] = {};  // T^T, then M_IJ^T: i columns I0 + 8 nt + ..
      for (int p0 = J0; p0 < I0; p0 += 8) {
        const float *m0 = Ms + (p0 + t) * lm + J0 + g, *m4 = m0 + 4 * lm;  // M[p][j], rows p0 + t, + 4
        const float a[4] = {m0[0], m0[8], m4[0], m4[8]};
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
          const int i = I0 + 8 * nt + g;
          mma_3xtf32(tt[nt], a, beta[i] * kks[i * CH + p0 + t], beta[i] * kks[i * CH + p0 + t + 4]);
        }
      }
#pragma unroll
      for (int kt = 0; kt < 2; kt++) {
        const float a[4] = {-tt[kt][0], -tt[kt][2], -tt[kt][1], -tt[kt][3]};
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
          const float *d = Ms + (I0 + 8 * nt + g) * lm + I0 + 8 * kt + 2 * t;  // D_I[i'][i], i = .. 2t, 2t + 1
          mma_3xtf32(mt[nt], a, d[0], d[1]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
        float *o = Ms + (I0 + 8 * nt + 2 * t) * lm + J0 + g;  // M[i'][j], i' = .. 2t, 2t + 1, j = g, g + 8
        o[0] = mt[nt][0], o[lm] = mt[nt][1], o[8] = mt[nt][2], o[lm + 8] = mt[nt][3];
      }
      __syncwarp();
    }
  }
  __syncthreads();
  bf16_t *vh = (bf16_t *)kks;  // (64, V + 2): at most 64 * 130 bf16 = 64 * 65 floats
  const int pv = V + 2;
  // M rounded to tf32 in place: both its readers take it as tf32 operands (W | U below, M^T in the WY backward).
  for (int e = tid; e < CH * CH; e += NT) {
    float *m = Ms + (e >> 6) * lm + (e & 63);
    *m = round_tf32(*m);
  }
#pragma unroll
  for (int u = 0; u < 4; u++) {
    const int e = tid + u * NT;
    if (e < CH * vrow) {
      unsigned *d = (unsigned *)(vh + (e / vrow) * pv + (e % vrow) * 8);
      d[0] = vx[u].x, d[1] = vx[u].y, d[2] = vx[u].z, d[3] = vx[u].w;
    }
  }
  __syncthreads();
  // M^T for the backward's Y = M^T dX.
  float *MT = sc.MT + (size_t)ch * CH * CH;
  for (int e = tid; e < CH * CH / 4; e += NT) {  // M^T[j][i .. i + 3] = M[i .. i + 3][j]
    const float *m = Ms + 4 * (e & 15) * lm + (e >> 4);
    ((float4 *)MT)[e] = make_float4(m[0], m[lm], m[2 * lm], m[3 * lm]);
  }
  // (W | U) = M diag(beta) (eg K | V) on the tensor cores, fragments straight from shared memory: warp w owns the
  // 8-column tiles w, w + 8, w + 16, w + 24 (two of W, two of U at K = V = 128); k slot t (+ 4) of step s takes
  // row r = 8 t + c % 8 + 32 (c / 8), c = 2 s (+ 1), so that the reads of Ms (pitch 65) and gc hit 32 banks.
  {
    const int t = tid & 3, nn = (K + V) / 8;
    float acc[4][4][4] = {};  // (row tile mt, column tile w + 8 nt, fragment element)
    auto rhs = [&](int r, int n) {  // beta_r (eg_r k_r | v_r)[n]
      if (n < K) return seg[r] == 0 ? beta[r] * exp_ftz(gc[r * ld + n]) * bf(kh + r * pl + n) : 0.0f;
      return beta[r] * bf(vh + r * pv + n - K);
    };
#pragma unroll 2
    for (int ks = 0; ks < CH / 8; ks++) {
      int r[2];
#pragma unroll
      for (int hk = 0; hk < 2; hk++) {
        const int c = 2 * ks + hk;
        r[hk] = 8 * t + (c & 7) + 32 * (c >> 3);
      }
      column_tiles_step(acc, Ms, lm, r[0], r[1], nn, rhs);
    }
    bf16_t *Wc = sc.W + (size_t)ch * CH * K, *Uc = sc.U + (size_t)ch * CH * V;
    column_tiles_store(acc, nn, Wc, K, Uc, V);
  }
}

// ---------------------------------------------------------------------------------------------------------
// A warp's accumulator tiles X[j] (j < n) against a row-major array p of row pitch V, as the state passes hold
// S^T (their 16 state columns from v0; tile j: rows 8 j .. 8 j + 7 of the (K, V) state) and a chunk's U^T, Vp^T
// (tile j: rows 8 j .. of its (64, V) rows): element r of tile j is p[(8 j + 2 t + (r & 1)) V + v0 + g + 8 (r >> 1)].
// (from fp32: the initial state; from bf16: U)
static __device__ __forceinline__ float load_elem(const float *p) { return __ldg(p); }
static __device__ __forceinline__ float load_elem(const bf16_t *p) { return __bfloat162float(__ldg(p)); }
template <int N, class E>
static __device__ __forceinline__ void tiles_load(float (&X)[N][4], const E *p, int n, int V, int v0) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const E *q = p + 2 * t * V + v0 + g;  // element 0 of the thread's first tile
#pragma unroll
  for (int j = 0; j < N; j++)
#pragma unroll
    for (int r = 0; r < 4; r++) X[j][r] = j < n ? load_elem(q + (8 * j + (r & 1)) * V + 8 * (r >> 1)) : 0.0f;
}
// (into fp32: the final state; into bf16, rounded to nearest even: the saved S0, Vp, dS', dVp)
static __device__ __forceinline__ void store_elem(float *p, float x) { *p = x; }
static __device__ __forceinline__ void store_elem(bf16_t *p, float x) { *p = __float2bfloat16(x); }
template <int N, class E>
static __device__ __forceinline__ void tiles_store(E *p, const float (&X)[N][4], int n, int V, int v0) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  E *q = p + 2 * t * V + v0 + g;
#pragma unroll
  for (int j = 0; j < N; j++)
#pragma unroll
    for (int r = 0; r < 4; r++)
      if (j < n) store_elem(q + (8 * j + (r & 1)) * V + 8 * (r >> 1), X[j][r]);
}
// S^T <- S^T diag(el): tile j's columns are the state rows 8 j + 2 t and 8 j + 2 t + 1.
static __device__ __forceinline__ void decay_tiles(float (&S)[16][4], const float *els, int KT) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int j = 0; j < 16; j++)
    if (j < KT) {
      const float e0 = els[8 * j + 2 * t], e1 = els[8 * j + 2 * t + 1];
      S[j][0] *= e0, S[j][1] *= e1, S[j][2] *= e0, S[j][3] *= e1;
    }
}
// The state passes' operands W, QG, KL, Aqk are bf16 tiles in shared memory with a row pitch of K + 8 (Aqk: 72)
// elements, an odd multiple of 16 bytes, so that the eight rows of an ldmatrix phase hit 32 banks; every product
// is mma.sync m16n8k16 on bf16 (fp32 accumulated), its A fragments the warp's accumulator tiles rounded to bf16
// (acc_to_a_bf16) or dO^T by ldmatrix .trans, its B fragments by ldmatrix: two n-tiles (16 n) of a 16-deep step a
// load. Lane l's row and column offsets (bench/dev/emulate_bf16_passes.py checks them): (nrow, ncol) for a B stored
// n-major (rows n, k contiguous: W, QG, Aqk as the forward reads them; KL in the backward's dS^T KL^T), matrices
// (n-tile 0, k 0-7), (0, 8-15), (1, 0-7), (1, 8-15), and by .trans for dO^T (stored k-major: rows i, columns v),
// matrices (rows i 0-7, v 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15), its A fragment; (krow, kcol) for a B
// stored k-major (rows k: KL in the forward's update; Aqk, QG, W in the backward's dO^T Aqk, dO^T QG, dVp^T W),
// by .trans, matrices (k 0-7, n-tile 0), (k 8-15, 0), (0-7, 1), (8-15, 1).
struct LdsmLanes {
  int nrow, ncol, krow, kcol;
  __device__ LdsmLanes() {
    const int lane = threadIdx.x & 31, lr = lane & 7, lm = lane >> 3;
    nrow = lr + 8 * (lm >> 1), ncol = 8 * (lm & 1);
    krow = lr + 8 * (lm & 1), kcol = 8 * (lm >> 1);
  }
};
// The forward state passes' update once the chunk's products have read S: S^T <- S^T diag(el) + Vp^T KL, with
// Vp^T's A fragments va (four 16-row steps of the chunk) and KL (64 x K, pitch pk, k-major) in shared memory as B.
static __device__ __forceinline__ void update_state(float (&S)[16][4], const unsigned (&va)[4][4], const bf16_t *KLs,
                                                    int pk, const float *els, int KT, const LdsmLanes &L) {
  decay_tiles(S, els, KT);
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
#pragma unroll
    for (int np = 0; np < 8; np++)
      if (2 * np < KT) {
        unsigned b[4];
        ldsm_x4_t(b, KLs + (16 * kk + L.krow) * pk + 16 * np + L.kcol);
        mma_pair(S[2 * np], S[2 * np + 1], va[kk], b);
      }
}

// Forward state pass on the tensor cores: one block per (b, h, slice of 16 NW state columns), warp w owning
// columns v0 = col0 + 16 w .. v0 + 15, chunks in order. The warp keeps S^T (its 16 columns x K) in
// registers as K / 8 accumulator tiles; per chunk (all products bf16 in, fp32 accumulated):
//   Vp^T = U^T - S^T W^T                     (16 x 64; S^T's tiles are the A fragments)
//   O^T  = S^T QG^T + Vp^T Aqk^T             (16 x 64; only with out)
//   S^T  = S^T diag(el) + Vp^T KL            (16 x K; Vp^T's tiles are the A fragments)
// W, QG, KL, Aqk (bf16, written so by the intra kernel) come into shared memory by cp.async, staggered: W and
// QG of the next chunk load while this chunk's Aqk and KL products run, and the other way round. Writes the
// output (if out), the final state (if final_state), and with save the state entering each chunk (S0) and Vp
// for the backward (bf16).
template <int NW, int KVS>
static __global__ void __launch_bounds__(32 * NW) kda_state_kernel(bf16_t *out, float *final_state, Scratch sc,
                                                                   bool save, const float *initial_state, int T,
                                                                   int H, int K_, int V_, int NC, int c_begin, int c_end) {
  const int K = KVS ? KVS : K_, V = KVS ? KVS : V_;
  extern __shared__ __align__(128) float smem[];
  const int pk = K + 8, pa = CH + 8, KT = K / 8;
  bf16_t *Ws = (bf16_t *)smem, *QGs = Ws + CH * pk, *KLs = QGs + CH * pk, *AQs = KLs + CH * pk;
  float *els = (float *)(AQs + CH * pa);
  const int slices = V / (16 * NW), slice = blockIdx.x % slices, bh = blockIdx.x / slices, b = bh / H, h = bh % H;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, v0 = slice * 16 * NW + 16 * (threadIdx.x >> 5);
  const bool with_out = out != NULL;
  const LdsmLanes L;
  float S[16][4] = {};  // S^T tile j: columns a = 8 j .. 8 j + 7 of the state's rows
  if (initial_state) tiles_load(S, initial_state + (size_t)bh * K * V, KT, V, v0);
  auto load_wq = [&](size_t ch) {
    tile_async<32 * NW>(Ws, pk, sc.W + ch * CH * K, CH, K);
    if (with_out) tile_async<32 * NW>(QGs, pk, sc.QG + ch * CH * K, CH, K);
    cp_async_commit();
  };
  load_wq((size_t)bh * NC + c_begin);
  for (int c = c_begin; c < c_end; c++) {
    const size_t ch = (size_t)bh * NC + c;
    float u[8][4];  // U^T tiles of this chunk, in flight during the first products
    tiles_load(u, sc.U + ch * CH * V, 8, V, v0);
    cp_async_wait_all();
    __syncthreads();
    tile_async<32 * NW>(KLs, pk, sc.KL + ch * CH * K, CH, K);
    if (with_out) tile_async<32 * NW>(AQs, pa, sc.AQ + ch * CH * CH, CH, CH);
    tile_async<32 * NW>(els, K, sc.EL + ch * K, 1, K);
    cp_async_commit();
    if (save) tiles_store(sc.S0 + ch * K * V, S, KT, V, v0);
    float P[8][4], O[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) P[n][r] = O[n][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
      if (2 * kk >= KT) break;
      unsigned a[4];
      acc_to_a_bf16(a, S[2 * kk], S[2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < 4; np++) {
        const int o = (16 * np + L.nrow) * pk + 16 * kk + L.ncol;
        unsigned w[4];
        ldsm_x4(w, Ws + o);
        mma_pair(P[2 * np], P[2 * np + 1], a, w);
        if (with_out) {
          ldsm_x4(w, QGs + o);
          mma_pair(O[2 * np], O[2 * np + 1], a, w);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) u[n][r] -= P[n][r];  // u is now Vp^T
    if (save) tiles_store(sc.VP + ch * CH * V, u, 8, V, v0);
    unsigned va[4][4];  // Vp^T's A fragments for Aqk and the update
#pragma unroll
    for (int kk = 0; kk < 4; kk++) acc_to_a_bf16(va[kk], u[2 * kk], u[2 * kk + 1]);
    cp_async_wait_all();
    __syncthreads();  // KL, Aqk, el are in; W and QG are free
    if (c + 1 < c_end) load_wq(ch + 1);
    if (with_out) {
#pragma unroll
      for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int np = 0; np < 4; np++) {
          unsigned x[4];
          ldsm_x4(x, AQs + (16 * np + L.nrow) * pa + 16 * kk + L.ncol);
          mma_pair(O[2 * np], O[2 * np + 1], va[kk], x);
        }
      const size_t row = (size_t)H * V;
      size_t o = AT(b, c * CH + 2 * t, h, V) + v0 + g;  // rows c CH + 8 n + 2 t (+ 1), column v0 + g
      const int rows = T - (c * CH + 2 * t);
#pragma unroll
      for (int n = 0; n < 8; n++, o += 8 * row)
#pragma unroll
        for (int r = 0; r < 4; r++)
          if (8 * n + (r & 1) < rows) out[o + (r & 1) * row + 8 * (r >> 1)] = __float2bfloat16(O[n][r]);
    }
    update_state(S, va, KLs, pk, els, KT, L);
  }
  if (final_state) tiles_store(final_state + (size_t)bh * K * V, S, KT, V, v0);
}

// Forward state pass without the output (the backward's recomputation of what a forward without `saved` did not
// keep): per chunk only Vp^T = U^T - S^T W^T and S^T = S^T diag(el) + Vp^T KL, so W, KL and el fit twice
// in shared memory (about 70 KB at K = 128) and the next chunk's load into the other half of the ring while this
// chunk's products run: one barrier a chunk and a whole chunk's time for the loads to land (kda_state_kernel,
// with QG and Aqk as well, has two, each load hidden behind half a chunk). Layout and fragments as there.
template <int NW, int KVS>
static __global__ void __launch_bounds__(32 * NW) kda_state_ring_kernel(float *final_state, Scratch sc, bool save,
                                                                        const float *initial_state, int H, int K_,
                                                                        int V_, int NC, int c_begin, int c_end) {
  const int K = KVS ? KVS : K_, V = KVS ? KVS : V_;
  extern __shared__ __align__(128) float smem[];
  const int pk = K + 8, KT = K / 8, stage = CH * pk + K;  // (floats: W and KL bf16, el)
  const int slices = V / (16 * NW), slice = blockIdx.x % slices, bh = blockIdx.x / slices;
  const int v0 = slice * 16 * NW + 16 * (threadIdx.x >> 5);
  const LdsmLanes L;
  float S[16][4] = {};  // S^T tile j: columns a = 8 j .. 8 j + 7 of the state's rows
  if (initial_state) tiles_load(S, initial_state + (size_t)bh * K * V, KT, V, v0);
  auto load = [&](int c) {  // W, KL, el of chunk c into ring stage c % 2
    bf16_t *st = (bf16_t *)(smem + (c & 1) * stage);
    const size_t ch = (size_t)bh * NC + c;
    tile_async<32 * NW>(st, pk, sc.W + ch * CH * K, CH, K);
    tile_async<32 * NW>(st + CH * pk, pk, sc.KL + ch * CH * K, CH, K);
    tile_async<32 * NW>((float *)(st + 2 * CH * pk), K, sc.EL + ch * K, 1, K);
    cp_async_commit();
  };
  load(c_begin);
  for (int c = c_begin; c < c_end; c++) {
    const size_t ch = (size_t)bh * NC + c;
    const bf16_t *Ws = (const bf16_t *)(smem + (c & 1) * stage), *KLs = Ws + CH * pk;
    const float *els = (const float *)(KLs + CH * pk);
    float u[8][4];  // U^T tiles of this chunk, in flight during the first products
    tiles_load(u, sc.U + ch * CH * V, 8, V, v0);
    cp_async_wait_all();
    __syncthreads();  // chunk c's stage is in; every warp is done with the other (chunk c - 1's)
    if (c + 1 < c_end) load(c + 1);
    if (save) tiles_store(sc.S0 + ch * K * V, S, KT, V, v0);
    float P[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) P[n][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
      if (2 * kk >= KT) break;
      unsigned a[4];
      acc_to_a_bf16(a, S[2 * kk], S[2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < 4; np++) {
        unsigned w[4];
        ldsm_x4(w, Ws + (16 * np + L.nrow) * pk + 16 * kk + L.ncol);
        mma_pair(P[2 * np], P[2 * np + 1], a, w);
      }
    }
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) u[n][r] -= P[n][r];  // u is now Vp^T
    if (save) tiles_store(sc.VP + ch * CH * V, u, 8, V, v0);
    unsigned va[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; kk++) acc_to_a_bf16(va[kk], u[2 * kk], u[2 * kk + 1]);
    update_state(S, va, KLs, pk, els, KT, L);
  }
  if (final_state) tiles_store(final_state + (size_t)bh * K * V, S, KT, V, v0);
}

// ---------------------------------------------------------------------------------------------------------
// Backward state pass on the tensor cores: chunks in reverse, the warp keeping dS^T (the gradient of the
// state leaving the chunk, its 16 columns x K) in registers; per chunk:
//   dVp^T = dO^T Aqk + dS^T KL^T                       (16 x 64)
//   dS^T  = dS^T diag(el) + dO^T QG - dVp^T W          (16 x K)
// dO^T (bf16) comes into shared memory with Aqk and KL, and from there into A fragments by ldmatrix .trans.
// Saves dS (as DS, before the update) and dVp per chunk (bf16); Aqk, KL and dO of the next (earlier) chunk load
// during the QG and W products, QG and W during the Aqk and KL products.
template <int NW, int KVS>
static __global__ void __launch_bounds__(32 * NW) kda_state_backward_kernel(float *dinitial_state, Scratch sc,
                                                                            const bf16_t *dout,
                                                                            const float *dfinal_state, int T, int H,
                                                                            int K_, int V_, int NC, int c_begin, int c_end) {
  const int K = KVS ? KVS : K_, V = KVS ? KVS : V_;
  extern __shared__ __align__(128) float smem[];
  const int pk = K + 8, pa = CH + 8, KT = K / 8;
  bf16_t *KLs = (bf16_t *)smem, *QGs = KLs + CH * pk, *Ws = QGs + CH * pk, *AQs = Ws + CH * pk;
  float *els = (float *)(AQs + CH * pa);
  const int slices = V / (16 * NW), slice = blockIdx.x % slices, bh = blockIdx.x / slices, b = bh / H, h = bh % H;
  const int v0 = slice * 16 * NW + 16 * (threadIdx.x >> 5);
  const LdsmLanes L;
  float dS[16][4] = {};
  if (dfinal_state) tiles_load(dS, dfinal_state + (size_t)bh * K * V, KT, V, v0);
  // dO of the chunk (its 64 rows, the block's 16 NW columns, bf16) comes with Aqk and KL; the row pitch's 16
  // bytes of padding make the ldmatrix phases conflict-free.
  const int dop = 16 * NW + 8;
  bf16_t *DOs = (bf16_t *)(els + K);
  auto load_ak = [&](int c) {
    const size_t ch = (size_t)bh * NC + c;
    tile_async<32 * NW>(AQs, pa, sc.AQ + ch * CH * CH, CH, CH);
    tile_async<32 * NW>(KLs, pk, sc.KL + ch * CH * K, CH, K);
    tile_async<32 * NW>(els, K, sc.EL + ch * K, 1, K);
    // 16-byte pieces, 2 NW a row: thread x copies piece x % (2 NW) of rows x / (2 NW) + 16 i (zeros past T)
    const int r0 = threadIdx.x / (2 * NW), c8 = (threadIdx.x % (2 * NW)) * 8;
    const bf16_t *src = dout + AT(b, c * CH + r0, h, V) + slice * 16 * NW + c8;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const bool in = c * CH + r0 + 16 * i < T;
      cp_async16z(DOs + (r0 + 16 * i) * dop + c8, in ? src + (size_t)16 * i * H * V : dout, in);
    }
    cp_async_commit();
  };
  load_ak(c_end - 1);
  const bf16_t *dOw = DOs + 16 * (threadIdx.x >> 5);  // this warp's 16 columns
  for (int c = c_end - 1; c >= c_begin; c--) {
    const size_t ch = (size_t)bh * NC + c;
    cp_async_wait_all();
    __syncthreads();
    unsigned dOa[4][4];  // dO^T (16 columns x the chunk's 64 rows) as A fragments, four 16-row steps
#pragma unroll
    for (int kk = 0; kk < 4; kk++) ldsm_x4_t(dOa[kk], dOw + (16 * kk + L.nrow) * dop + L.ncol);
    tile_async<32 * NW>(QGs, pk, sc.QG + ch * CH * K, CH, K);
    tile_async<32 * NW>(Ws, pk, sc.W + ch * CH * K, CH, K);
    cp_async_commit();
    tiles_store(sc.DS + ch * K * V, dS, KT, V, v0);
    float dVp[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int r = 0; r < 4; r++) dVp[n][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
      for (int np = 0; np < 4; np++) {
        unsigned x[4];
        ldsm_x4_t(x, AQs + (16 * kk + L.krow) * pa + 16 * np + L.kcol);
        mma_pair(dVp[2 * np], dVp[2 * np + 1], dOa[kk], x);
      }
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
      if (2 * kk >= KT) break;
      unsigned a[4];
      acc_to_a_bf16(a, dS[2 * kk], dS[2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < 4; np++) {
        unsigned x[4];
        ldsm_x4(x, KLs + (16 * np + L.nrow) * pk + 16 * kk + L.ncol);
        mma_pair(dVp[2 * np], dVp[2 * np + 1], a, x);
      }
    }
    tiles_store(sc.DVP + ch * CH * V, dVp, 8, V, v0);
    decay_tiles(dS, els, KT);
    cp_async_wait_all();
    __syncthreads();  // QG, W are in; Aqk, KL, el are free
    if (c > c_begin) load_ak(c - 1);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      unsigned a[4];
      acc_to_a_bf16(a, dVp[2 * kk], dVp[2 * kk + 1], true);
#pragma unroll
      for (int np = 0; np < 8; np++)
        if (2 * np < KT) {
          const int o = (16 * kk + L.krow) * pk + 16 * np + L.kcol;
          unsigned x[4];
          ldsm_x4_t(x, QGs + o);
          mma_pair(dS[2 * np], dS[2 * np + 1], dOa[kk], x);
          ldsm_x4_t(x, Ws + o);
          mma_pair(dS[2 * np], dS[2 * np + 1], a, x);
        }
    }
  }
  if (dinitial_state) tiles_store(dinitial_state + (size_t)bh * K * V, dS, KT, V, v0);
}
// ---------------------------------------------------------------------------------------------------------
// WY / UT backward, one block per chunk: the non-pairwise parts of dq and dk into PDQ (through qg), PDK (through
// kl) and PDK2 (through the UT transform's eg k), the gate gradient that reaches gc_last through el into DGL (the
// pairwise kernel derives the rest of dg from these and q, k); dL and dAqk (masked) into DL, DA; dv, dbeta final.
// 8 warps and at most about 104 KB of shared memory, so that two blocks share an SM and one's
// loads (gates, state slices, panels) overlap the other's products. Two phases:
//  1. state_products (dqg, dkl, dAqk, del, and dX's k half -dVp S0^T into the per-chunk scratch DXK; dX's v half
//     is dVp, already in DVP); then M^T, beside the first two panels.
//  2. over panels of 32 columns of [k | v] (the last one 16 wide when K + V is not a multiple of 32): the panel's
//     dX, X = [W | U] (both bf16, their values exact in tf32) and raw k | v columns by cp.async (the next two
//     panels loading while this one is used), its Y = M^T dX on the tensor cores with Y's per-element work (dk's UT
//     part PDK2 = eg beta y, dv = beta y and dbeta's y . rhs, rhs = eg k | v), then dL += Y_p X_p^T, dL's 64 x 64
//     accumulators in registers across the panels; after the last panel dL's epilogue (mask, negate, DL, dbeta's
//     dL . KK).
// Shared memory, byte offsets (those past the stages at K = 128):
//        0  phase 1: the state products' three stages (3 SP_STAGE floats, 61440 B, over the panels and M^T);
//        0  phase 2: three panel buffers (WY_PANEL floats, 20480 B each): dX and X (bf16, 64 x 32, each in the
//           first half of its 8 KB), k | v (bf16, 64 x 32); the buffer after the last panel's holds KK (64 x KKP);
//    40960  M^T (64 x MTP): it loads after phase 1, beside the first two panels, into the third panel's buffer,
//           which its first use finds free (M^T's fragments are in registers by then);
//    61440  phase 2: the panel's Y (64 x 32, tf32), after the last panel dbeta's row parts (2 x 64);
//    69632  gc (64 x (K + 1)); 102656 del (K); 103168 beta, 103424 rk, 103680 seg (64 each); 103936 in all.
// The panel tiles have no pad columns: their 16-byte pieces are XOR-swizzled so that the fragment reads hit 32
// banks. Element (r, c) of Y (rows g, columns t), of k | v, dX and X (bf16, 8 to a piece; the Y epilogue's pairs
// of k | v: rows g, columns 2t; the Y product's B fragments of dX: rows t, columns g; dL's of X: rows g, columns t):
static __device__ __forceinline__ int wy_x_at(int r, int c) { return r * 32 + ((((c >> 2) ^ r) & 7) << 2) + (c & 3); }
static __device__ __forceinline__ int wy_kv_at(int r, int c) {
  return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3) + (c & 7);
}
#define KKP 72  // KK's: the dL epilogue's float2 reads (rows g, columns 2t) on 32 banks in each half warp
#define MTP 68  // M^T's: the Y product's A fragments (rows g, columns t) on 32 banks
#define WY_PANEL (CH * 32 + CH * 32 + CH * 32 / 2)
#define WY_MT (2 * WY_PANEL)  // M^T's offset: the third panel buffer
#define WY_Y (3 * WY_PANEL)   // Y's
#define WY_GC (SP_FLOATS > WY_Y + CH * 32 ? SP_FLOATS : WY_Y + CH * 32)  // gc's: past the stages and the panels
static_assert(CH * MTP <= WY_PANEL, "M^T fits in a panel buffer");
static_assert(CH * KKP <= WY_PANEL && 2 * CH <= CH * 32, "KK fits in a panel buffer, dbeta's row parts in Y's");
// Warps 2 w2 and 2 w2 + 1 (64 threads) meet at named barrier 1 + w2: the two that write and read the panel's Y
// rows 16 w2.. (barrier 0 is __syncthreads). Immediate barrier numbers, so that ptxas counts 5 barriers, not 16.
static __device__ __forceinline__ void pair_sync(int w2) {
  switch (w2) {  // (warp-uniform)
    case 0: asm volatile("bar.sync 1, 64;\n" ::: "memory"); break;
    case 1: asm volatile("bar.sync 2, 64;\n" ::: "memory"); break;
    case 2: asm volatile("bar.sync 3, 64;\n" ::: "memory"); break;
    default: asm volatile("bar.sync 4, 64;\n" ::: "memory"); break;
  }
}
template <int KS, int VS>
static __global__ void __launch_bounds__(NT, 2) kda_wy_backward_kernel(bf16_t *dv, float *dbeta, Scratch sc,
                                                                       const bf16_t *dout, const bf16_t *k,
                                                                       const bf16_t *v, const float *g,
                                                                       const float *beta_in,
                                                                       const unsigned char *doc_start, int T, int H,
                                                                       int K_, int V_, int NC, int c_begin,
                                                                       int c_end) {
  const int K = KS ? KS : K_, V = VS ? VS : V_;
  extern __shared__ __align__(128) float smem[];
  const int ld = K + 1, KV = K + V;
  float *stages = smem, *panels = smem, *Yp = smem + WY_Y, *mts = smem + WY_MT, *gc = smem + WY_GC;
  float *delS = gc + CH * ld, *beta = delS + K, *rk = beta + CH;
  int *seg = (int *)(rk + CH);
  // one block per chunk of the range [c_begin, c_end) of every (b, h)
  const int nr = c_end - c_begin, bh = blockIdx.x / nr, c = c_begin + blockIdx.x % nr, ch = bh * NC + c;
  const int b = bh / H, h = bh % H, t0 = c * CH, tid = threadIdx.x;
  const size_t cK = (size_t)ch * CH * K, cV = (size_t)ch * CH * V, cS = (size_t)ch * K * V, cC = (size_t)ch * CH * CH;
  if (tid < CH) rk[tid] = __ldg(sc.RK + (size_t)ch * CH + tid);  // k arrives raw: normalized where it is read
  load_gates(gc, ld, beta, seg, g, beta_in, doc_start, b, h, t0, T, H, K);
  __syncthreads();
  const int last = seg[CH - 1];
  const bf16_t *S0 = sc.S0 + cS, *DS = sc.DS + cS, *VP = sc.VP + cV, *DVP = sc.DVP + cV;
  bf16_t *PDQ = sc.PDQ + cK, *PDK = sc.PDK + cK, *PDK2 = sc.PDK2 + cK, *DXK = sc.DXK + cK;
  // Phase 1: dqg = dO S0^T, dkl = Vp dS'^T, dX's k half = -dVp S0^T, del = rowsum(dS' * S0), dAqk = dO Vp^T
  state_products(dout, VP, DVP, S0, DS, stages, delS, b, h, t0, T, H, K, V, [&](int p, int i, int n, float x) {
    if (p == 0) PDQ[i * K + n] = __float2bfloat16(seg[i] == 0 ? exp_ftz(gc[i * ld + n]) * x : 0.0f);
    else if (p == 1)
      PDK[i * K + n] = __float2bfloat16(seg[i] == last ? exp_ftz(gc[(CH - 1) * ld + n] - gc[i * ld + n]) * x : 0.0f);
    else if (p == 2) DXK[i * K + n] = __float2bfloat16(-x);
    else sc.DA[cC + i * CH + n] = __float2bfloat16(n <= i && seg[i] == seg[n] ? x : 0.0f);  // dAqk (lower, same doc.)
  });
  // (state_products ended with a block barrier: DXK and del are visible to the whole block, the stages free.)
  // M^T (pitch MTP) into the third panel buffer, which the stages overlaid; the first panels load beside it.
  for (int e = tid; e < CH * CH / 4; e += NT) cp_async16(mts + (e >> 4) * MTP + 4 * (e & 15), sc.MT + cC + 4 * e);
  cp_async_commit();
  if (tid < K) sc.DGL[(size_t)ch * K + tid] = delS[tid] * __ldg(sc.EL + (size_t)ch * K + tid);

  // Y = M^T dX on the tensor cores and dL = Y X^T, over the panels (phase 2). Thread maps (warp w, g = lane / 4,
  // t = lane % 4, wm = w / 2, wn = w % 2):
  //   Y_p = M^T dX_p (64 x 32): warp w the 16 x 16 block rows 16 wm.., panel columns 16 wn + 8 nt.. (nt < 2),
  //     its A fragments (M^T's rows 16 wm.., all 64 columns) held in registers for all panels;
  //   dL += Y_p X_p^T (64 x 64): warp w the 16 x 32 block rows 16 wm.., columns 32 wn + 8 nt.. (nt < 4).
  // So the warp pair (2 wm, 2 wm + 1) writes Y_p's rows 16 wm.. and only that pair reads them (pair_sync), and a
  // thread's rows are the same in both, 16 wm + g + 8 hf: its dbeta parts (y . rhs, then dL . KK) sum in two
  // registers, quad shuffles, then the pair's two in shared memory.
  const int warp = tid >> 5, gq = (tid & 31) >> 2, t = tid & 3, wm = warp >> 1, wn = warp & 1;
  const bf16_t *W = sc.W + cK, *U = sc.U + cV;
  const bf16_t *kb = k + AT(b, t0, h, K), *vb = v + AT(b, t0, h, V);
  const size_t HK = (size_t)H * K, HV = (size_t)H * V;
  const int np = (KV + 31) / 32;
  // Panel p: columns c0 = 32 p .. c0 + pw - 1 of [k | v] (pw = 32, or 16 for a last one). K and V are multiples of
  // 16, so no 16-byte piece (8 bf16 columns) straddles k and v. Rows past T: k | v zeroed.
  auto width = [&](int p) { return KS && VS && (KS + VS) % 32 == 0 ? 32 : min(32, KV - 32 * p); };
  // The thread's pieces of a panel (X, k | v, dX: all bf16): e = tid + NT u < 64 pw / 8, row e / (pw / 8), columns
  // 8 (e % (pw / 8))..
  // Slot j of the three-buffer ring (buffer j % 3): panel j, or KK after the last panel (j = np), or nothing.
  auto issue_slot = [&](int j) {
    float *dxs = panels + (j % 3) * WY_PANEL, *xs = dxs + CH * 32;
    if (j == np) {  // KK (pitch KKP), for dL's epilogue
      for (int e = tid; e < CH * CH / 4; e += NT) cp_async16(dxs + (e >> 4) * KKP + 4 * (e & 15), sc.KK + cC + 4 * e);
    } else if (j < np) {
      bf16_t *kvs = (bf16_t *)(xs + CH * 32), *dxb = (bf16_t *)dxs, *xb = (bf16_t *)xs;
      const int c0 = 32 * j, pw = width(j), sh = pw == 32 ? 3 : 2;
      for (int e = tid; e < CH * pw / 8; e += NT) {
        const int i = e >> (sh - 1), cl = 8 * (e & ((1 << (sh - 1)) - 1)), a = c0 + cl;
        cp_async16(xb + wy_kv_at(i, cl), a < K ? W + i * K + a : U + i * V + (a - K));
      }
      for (int e = tid; e < CH * pw / 8; e += NT) {
        const int i = e >> (sh - 1), cl = 8 * (e & ((1 << (sh - 1)) - 1)), a = c0 + cl;
        const bool t_in = t0 + i < T;
        const int it = t_in ? i : 0;
        cp_async16z(kvs + wy_kv_at(i, cl),
                    a < K ? (const void *)(kb + it * HK + a) : (const void *)(vb + it * HV + (a - K)), t_in);
      }
      for (int e = tid; e < CH * pw / 8; e += NT) {  // (a loop of its own: merged into the one above, 12 bytes spill)
        const int i = e >> (sh - 1), cl = 8 * (e & ((1 << (sh - 1)) - 1)), a = c0 + cl;
        cp_async16(dxb + wy_kv_at(i, cl), a < K ? DXK + i * K + a : DVP + i * V + (a - K));
      }
    }
    cp_async_commit();  // (empty past KK: the group count stays the same for every thread)
  };
  issue_slot(0);
  issue_slot(1);
  cp_async_wait<2>();  // this thread's copies of M^T are there (the first two slots' may still be in flight)
  __syncthreads();
  unsigned mta[CH / 8][4];  // M^T's A fragments: rows 16 wm + gq (+ 8), columns 8 ks + t (+ 4), tf32
  {
    const float *m0 = mts + (16 * wm + gq) * MTP + t, *m8 = m0 + 8 * MTP;
#pragma unroll
    for (int ks = 0; ks < CH / 8; ks++) {
      mta[ks][0] = tf32_bits(m0[8 * ks]), mta[ks][1] = tf32_bits(m8[8 * ks]);
      mta[ks][2] = tf32_bits(m0[8 * ks + 4]), mta[ks][3] = tf32_bits(m8[8 * ks + 4]);
    }
  }
  float dacc[4][4];  // dL = Y X^T: the warp's rows 16 wm.., columns 32 wn + 8 nt..
#pragma unroll
  for (int nt = 0; nt < 4; nt++) dacc[nt][0] = dacc[nt][1] = dacc[nt][2] = dacc[nt][3] = 0.0f;
  float part[2] = {0.0f, 0.0f};  // dbeta's parts of rows 16 wm + gq + 8 hf
  bf16_t *dvb = dv + AT(b, t0, h, V);
#pragma unroll 1
  for (int p = 0; p < np; p++) {
    const int c0 = 32 * p, pw = width(p);
    const float *xs = panels + (p % 3) * WY_PANEL + CH * 32;
    const bf16_t *kvs = (const bf16_t *)(xs + CH * 32), *dxb = (const bf16_t *)(xs - CH * 32);
    const bf16_t *xb = (const bf16_t *)xs;
    cp_async_wait<1>();  // this thread's copies of panel p are there (slot p + 1's may still be in flight)
    __syncthreads();  // panel p is in place; every warp is past its reads of panel p - 1 (its buffer, Y_p) and M^T
    issue_slot(p + 2);  // into panel p - 1's buffer
    if (16 * wn < pw) {  // (warp-uniform) Y_p's block of the warp, then its per-element work
      float y[2][4] = {};
      // dX's B fragments (rows 8 ks + t (+ 4), column n): wy_kv_at(8 ks + r, n) = 256 ks + wy_kv_at(r, n) for r < 8,
      // so four base addresses serve every ks (fewer live registers than an index per ks and row).
      const bf16_t *db[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
        const int n = 16 * wn + 8 * nt + gq;
        db[nt][0] = dxb + wy_kv_at(t, n), db[nt][1] = dxb + wy_kv_at(t + 4, n);
      }
#pragma unroll
      for (int ks = 0; ks < CH / 8; ks++) {
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
          mma_tf32(y[nt], mta[ks], bf(db[nt][0] + 256 * ks), bf(db[nt][1] + 256 * ks));
      }
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
          const int i = 16 * wm + gq + 8 * hf, nl = 16 * wn + 8 * nt + 2 * t, n = c0 + nl;
          const float y0 = y[nt][2 * hf], y1 = y[nt][2 * hf + 1];
          *(float2 *)(Yp + wy_x_at(i, nl)) = make_float2(round_tf32(y0), round_tf32(y1));
          const __nv_bfloat162 r2 = *(const __nv_bfloat162 *)(kvs + wy_kv_at(i, nl));
          float r0 = __low2float(r2), r1 = __high2float(r2);
          if (n < K) {
            const float e0 = seg[i] == 0 ? exp_ftz(gc[i * ld + n]) : 0.0f;
            const float e1 = seg[i] == 0 ? exp_ftz(gc[i * ld + n + 1]) : 0.0f;
            r0 = l2norm_bf16(r0, rk[i]) * e0, r1 = l2norm_bf16(r1, rk[i]) * e1;
            *(__nv_bfloat162 *)(PDK2 + i * K + n) = __floats2bfloat162_rn(e0 * beta[i] * y0, e1 * beta[i] * y1);
          } else if (t0 + i < T) {
            *(__nv_bfloat162 *)(dvb + i * HV + (n - K)) = __floats2bfloat162_rn(beta[i] * y0, beta[i] * y1);
          }
          part[hf] = fmaf(y0, r0, fmaf(y1, r1, part[hf]));
        }
    }
    pair_sync(wm);  // Y_p's rows 16 wm.. are complete
    {
      const int r0 = 16 * wm + gq;
#pragma unroll
      for (int ks = 0; ks < 4; ks++) {
        if (8 * ks >= pw) break;
        unsigned a[4];
        a[0] = __float_as_uint(Yp[wy_x_at(r0, 8 * ks + t)]), a[1] = __float_as_uint(Yp[wy_x_at(r0 + 8, 8 * ks + t)]);
        a[2] = __float_as_uint(Yp[wy_x_at(r0, 8 * ks + t + 4)]);
        a[3] = __float_as_uint(Yp[wy_x_at(r0 + 8, 8 * ks + t + 4)]);
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
          const int r = 32 * wn + 8 * nt + gq;
          mma_tf32(dacc[nt], a, bf(xb + wy_kv_at(r, 8 * ks + t)), bf(xb + wy_kv_at(r, 8 * ks + t + 4)));
        }
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // KK is in place; every warp is past its reads of the last Y_p (its region takes the row parts)
  // dL = -Y X^T, strictly lower and same document, and dbeta's sum_j dL_ij KK_ij.
  {
    const float *kks = panels + (np % 3) * WY_PANEL;
    bf16_t *DL = sc.DL + cC;
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        const int i = 16 * wm + gq + 8 * hf, j = 32 * wn + 8 * nt + 2 * t;
        const float d0 = j < i && seg[i] == seg[j] ? -dacc[nt][2 * hf] : 0.0f;
        const float d1 = j + 1 < i && seg[i] == seg[j + 1] ? -dacc[nt][2 * hf + 1] : 0.0f;
        *(__nv_bfloat162 *)(DL + i * CH + j) = __floats2bfloat162_rn(d0, d1);
        const float2 kk = *(const float2 *)(kks + i * KKP + j);
        part[hf] = fmaf(d0, kk.x, fmaf(d1, kk.y, part[hf]));
      }
  }
  float *rowpart = Yp;  // (2, 64): the warp pair's two halves of each row
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    part[hf] += __shfl_xor_sync(0xffffffffu, part[hf], 1);
    part[hf] += __shfl_xor_sync(0xffffffffu, part[hf], 2);
    if (t == 0) rowpart[wn * CH + 16 * wm + gq + 8 * hf] = part[hf];
  }
  __syncthreads();
  // dbeta_i = Y_i . rhs_i + sum_j dL_ij KK_ij: the two halves of row i in order.
  if (tid < CH && t0 + tid < T) dbeta[((size_t)b * T + t0 + tid) * H + h] = rowpart[tid] + rowpart[CH + tid];
}

// ---------------------------------------------------------------------------------------------------------
// Pairwise backward and the gate's reverse cumulative sum, one block per chunk:
//   P_i = sum_j<i  wl_ij k_j E_ij,  Q_i = sum_j<=i dA_ij k_j E_ij,  R_i = sum_m>=i (wl_mi k_m + dA_mi q_m) E_mi
// with wl_ij = beta_i dL_ij and E_ij = exp(gc_i - gc_j); dk += P + R, dqs += Q, dgc += k P + q Q - k R.
// The pairs across 16-row sub-chunks go to the tensor cores (mma.sync tf32, fp32 accumulated, each warp building
// its fragments straight from shared memory), each exponential split at an anchor between the two rows so that
// both factors are <= 1, as in the forward:
//   sub-chunk I (rows I0 .. I0 + 15) against the rows j < I0, anchor gc_I0: (32 x I0) (I0 x K)
//     [wl; dA](I, j < I0) (k_j exp(gc_I0 - gc_j)), then times exp(gc_i - gc_I0): P and Q;
//   sub-chunk I against the rows m > I1 = I0 + 15, anchor gc_I1: (16 x 2L) (2L x K)
//     [wl^T | dA^T](I, m > I1) [k_m; q_m] exp(gc_m - gc_I1), then times exp(gc_I1 - gc_i): R.
// The pairs inside a sub-chunk on the CUDA cores: a thread takes channel a of one sub-chunk's 16 rows and its
// 120 pairs j < i, the decay of each pair one multiplication from the previous one (no exponential per pair).
// 8 warps and at most about 107 KB of shared memory (two blocks per SM, so that one block's loads and phases
// overlap the other's). The work unit is (sub-chunk s, group of 32 channels; the last group 16 wide when K is
// not a multiple of 32), unit u = 4 G + s, warp w taking the units w and w + 8 (rounds 0 and 1; 16 units at
// K = 128). For its unit a warp computes the cross-sub-chunk P, Q (s > 0) and R (s < 3) of its 16 rows and 32
// channels (4 n-tiles sharing each A fragment; n-tile nt's column x is channel cb + nt + NTG x, NTG = width / 8,
// so that the B fragments' reads of gc hit 32 banks), turns each 16 x 32 C tile around through the warp's own
// 8 x 32 buffer (two halves of 8 rows, XOR-swizzled: conflict-free both ways) so that lane L holds channel
// cb + L of the 16 rows, and then runs the in-sub-chunk pass and the per-element epilogue from registers. A
// round's results (dgc fp32; dqn, dkn bf16) stay in registers across a block barrier (every warp is past its
// reads of the round's channels of gc, q and k), then go into the thread's own elements of gc, q and k, which
// the next round does not read (other channels). After the last round: dg (its prefix sums of PDK k in wa's
// space, k read again from global memory and normalized as load_rows_l2norm did) and the norms' backward
// (normalized q, k read again from global memory, the gradients from shared memory): the same operations in the
// same order as the one-block kernel (each mma element gets the same operands in the same k slots, only in
// another column of its tile; the sums' orders kept), so dq, dk and dg are bitwise the same as its (checked on an
// H100 at K = 128 and 48, session 22).
// Shared memory, byte offsets at K = 128:
//        0  gc (64 x (K + 1) fp32); after each round, that round's channels of dgc
//    33024  wa (64 x WAP float2; dL and dA arrive raw, bf16, by cp.async); after the last round, dg's prefix sums
//           (64 x (K + 1) fp32)
//    66816  the warps' transposition buffers (8 x PBUF floats)
//    75008  beta, 75264 rq, 75520 rk (q's and k's inverse norms), 75776 seg (64 each)
//    76032  q (bf16, 64 x QK_PITCH(K), normalized); 92672 k; after each round, that round's channels of dqn, dkn
//   109312  in all.
#define WAP (CH + 2)  // wa's pitch (float2): the products' A fragments, rows g and columns t (or the reverse), on
                      // all banks (two 8-byte loads a bank at most, as for any 8-byte load of a warp)
#define PBUF 256      // a warp's transposition buffer: 8 rows x 32 channels (fp32), element (r, c) at 32 r + (c ^ r)
template <int KS>
static __global__ void __launch_bounds__(NT, 2) kda_pairwise_backward_kernel(bf16_t *dq, bf16_t *dk, float *dg,
                                                                             Scratch sc, const bf16_t *q,
                                                                             const bf16_t *k, const float *g,
                                                                             const float *beta_in,
                                                                             const unsigned char *doc_start,
                                                                             float scale, int T, int H, int K_,
                                                                             int NC, int c_begin, int c_end) {
  const int K = KS ? KS : K_;
  extern __shared__ __align__(128) float smem[];
  const int ld = K + 1, pl = QK_PITCH(K);
  float *gc = smem;
  float2 *wa = (float2 *)(gc + CH * ld);  // (wl, dA), 64 x 64 at pitch WAP, 16-byte aligned
  float *xbuf = (float *)(wa + CH * WAP);
  float *beta = xbuf + (NT / 32) * PBUF, *rq = beta + CH, *rk = rq + CH;  // rq, rk: q's and k's inverse norms
  int *seg = (int *)(rk + CH);
  bf16_t *qh = (bf16_t *)(seg + CH), *kh = qh + CH * pl;
  // one block per chunk of the range [c_begin, c_end) of every (b, h)
  // (b, h, t0, ch are set again after the rounds from a fresh read of the block index: not kept in registers)
  const int nr = c_end - c_begin, tid = threadIdx.x;
  int ch = (blockIdx.x / nr) * NC + c_begin + blockIdx.x % nr, b = blockIdx.x / nr / H, h = blockIdx.x / nr % H;
  int t0 = (c_begin + blockIdx.x % nr) * CH;
  const size_t cC = (size_t)ch * CH * CH;
  // dL and dA (bf16) come by cp.async into wa's space (as two 64 x 64 arrays) while q, k and the gates load.
  bf16_t *raw = (bf16_t *)wa;
  for (int e = tid; e < CH * CH / 8; e += NT) {
    cp_async16(raw + 8 * e, sc.DL + cC + 8 * e);
    cp_async16(raw + CH * CH + 8 * e, sc.DA + cC + 8 * e);
  }
  cp_async_commit();
  if (tid == 0) {  // PDQ, PDK, PDK2 (read after the products, at the end of each round) into L2 meanwhile
    const size_t cK = (size_t)ch * CH * K;
    for (const bf16_t *p : {sc.PDQ, sc.PDK, sc.PDK2}) l2_prefetch(p + cK, CH * K * sizeof(bf16_t));
  }
  load_rows_l2norm(qh, pl, rq, q, b, h, t0, T, H, K);
  load_rows_l2norm(kh, pl, rk, k, b, h, t0, T, H, K);
  load_gates(gc, ld, beta, seg, g, beta_in, doc_start, b, h, t0, T, H, K);
  cp_async_wait_all();
  __syncthreads();
  {
    float wl[CH * CH / NT], da[CH * CH / NT];  // interleaved in place: through registers
#pragma unroll
    for (int u = 0; u < CH * CH / NT; u++) {
      const int e = tid + u * NT;
      wl[u] = beta[e >> 6] * bf(raw + e), da[u] = bf(raw + CH * CH + e);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < CH * CH / NT; u++) wa[((tid + u * NT) >> 6) * WAP + (tid & 63)] = make_float2(wl[u], da[u]);
  }
  __syncthreads();
  auto kf = [&](int i, int a) { return bf(kh + i * pl + a); };
  auto qf = [&](int i, int a) { return scale * bf(qh + i * pl + a); };
  // The chunk's offset in the per-chunk buffers again, from a fresh read of the block index (so that it is not
  // kept in registers across the rounds).
  auto fresh_cK = [&]() {
    unsigned bx;
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(bx));
    return (size_t)((bx / nr) * NC + c_begin + bx % nr) * CH * K;
  };
  const int warp = tid >> 5, lane = tid & 31, g8 = lane >> 2, t = lane & 3;
  float *buf = xbuf + warp * PBUF;
  const int nu = 4 * ((K + 31) / 32);  // units (s, channel group)
  for (int round = 0; round < (nu + NT / 32 - 1) / (NT / 32); round++) {
    const int u = warp + (NT / 32) * round;  // (warp-uniform)
    const int G = u >> 2, s = u & 3, I0 = 16 * s, cb = 32 * G;
    const int ntg = KS && KS % 32 == 0 ? 4 : min(32, K - cb) / 8;  // the unit's n-tiles (4, or 2 in a last group of 16)
    const bool own = u < nu && lane < 8 * ntg;  // the lane owns (s, channel cb + lane)
    const int a = own ? cb + lane : cb;  // (an idle lane reads its group's first channel, keeps nothing)
    float dgc[16];
    __nv_bfloat162 dn[16];
    if (u < nu) {
      float P[16], Q[16], R[16];
      // A 16 x 32 C tile (c[nt][r]: row g8 + 8 (r >> 1), channel cb + nt + ntg (2t + (r & 1))) into x[16] (lane L:
      // channel cb + L, rows 0..15), by halves of 8 rows through the warp's buffer.
      // With keep, the second half (rows 8..15) stays in the buffer, read where it is used: x[8 + r] at 32 r + (lane ^ r).
      auto transpose = [&](const float(&cc)[4][4], float(&x)[16], bool keep) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
          __syncwarp();  // the warp's reads of the buffer are done
#pragma unroll
          for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++)
              if (nt < ntg) buf[32 * g8 + ((nt + ntg * (2 * t + e)) ^ g8)] = cc[nt][2 * hf + e];
          __syncwarp();
          if (hf == 1 && keep) break;
#pragma unroll
          for (int r = 0; r < 8; r++) x[8 * hf + r] = lane < 8 * ntg ? buf[32 * r + (lane ^ r)] : 0.0f;
        }
      };
      // f(nt, r, i, cn) for each element of the unit's C tiles (n-tile nt, fragment slot r): its row i, channel cn.
      auto each_element = [&](auto f) {
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
          for (int r = 0; r < 4; r++)
            if (nt < ntg) f(nt, r, I0 + g8 + 8 * (r >> 1), cb + nt + ntg * (2 * t + (r & 1)));
      };
      if (s > 0) {
        // [wl; dA](I, j < I0) (k_j exp(gc_I0 - gc_j)), then times exp(gc_i - gc_I0): P_i, Q_i.
        float cp[4][4] = {}, cq[4][4] = {}, an[4];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) an[nt] = nt < ntg ? gc[I0 * ld + cb + nt + ntg * g8] : 0.0f;
        for (int j0 = 0; j0 < I0; j0 += 8) {
          const int j = j0 + t;
          const float2 w00 = wa[(I0 + g8) * WAP + j], w10 = wa[(I0 + g8 + 8) * WAP + j];
          const float2 w01 = wa[(I0 + g8) * WAP + j + 4], w11 = wa[(I0 + g8 + 8) * WAP + j + 4];
          const unsigned ap[4] = {tf32_bits(w00.x), tf32_bits(w10.x), tf32_bits(w01.x), tf32_bits(w11.x)};
          const unsigned aq[4] = {tf32_bits(w00.y), tf32_bits(w10.y), tf32_bits(w01.y), tf32_bits(w11.y)};
#pragma unroll
          for (int nt = 0; nt < 4; nt++) {
            if (nt >= ntg) continue;
            const int cn = cb + nt + ntg * g8;
            const float b0 = round_tf32(kf(j, cn) * exp_ftz(an[nt] - gc[j * ld + cn]));
            const float b1 = round_tf32(kf(j + 4, cn) * exp_ftz(an[nt] - gc[(j + 4) * ld + cn]));
            mma_tf32(cp[nt], ap, b0, b1);
            mma_tf32(cq[nt], aq, b0, b1);
          }
        }
        each_element([&](int nt, int r, int i, int cn) {
          const float f = exp_ftz(gc[i * ld + cn] - gc[I0 * ld + cn]);
          cp[nt][r] = cp[nt][r] * f, cq[nt][r] = cq[nt][r] * f;
        });
        transpose(cp, P, false);
        transpose(cq, Q, false);
      } else {
#pragma unroll
        for (int r = 0; r < 16; r++) P[r] = Q[r] = 0.0f;
      }
      if (s < 3) {
        // [wl^T | dA^T](I, m > I1) [k_m; q_m] exp(gc_m - gc_I1), then times exp(gc_I1 - gc_i): R_i.
        const int I1 = I0 + 15;
        float cr[4][4] = {}, an[4];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) an[nt] = nt < ntg ? gc[I1 * ld + cb + nt + ntg * g8] : 0.0f;
        for (int m0 = I1 + 1; m0 < CH; m0 += 8) {
          const int m = m0 + t;
          const float2 w00 = wa[m * WAP + I0 + g8], w10 = wa[m * WAP + I0 + g8 + 8];
          const float2 w01 = wa[(m + 4) * WAP + I0 + g8], w11 = wa[(m + 4) * WAP + I0 + g8 + 8];
          const unsigned aw[4] = {tf32_bits(w00.x), tf32_bits(w10.x), tf32_bits(w01.x), tf32_bits(w11.x)};
          const unsigned ad[4] = {tf32_bits(w00.y), tf32_bits(w10.y), tf32_bits(w01.y), tf32_bits(w11.y)};
#pragma unroll
          for (int nt = 0; nt < 4; nt++) {
            if (nt >= ntg) continue;
            const int cn = cb + nt + ntg * g8;
            const float e0 = exp_ftz(gc[m * ld + cn] - an[nt]), e1 = exp_ftz(gc[(m + 4) * ld + cn] - an[nt]);
            mma_tf32(cr[nt], aw, round_tf32(kf(m, cn) * e0), round_tf32(kf(m + 4, cn) * e1));
            mma_tf32(cr[nt], ad, round_tf32(qf(m, cn) * e0), round_tf32(qf(m + 4, cn) * e1));
          }
        }
        each_element([&](int nt, int r, int i, int cn) {
          cr[nt][r] = cr[nt][r] * exp_ftz(gc[I1 * ld + cn] - gc[i * ld + cn]);
        });
        transpose(cr, R, true);
      } else {
#pragma unroll
        for (int r = 0; r < 16; r++) R[r] = 0.0f;
      }
      // Inside the sub-chunk: lane L takes channel a = cb + L of its 16 rows, so that each
      // E_ij = exp(gc_i - gc_j) = prod_{j < t <= i} exp(gc_t - gc_t-1) comes from E_i-1,j by one multiplication
      // (every factor <= 1: nothing overflows, and what underflows goes to 0 as the exponential would), and one
      // pass over the pairs j <= i gives P_i, Q_i and R_j together. (A lane past a last group of 16 channels runs
      // it on the group's first channel and keeps nothing.)
      float kv[16], qv[16], al[16];
#pragma unroll
      for (int r = 0; r < 16; r++) {
        const int i = I0 + r;
        kv[r] = kf(i, a), qv[r] = qf(i, a);
        al[r] = r ? exp_ftz(gc[i * ld + a] - gc[(i - 1) * ld + a]) : 1.0f;
      }
      // The diagonal pairs (E_ii = 1) apart: they give dq and dk but nothing to the gate (q_i dA_ii k_i enters
      // dgc_i through Q and again, negated, through R), so leaving them out of Q and R keeps dg free of that
      // cancellation (with steep decays dg is ~e^-10 of those terms: fp32 rounding alone was a 3% error).
      // Row j is complete after pass j (P_j, Q_j after pass j - 1; R_j's pairs are all in pass j): its epilogue
      // follows at once, and its registers are free for the rest. The WY backward's parts: dk = PDK + PDK2 (+ P +
      // R), dqs = PDQ (+ Q), and the gate's dgc_i = PDQ_i qs_i + (PDK2_i - PDK_i) k_i (+ ...); the PDK_i k_i also
      // reach gc_last, so dg_t gets sum_i<t PDK_i k_i from them (a prefix sum, after the last round). The gradients
      // of the normalized q and k in bf16 (as they would leave a kernel of their own), for the norms' backward
      // after the last round.
#pragma unroll
      for (int j = 0; j < 16; j++) {
        if (j >= 8) R[j] = s < 3 && lane < 8 * ntg ? buf[32 * (j - 8) + (lane ^ (j - 8))] : 0.0f;  // (kept in the buffer)
        float E = 1.0f;
#pragma unroll
        for (int i = j + 1; i < 16; i++) {
          E *= al[i];
          const float2 w = wa[(I0 + i) * WAP + I0 + j];  // (wl_ij, dA_ij): the same for the whole warp
          const float x = kv[j] * E;
          P[i] = fmaf(w.x, x, P[i]);
          Q[i] = fmaf(w.y, x, Q[i]);
          R[j] = fmaf(fmaf(w.x, kv[i], w.y * qv[i]), E, R[j]);
        }
      }
      const size_t cKu = fresh_cK();
#pragma unroll
      for (int j = 0; j < 16; j++) {
        const int i = I0 + j;
        const size_t o = cKu + (size_t)i * K + a;
        const float pq = __bfloat162float(__ldg(sc.PDQ + o)), k2 = __bfloat162float(__ldg(sc.PDK2 + o));
        const float k1 = __bfloat162float(__ldg(sc.PDK + o));
        const float dd = wa[i * WAP + i].y;  // wl_ii = 0 (dL is strictly lower)
        dgc[j] = fmaf(pq, qv[j], k2 * kv[j]) + kv[j] * (P[j] - R[j]) + qv[j] * Q[j];
        dn[j] = __floats2bfloat162_rn(scale * (pq + fmaf(dd, kv[j], Q[j])), k1 + k2 + P[j] + fmaf(dd, qv[j], R[j]));
      }
    }
    __syncthreads();  // every warp is past its reads of this round's channels of gc, q and k
    if (own) {
#pragma unroll
      for (int r = 0; r < 16; r++) {
        const int i = I0 + r;
        gc[i * ld + a] = dgc[r];
        qh[i * pl + a] = dn[r].x, kh[i * pl + a] = dn[r].y;
      }
    }
  }
  __syncthreads();  // dgc, dqn and dkn of every (row, channel) are in place; wa is free
  {
    // The chunk's indices again, from a fresh read of the block index (not kept in registers across the rounds).
    unsigned bx;
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(bx));
    const int bh = bx / nr, c = c_begin + bx % nr;
    ch = bh * NC + c, b = bh / H, h = bh % H, t0 = c * CH;
  }
  const size_t cK = (size_t)ch * CH * K;
  if (tid < K) {
    // dg_t = DGL + sum_i<t PDK_i k_i + sum_i>=t dgc_i (DGL: the gate gradient at gc_last through the state), the
    // prefix sums in wa's space (this thread's column).
    float *pre = (float *)wa;
    const size_t row = (size_t)H * K;
    {
      const bf16_t *kp = k + AT(b, t0, h, K) + tid;  // row t0 + i at kp + i * row (read while t0 + i < T)
      const bf16_t *k1p = sc.PDK + cK + tid;
      float p = 0.0f;
#pragma unroll
      for (int i0 = 0; i0 < CH; i0 += 16) {  // 16 rows' loads in flight together, then their sums in order
        float kr[16], k1[16];
#pragma unroll
        for (int u = 0; u < 16; u++) {
          const int i = i0 + u;
          kr[u] = t0 + i < T ? bf(kp + i * row) : 0.0f;
          k1[u] = __bfloat162float(__ldg(k1p + i * K));
        }
#pragma unroll
        for (int u = 0; u < 16; u++) {
          const int i = i0 + u;
          const float kv = t0 + i < T ? l2norm_bf16(kr[u], rk[i]) : 0.0f;
          // (not fused into p's sum: the one-block kernel's product went through shared memory, rounded)
          const float x = __fmul_rn(k1[u], kv);
          pre[i * ld + tid] = p;
          p += x;
        }
      }
    }
    float acc = __ldg(sc.DGL + (size_t)ch * K + tid);
    size_t o = AT(b, t0, h, K) + (CH - 1) * row + tid;  // row t0 + i of dg, i going down
    for (int i = CH - 1; i >= 0; i--, o -= row) {
      acc += gc[i * ld + tid];
      if (t0 + i < T) dg[o] = acc + pre[i * ld + tid];
    }
  } else if (tid >= NT / 2) {
    // Meanwhile the L2 norms' backward (kernels/norm.h's l2norm_backward) in the upper four warps (all their threads
    // are >= K): with xn a normalized row and s its inverse norm, dx = s (dxn - xn (xn . dxn)). Warp w takes rows
    // w - 4, w, w + 4, .. of q and k; xn read again from global memory (l2norm_bf16: the bits load_rows_l2norm
    // gave), dxn from q's and k's shared memory.
    const size_t row = (size_t)H * K, o0 = AT(b, t0, h, K);  // row t0 + i of q, k, dq and dk at o0 + i * row
    // RB rows at a time (rows i0 + 4 r): their loads in flight together, the raw rows kept in registers.
    constexpr int RB = 4;
    for (int i0 = (tid >> 5) - NT / 64; i0 < CH; i0 += RB * (NT / 64)) {
      float xq[RB][4], xk[RB][4];
#pragma unroll
      for (int r = 0; r < RB; r++) {
        const int i = i0 + 4 * r;
        const bool in = i < CH && t0 + i < T;
#pragma unroll
        for (int u = 0; u < 4; u++) {
          const int a = lane + 32 * u;
          xq[r][u] = in && a < K ? bf(q + o0 + i * row + a) : 0.0f;
          xk[r][u] = in && a < K ? bf(k + o0 + i * row + a) : 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < RB; r++) {
        const int i = i0 + 4 * r;
        if (i >= CH || t0 + i >= T) break;
        const size_t o = o0 + i * row;
        float dotq = 0.0f, dotk = 0.0f;
#pragma unroll
        for (int u = 0; u < 4; u++) {
          const int a = lane + 32 * u;
          if (a >= K) break;
          xq[r][u] = l2norm_bf16(xq[r][u], rq[i]), xk[r][u] = l2norm_bf16(xk[r][u], rk[i]);
          dotq = fmaf(xq[r][u], bf(qh + i * pl + a), dotq);
          dotk = fmaf(xk[r][u], bf(kh + i * pl + a), dotk);
        }
        dotq = warp_sum(dotq), dotk = warp_sum(dotk);
#pragma unroll
        for (int u = 0; u < 4; u++) {
          const int a = lane + 32 * u;
          if (a >= K) break;
          dq[o + a] = __float2bfloat16(rq[i] * fmaf(-xq[r][u], dotq, bf(qh + i * pl + a)));
          dk[o + a] = __float2bfloat16(rk[i] * fmaf(-xk[r][u], dotk, bf(kh + i * pl + a)));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
static void check_shape(int K, int V) {
  CHECK(K % 16 == 0 && V % 16 == 0 && K > 0 && V > 0 && K <= 128 && V <= 128,
        "KDA on the GPU needs K and V multiples of 16 up to 128 (got K %d, V %d)", K, V);
}

// The forward's per-chunk intermediates, floats per chunk: W, QG, KL (64 x K), U (64 x V), Aqk (64 x 64), all bf16
// (half as many floats), KK, M^T (64 x 64), el (K), k's inverse norms (64); then what its state pass gives the
// backward: Vp (64 x V) and the entering state S0 (K x V), both bf16.
static size_t intra_per_chunk(int K, int V) {
  return (3 * (size_t)CH * K + (size_t)CH * V + CH * CH) / 2 + 2 * CH * CH + K + CH;
}
static size_t saved_per_chunk(int K, int V) { return intra_per_chunk(K, V) + ((size_t)CH * V + (size_t)K * V) / 2; }

extern "C" size_t kda_chunk_saved_floats(int B, int T, int H, int K, int V) {
  return (size_t)B * H * ((T + CH - 1) / CH) * saved_per_chunk(K, V);
}

// Per-chunk buffers for nch chunks: the forward's (saved_per_chunk) in `saved` (the caller's, kept from the
// forward for the backward) or, when saved is NULL, in device scratch slot 2 (Vp and S0 only for the backward);
// the backward's own in slot 2.
static Scratch scratch_get(size_t nch, int K, int V, bool backward, float *saved) {
  const size_t cK = CH * (size_t)K, cV = CH * (size_t)V, cC = CH * CH, kv = (size_t)K * V;
  size_t per = backward ? (cV + kv + 4 * cK + 2 * cC) / 2 + K : 0;  // (all bf16 but DGL)
  if (!saved) per += backward ? saved_per_chunk(K, V) : intra_per_chunk(K, V);
  float *p = per ? (float *)device_scratch(2, nch * per * sizeof(float)) : NULL;
  Scratch s = {};
  auto take = [&](float *&from, size_t n) {
    float *r = from;
    from += nch * n;
    return r;
  };
  auto take_bf16 = [&](float *&from, size_t n) { return (bf16_t *)take(from, n / 2); };  // n bf16 (n even)
  float *in = saved ? saved : p;  // every size is a multiple of 16 floats (the bf16 ones too): all stay 64-byte aligned
  s.W = take_bf16(in, cK), s.U = take_bf16(in, cV), s.QG = take_bf16(in, cK), s.KL = take_bf16(in, cK);
  s.AQ = take_bf16(in, cC), s.KK = take(in, cC), s.MT = take(in, cC), s.EL = take(in, K), s.RK = take(in, CH);
  if (saved || backward) s.VP = take_bf16(in, cV), s.S0 = take_bf16(in, kv);
  if (!saved) p = in;
  if (backward) {
    s.DVP = take_bf16(p, cV), s.DS = take_bf16(p, kv);
    s.PDQ = take_bf16(p, cK), s.PDK = take_bf16(p, cK), s.PDK2 = take_bf16(p, cK), s.DGL = take(p, K);
    s.DL = take_bf16(p, cC), s.DA = take_bf16(p, cC), s.DXK = take_bf16(p, cK);
  }
  return s;
}

static size_t intra_smem(int K, int V) {
  return ((size_t)CH * (K + 1) + CH * (CH + 1) + 2 * CH) * sizeof(float) +
         ((size_t)q_region(K) + CH * QK_PITCH(K)) * sizeof(bf16_t);
}
// The state kernels' shared memory: W, QG, KL (bf16, pitch K + 8), Aqk (bf16, pitch 72), el; backward also dO
// (bf16, 64 x (16 NW + 8)). The ring kernel's: two stages of W, KL (bf16, pitch K + 8) and el.
static size_t state_smem(int K) { return (size_t)CH * (3 * (K + 8) + CH + 8) * sizeof(bf16_t) + K * sizeof(float); }
static size_t state_backward_smem(int K, int NW) { return state_smem(K) + CH * (16 * NW + 8) * sizeof(bf16_t); }
static size_t state_ring_smem(int K) { return 2 * ((size_t)CH * 2 * (K + 8) * sizeof(bf16_t) + K * sizeof(float)); }
// Warps per state block (16 state columns each): 8 when V is a multiple of 128, one block per (b, h) and 128
// columns whose threads share the per-chunk loads of W, QG, KL and Aqk; 4 (twice the blocks) when 8 would leave
// more than half of the SMs idle or V is a multiple of 64 only; else 1. Measured on an H100 at K = V = 128
// (fwd+bwd ms, 8 / 4 / 2 / 1 warps): B x H = 128 (8 x 4096 x 16): 9.99 / 11.66 / 17.70 / 37.24; B x H = 32:
// 16.37 / 15.66 / 17.73 / 37.33; B x H = 16: 49.92 / 47.49 / 55.77 / 74.66 (fewer warps a block: more blocks,
// but each streams the whole chunk's operands for fewer columns).
static int sm_count() {
  static int sms = 0;  // one GPU per process
  if (!sms) {
    int dev;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  return sms;
}
static int state_warps(int B, int H, int V) {
  if (V % 128 == 0 && 2 * (size_t)B * H * (V / 128) > (size_t)sm_count()) return 8;
  return V % 64 == 0 ? 4 : 1;
}
// The WY backward's: stages | panels, M^T and Y, gc, del, beta, rk, seg (see there); V is not in it. At K = 128: 103936
// bytes: two blocks fit an SM (H100: 228 KB an SM, 227 KB a block, 1 KB of each block's reserved by the system).
static constexpr size_t wy_smem(int K) {
  return ((size_t)WY_GC + (size_t)CH * (K + 1) + K + 3 * CH) * sizeof(float);
}
static_assert(wy_smem(128) <= 110 * 1024 && 2 * (wy_smem(128) + 1024) <= 228 * 1024,
              "two WY backward blocks per SM at K = 128");
// The pairwise backward's: gc, wa, the warps' transposition buffers, beta, rq, rk, seg, q, k (see there). At K = 128:
// 109312 bytes: two blocks fit an SM.
static constexpr size_t pair_smem(int K) {
  return ((size_t)CH * (K + 1) + 2 * CH * WAP + (NT / 32) * PBUF + 4 * CH) * sizeof(float) +
         2 * CH * QK_PITCH(K) * sizeof(bf16_t);
}
static_assert(pair_smem(128) <= 110 * 1024 && 2 * (pair_smem(128) + 1024) <= 228 * 1024,
              "two pairwise backward blocks per SM at K = 128");
static_assert(CH * (128 + 1) <= 2 * CH * WAP, "dg's prefix sums fit in wa's space");

template <class F>
static void allow_smem(F *kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// The compile-time shape: K = V = 128 (the default models'; it folds the kernels' index arithmetic), else general.
static bool fixed_shape(int K, int V) { return K == 128 && V == 128; }

// Which chunks a launch covers ([begin, end) of every (b, h)) and on which stream.
struct Range {
  int begin, end;
  cudaStream_t stream;
};

template <int NW, int KVS>
static void launch_state(bool backward, bf16 *out, float *state_out, const Scratch &sc, bool save,
                         const float *state_in, const bf16 *dout, int B, int T, int H, int K, int V, int NC, Range r) {
  const int blocks = B * H * (V / (16 * NW));
  if (!backward && !out) {
    const size_t smem = state_ring_smem(K);
    allow_smem(kda_state_ring_kernel<NW, KVS>, smem);
    kda_state_ring_kernel<NW, KVS><<<blocks, 32 * NW, smem, r.stream>>>(state_out, sc, save, state_in, H, K, V, NC,
                                                                        r.begin, r.end);
  } else if (!backward) {
    const size_t smem = state_smem(K);
    allow_smem(kda_state_kernel<NW, KVS>, smem);
    kda_state_kernel<NW, KVS><<<blocks, 32 * NW, smem, r.stream>>>((bf16_t *)out, state_out, sc, save, state_in, T,
                                                                   H, K, V, NC, r.begin, r.end);
  } else {
    const size_t smem = state_backward_smem(K, NW);
    allow_smem(kda_state_backward_kernel<NW, KVS>, smem);
    kda_state_backward_kernel<NW, KVS><<<blocks, 32 * NW, smem, r.stream>>>(
        state_out, sc, (const bf16_t *)dout, state_in, T, H, K, V, NC, r.begin, r.end);
  }
  CUDA_CHECK_LAUNCH();
}
template <int NW>
static void launch_state(bool backward, bf16 *out, float *state_out, const Scratch &sc, bool save,
                         const float *state_in, const bf16 *dout, int B, int T, int H, int K, int V, int NC, Range r) {
  if constexpr (NW > 1)  // (one warp a block only when V is not a multiple of 64)
    if (fixed_shape(K, V))
      return launch_state<NW, 128>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC, r);
  launch_state<NW, 0>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC, r);
}
// Forward: (out, final state) from the initial state; backward: dinitial_state from dout, dfinal_state; over the
// chunks of r (state_in: the state entering r.begin, state_out: leaving r.end - 1, or their gradients).
static void state_pass(bool backward, bf16 *out, float *state_out, const Scratch &sc, bool save, const float *state_in,
                       const bf16 *dout, int B, int T, int H, int K, int V, int NC, Range r) {
  switch (state_warps(B, H, V)) {
    case 8: launch_state<8>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC, r); break;
    case 4: launch_state<4>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC, r); break;
    default: launch_state<1>(backward, out, state_out, sc, save, state_in, dout, B, T, H, K, V, NC, r);
  }
}

// Few (b, h), long sequences: the state passes then run on a fraction of the SMs (B x H x V / 64 blocks), each
// chunk after the one before, while the per-chunk kernels could use the rest. So the chunks are cut into
// segments, and the per-chunk kernels of one segment run on a second stream beside the state pass of another:
// forward, intra(s + 1) beside state(s); backward, WY and pairwise(s) beside state_backward(s - 1). The state
// passes get the higher stream priority (their blocks go first when SMs free up). The state (or its gradient)
// crosses a segment boundary through memory in fp32, exactly what the registers held: results are bitwise those
// of one pass.
static int segments(int B, int H, int V, int NC) {
  // Only where the state passes' blocks hold at most half of the SMs; segments of at least 64 chunks, at most 8.
  // Measured on an H100 (bench/README, session 19's scan, fwd+bwd ms at 1 / 2 / 4 / 8 segments): 32 blocks on 132
  // SMs (1 x 65536 x 16) 21.50 / 18.68 / 17.30 / 16.86; 64 (2 x 16384) 8.24 / 7.75 / 7.63 / 7.75; 128 (4 x 8192)
  // 7.21 / 7.27 / 7.54 / 7.72.
  const int warps = state_warps(B, H, V);
  const size_t blocks = (size_t)B * H * ((V + 16 * warps - 1) / (16 * warps));
  if (2 * blocks > (size_t)sm_count()) return 1;
  const int n = NC / SEGMENT_CHUNKS_MIN;
  return n < 1 ? 1 : n > SEGMENTS_MAX ? SEGMENTS_MAX : n;
}
static Range segment(int s, int n, int NC, cudaStream_t stream) {
  return {(int)((long)s * NC / n), (int)((long)(s + 1) * NC / n), stream};
}
struct SegmentStreams {
  cudaStream_t state, chunks;
  cudaEvent_t events[SEGMENTS_MAX + 2];
};
static SegmentStreams &segment_streams() {
  static SegmentStreams s;
  static bool made = false;  // one GPU per process
  if (!made) {
    int least, greatest;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&s.state, cudaStreamNonBlocking, greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&s.chunks, cudaStreamNonBlocking, least));
    for (cudaEvent_t &e : s.events) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    made = true;
  }
  return s;
}
// `waiter` waits for what `stream` has queued so far.
static void wait_for(cudaStream_t waiter, cudaStream_t stream, cudaEvent_t e) {
  CUDA_CHECK(cudaEventRecord(e, stream));
  CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
}
// The state (or gradient) between segments: two (B, H, K, V) buffers, alternating.
static float *segment_states(int B, int H, int K, int V) {
  return (float *)device_scratch(3, 2 * (size_t)B * H * K * V * sizeof(float));
}


static void intra(const Scratch &sc, const bf16 *q, const bf16 *k, const bf16 *v, const float *g, const float *beta,
                  const unsigned char *doc_start, float scale, int B, int T, int H, int K, int V, int NC, Range r) {
  const size_t smem = intra_smem(K, V);
  auto kernel = fixed_shape(K, V) ? kda_intra_kernel<128, 128> : kda_intra_kernel<0, 0>;
  allow_smem(kernel, smem);
  kernel<<<B * H * (r.end - r.begin), NT, smem, r.stream>>>(sc, (const bf16_t *)q, (const bf16_t *)k,
                                                            (const bf16_t *)v, g, beta, doc_start, scale, T, H, K, V,
                                                            NC, r.begin, r.end);
  CUDA_CHECK_LAUNCH();
}
// The whole forward: the intra kernel, then the state pass (out, final_state; with save, S0 and Vp).
static void forward_all(bf16 *out, float *final_state, const Scratch &sc, bool save, const bf16 *q, const bf16 *k,
                        const bf16 *v, const float *g, const float *beta, const float *initial_state,
                        const unsigned char *doc_start, float scale, int B, int T, int H, int K, int V, int NC) {
  const int n = segments(B, H, V, NC);
  if (n == 1) {
    const Range all = {0, NC, device_stream()};
    intra(sc, q, k, v, g, beta, doc_start, scale, B, T, H, K, V, NC, all);
    state_pass(false, out, final_state, sc, save, initial_state, NULL, B, T, H, K, V, NC, all);
    return;
  }
  SegmentStreams &st = segment_streams();
  float *states = segment_states(B, H, K, V);
  const size_t ns = (size_t)B * H * K * V;
  wait_for(st.chunks, device_stream(), st.events[0]);
  CUDA_CHECK(cudaStreamWaitEvent(st.state, st.events[0], 0));
  for (int s = 0; s < n; s++) {
    intra(sc, q, k, v, g, beta, doc_start, scale, B, T, H, K, V, NC, segment(s, n, NC, st.chunks));
    wait_for(st.state, st.chunks, st.events[1 + s]);
    state_pass(false, out, s == n - 1 ? final_state : states + ns * (s & 1), sc, save,
               s == 0 ? initial_state : states + ns * ((s - 1) & 1), NULL, B, T, H, K, V, NC,
               segment(s, n, NC, st.state));
  }
  wait_for(device_stream(), st.state, st.events[n + 1]);  // (the state stream waited for all of the chunk stream's)
}

extern "C" void kda_chunk_forward_cuda(bf16 *out, float *final_state, const bf16 *q, const bf16 *k, const bf16 *v,
                                       const float *g, const float *beta, const float *initial_state,
                                       const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                                       int V, float *saved) {
  check_shape(K, V);
  if (B == 0 || T == 0 || H == 0) return;
  CHECK(((uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16 == 0,
        "KDA on the GPU needs q, k and v 16-byte aligned (their rows are read 16 bytes at a time)");
  const int NC = (T + CH - 1) / CH;
  Scratch sc = scratch_get((size_t)B * H * NC, K, V, false, saved);
  forward_all(out, final_state, sc, saved != NULL, q, k, v, g, beta, initial_state, doc_start, scale, B, T, H, K, V,
              NC);
}

extern "C" void kda_chunk_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, float *dg, float *dbeta, float *dinitial_state,
                                        const bf16 *dout, const float *dfinal_state, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const float *g, const float *beta, const float *initial_state,
                                        const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                                        int V, const float *saved) {
  check_shape(K, V);
  if (B == 0 || T == 0 || H == 0) return;
  const int NC = (T + CH - 1) / CH, chunks = B * H * NC;
  CHECK(((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)dout) % 16 == 0,
        "KDA backward on the GPU needs q, k, v and dout 16-byte aligned (their rows are read 16 bytes at a time)");
  Scratch sc = scratch_get((size_t)chunks, K, V, true, (float *)saved);  // the backward only reads saved
  if (!saved)  // what the forward would have kept: its per-chunk results, then Vp and S0 from its state pass
    forward_all(NULL, NULL, sc, true, q, k, v, g, beta, initial_state, doc_start, scale, B, T, H, K, V, NC);
  const bool fixed = fixed_shape(K, V);
  const size_t wy_bytes = wy_smem(K), pair_bytes = pair_smem(K);
  auto wy = fixed ? kda_wy_backward_kernel<128, 128> : kda_wy_backward_kernel<0, 0>;
  auto pair = fixed ? kda_pairwise_backward_kernel<128> : kda_pairwise_backward_kernel<0>;
  allow_smem(wy, wy_bytes);
  // Two WY (and pairwise) blocks a SM need the largest shared-memory carveout: asked for, not left to the driver's choice.
  CUDA_CHECK(cudaFuncSetAttribute((const void *)wy, cudaFuncAttributePreferredSharedMemoryCarveout,
                                 cudaSharedmemCarveoutMaxShared));
  allow_smem(pair, pair_bytes);
  CUDA_CHECK(cudaFuncSetAttribute((const void *)pair, cudaFuncAttributePreferredSharedMemoryCarveout,
                                 cudaSharedmemCarveoutMaxShared));
  auto per_chunk = [&](Range r) {  // the WY and pairwise backward of the chunks of r
    const int blocks = B * H * (r.end - r.begin);
    wy<<<blocks, NT, wy_bytes, r.stream>>>((bf16_t *)dv, dbeta, sc, (const bf16_t *)dout, (const bf16_t *)k,
                                              (const bf16_t *)v, g, beta, doc_start, T, H, K, V, NC, r.begin, r.end);
    CUDA_CHECK_LAUNCH();
    pair<<<blocks, NT, pair_bytes, r.stream>>>((bf16_t *)dq, (bf16_t *)dk, dg, sc, (const bf16_t *)q,
                                               (const bf16_t *)k, g, beta, doc_start, scale, T, H, K, NC, r.begin,
                                               r.end);
    CUDA_CHECK_LAUNCH();
  };
  const int n = segments(B, H, V, NC);
  if (n == 1) {
    const Range all = {0, NC, device_stream()};
    state_pass(true, NULL, dinitial_state, sc, false, dfinal_state, dout, B, T, H, K, V, NC, all);
    per_chunk(all);
    return;
  }
  SegmentStreams &st = segment_streams();
  float *states = segment_states(B, H, K, V);
  const size_t ns = (size_t)B * H * K * V;
  wait_for(st.state, device_stream(), st.events[0]);
  for (int s = n - 1; s >= 0; s--) {  // chunks in reverse; segment s's per-chunk kernels beside state_backward(s - 1)
    state_pass(true, NULL, s == 0 ? dinitial_state : states + ns * (s & 1), sc, false,
               s == n - 1 ? dfinal_state : states + ns * ((s + 1) & 1), dout, B, T, H, K, V, NC,
               segment(s, n, NC, st.state));
    wait_for(st.chunks, st.state, st.events[1 + s]);
    per_chunk(segment(s, n, NC, st.chunks));
  }
  wait_for(device_stream(), st.chunks, st.events[n + 1]);  // (the chunk stream waited for all of the other's work)
}
