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
/* CUDA, in query blocks: for each block of up to 512 queries of a row, the scores against the keys it
 * can see (causal: keys up to the block's end) come from a batched cuBLASLt GEMM over the heads, one
 * kernel applies the document mask and the exact softmax (lse, max logit), and a second GEMM forms the
 * output. Memory holds one block's scores (H x 512 x T), never the whole T x T matrix per head.
 * max_logit (H) is max-ACCUMULATED across calls (the caller sets it to -inf at the step's start).
 * The backward recomputes each block's probabilities from lse; dq, dk, dv are overwritten and
 * deterministic (dk, dv accumulate over query blocks in fp32 in a fixed order). */
#include "kernels/device.h"
KLT_C_BEGIN
void attention_forward_cuda(bf16 *out /*(B,T,H,Dv)*/, float *lse /*(B,T,H)*/, float *max_logit /*(H)*/,
                            const bf16 *q /*(B,T,H,Dqk)*/, const bf16 *k /*(B,T,H,Dqk)*/, const bf16 *v /*(B,T,H,Dv)*/,
                            const unsigned char *doc_start /*(B,T) or NULL*/, float scale, int B, int T, int H,
                            int Dqk, int Dv);
void attention_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q, const bf16 *k,
                             const bf16 *v, const bf16 *out, const float *lse, const unsigned char *doc_start,
                             float scale, int B, int T, int H, int Dqk, int Dv);
KLT_C_END
#endif
