/* Kimi Delta Attention (KDA), the gated delta rule with per-channel decay, per batch row and head:
 *   S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)
 * with the state S (K, V) in fp32 (real on the CPU). Two forms with forward and backward: the
 * token-by-token recurrence (the oracle) and the chunkwise algorithm (the one the model uses, and the
 * blueprint of the CUDA kernel). q and k arrive L2-normalized; g is the log decay (<= 0).
 * Documents: where doc_start[b, t] = 1 and t > 0 the state entering t is zero; at t = 0 it is
 * initial_state (zero when NULL). final_state is the state after the last position.
 * Backwards recompute what they need from the inputs, add into every gradient (NULL = not needed),
 * and take dfinal_state (NULL = zero). */
#pragma once
#include "common/real.h"

void kda_recurrent_forward(real *out,                        // (B, T, H, V)
                           real *final_state,                // (B, H, K, V) or NULL
                           const real *q,                    // (B, T, H, K)
                           const real *k,                    // (B, T, H, K)
                           const real *v,                    // (B, T, H, V)
                           const real *g,                    // (B, T, H, K)
                           const real *beta,                 // (B, T, H)
                           const real *initial_state,        // (B, H, K, V) or NULL
                           const unsigned char *doc_start,   // (B, T) or NULL
                           real scale, int B, int T, int H, int K, int V);

void kda_recurrent_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta, real *dinitial_state,
                            const real *dout,          // (B, T, H, V)
                            const real *dfinal_state,  // (B, H, K, V) or NULL
                            const real *q, const real *k, const real *v, const real *g, const real *beta,
                            const real *initial_state, const unsigned char *doc_start, real scale, int B, int T,
                            int H, int K, int V);

// Chunkwise: chunks of chunk_size tokens that never span a document start; within a chunk the gates
// are cumulated in log space, the WY representation comes from the UT transform (I + A)^-1 by forward
// substitution, and the state passes from chunk to chunk.
void kda_chunk_forward(real *out, real *final_state, const real *q, const real *k, const real *v, const real *g,
                       const real *beta, const real *initial_state, const unsigned char *doc_start, real scale, int B,
                       int T, int H, int K, int V, int chunk_size);

void kda_chunk_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta, real *dinitial_state, const real *dout,
                        const real *dfinal_state, const real *q, const real *k, const real *v, const real *g,
                        const real *beta, const real *initial_state, const unsigned char *doc_start, real scale,
                        int B, int T, int H, int K, int V, int chunk_size);

#ifdef KLT_HAVE_CUDA
/* CUDA: bf16 q, k, v, out; fp32 g, beta and states; q and k raw: the op L2-normalizes each (b, t, h) row of q and
 * k, x / sqrt(|x|^2 + KDA_L2NORM_EPS) rounded to bf16 (l2norm_forward of norm.h), and its dq, dk are the
 * gradients of the raw q, k (l2norm_backward of norm.h). The chunkwise algorithm above with fixed
 * 64-token chunks; a document start inside a chunk is handled by masking (no pairwise term crosses it, the state
 * entering it is zero), so T need not be a multiple of 64 and chunks need not align with documents. Forward: a
 * parallel kernel per chunk (pairwise decays, the UT transform's (I + A)^-1 explicitly, W, U and the decayed q and
 * k), then one sequential pass per (row, head) (or per slice of its state columns: few heads, or V not a multiple
 * of 128) that carries the fp32 state in registers and writes the output. Backward: the state pass again (saving
 * the state entering each chunk) unless the forward kept it in `saved`, a reverse state pass, then two parallel
 * kernels per chunk (the WY/UT backward; the pairwise backward with the gate's reverse cumulative sum). fp32
 * arithmetic except the matrix products, which take tf32 or bf16 operands on the tensor cores (fp32 accumulation):
 * the per-chunk buffers between the kernels (W, U, decayed q and k, Aqk, the states saved per chunk and their
 * gradients) are stored bf16; fixed summation order (deterministic). K and V multiples of 16 up to 128; q, k, v
 * and dout 16-byte aligned (as cudaMalloc gives). All gradients are overwritten; dinitial_state, dfinal_state and
 * the state pointers may be NULL.
 *
 * `saved` (kda_chunk_saved_floats floats, fp32 and bf16; about 153 KB per 64-token chunk and head at K = V = 128,
 * i.e. 19 bytes per token and channel) keeps from the forward, for the backward of the same inputs, the per-chunk
 * kernel's results and the state entering each chunk with its Vp; the backward then skips recomputing them
 * (its first two kernels).
 * With saved = NULL the forward keeps nothing and the backward recomputes; the results are bitwise the same.
 * The backward's own intermediates live in device scratch slot 2, grown on demand (about 0.13 MB per chunk
 * and head at K = V = 128 with `saved`, 0.29 MB without). */
#include <stddef.h>

#include "kernels/device.h"
KLT_C_BEGIN
#define KDA_L2NORM_EPS 1e-6f  // the L2 norms of q and k inside the CUDA op
size_t kda_chunk_saved_floats(int B, int T, int H, int K, int V);
void kda_chunk_forward_cuda(bf16 *out /*(B,T,H,V)*/, float *final_state /*(B,H,K,V)*/, const bf16 *q /*(B,T,H,K)*/,
                            const bf16 *k, const bf16 *v /*(B,T,H,V)*/, const float *g /*(B,T,H,K)*/,
                            const float *beta /*(B,T,H)*/, const float *initial_state,
                            const unsigned char *doc_start /*(B,T)*/, float scale, int B, int T, int H, int K, int V,
                            float *saved /*kda_chunk_saved_floats or NULL*/);
void kda_chunk_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, float *dg, float *dbeta, float *dinitial_state,
                             const bf16 *dout, const float *dfinal_state, const bf16 *q, const bf16 *k, const bf16 *v,
                             const float *g, const float *beta, const float *initial_state,
                             const unsigned char *doc_start, float scale, int B, int T, int H, int K, int V,
                             const float *saved /*the forward's, or NULL: recompute*/);
KLT_C_END
#endif
