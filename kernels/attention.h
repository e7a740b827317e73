/* Causal softmax attention with document masking: the core of the MLA mixer once the layer has built
 * per-head queries, keys and values (MLA's heads are plain multi-head attention at this point, with
 * k_h = [k_nope_h | k_pe]). Query i of a row attends to keys j <= i of the same document. The forward
 * is computed flash-style, in blocks of queries against blocks of keys with an online softmax, so no
 * (T, T) score matrix ever exists; it saves the log-sum-exp of each query's scores, from which the
 * backward recomputes the probabilities. It also reports the largest scaled logit per head, the
 * statistic QK-Clip acts on. Query/key width Dqk and value width Dv may differ (192 and 128 in the
 * released model). */
#pragma once

#include "common/real.h"

// out = softmax(scale * q k^T + mask) v per (row, head); lse = log of each query's softmax
// denominator, saved for the backward. max_logit[h] is OVERWRITTEN with the largest allowed
// scale * q_i . k_j of head h over the whole batch (before any masking or softmax shift).
// doc_start[b, t] = 1 where position t begins a document (t = 0 always does); NULL = one document.
void attention_forward(real *out,                        // (B, T, H, Dv)
                       real *lse,                        // (B, T, H)
                       real *max_logit,                  // (H)
                       const real *q,                    // (B, T, H, Dqk)
                       const real *k,                    // (B, T, H, Dqk)
                       const real *v,                    // (B, T, H, Dv)
                       const unsigned char *doc_start,   // (B, T) or NULL
                       real scale, int B, int T, int H, int Dqk, int Dv);

// Adds the gradients of the loss into dq, dk, dv (any may be NULL), given dout and the forward's
// inputs, output and lse. With P the probabilities recomputed from lse:
// dv += P^T dout, dS = P * (dout v^T - rowsum(dout * out)), dq += scale dS k, dk += scale dS^T q.
void attention_backward(real *dq,                        // (B, T, H, Dqk)
                        real *dk,                        // (B, T, H, Dqk)
                        real *dv,                        // (B, T, H, Dv)
                        const real *dout,                // (B, T, H, Dv)
                        const real *q,                   // (B, T, H, Dqk)
                        const real *k,                   // (B, T, H, Dqk)
                        const real *v,                   // (B, T, H, Dv)
                        const real *out,                 // (B, T, H, Dv)
                        const real *lse,                 // (B, T, H)
                        const unsigned char *doc_start,  // (B, T) or NULL
                        real scale, int B, int T, int H, int Dqk, int Dv);

#ifdef KLT_HAVE_CUDA
/* CUDA, flash style (kernels/attention.cu): tiles of 64 queries (16 per warp) against tiles of keys
 * with an online softmax, on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate); no T x T
 * matrix exists in memory. Key tiles wholly above the diagonal or wholly before the query tile's
 * document start are skipped; the mask is applied only to tiles that cross the diagonal or a document
 * start. Dqk and Dv: multiples of 16 up to 256; (192, 128), MLA's, is the tuned case. Pointers must be
 * 16-byte aligned and scale > 0.
 * Forward: out (bf16), lse (fp32, natural log) overwritten; max_logit (H) is MAX-ACCUMULATED, i.e.
 * max(previous, this call's largest allowed scale * q.k of the head), so micro-batches combine; the
 * caller initializes it (e.g. to -inf at the step's start).
 * Backward: dq, dk, dv are OVERWRITTEN (bf16) and deterministic (no float atomics): D = rowsum(dout *
 * out), then one pass over key tiles accumulates dk and dv in registers, and a separate pass over
 * query tiles accumulates dq. Both use device_scratch slot 2. */
#include "kernels/device.h"
KLT_C_BEGIN
void attention_forward_cuda(bf16 *out /*(B,T,H,Dv)*/, float *lse /*(B,T,H)*/, float *max_logit /*(H)*/,
                            const bf16 *q /*(B,T,H,Dqk)*/, const bf16 *k /*(B,T,H,Dqk)*/, const bf16 *v /*(B,T,H,Dv)*/,
                            const unsigned char *doc_start /*(B,T) or NULL*/, float scale, int B, int T, int H,
                            int Dqk, int Dv);
void attention_backward_cuda(bf16 *dq /*(B,T,H,Dqk)*/, bf16 *dk /*(B,T,H,Dqk)*/, bf16 *dv /*(B,T,H,Dv)*/,
                             const bf16 *dout /*(B,T,H,Dv)*/, const bf16 *q, const bf16 *k, const bf16 *v,
                             const bf16 *out /*(B,T,H,Dv)*/, const float *lse /*(B,T,H)*/,
                             const unsigned char *doc_start /*(B,T) or NULL*/, float scale, int B, int T, int H,
                             int Dqk, int Dv);
KLT_C_END
#endif
