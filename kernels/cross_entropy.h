/* The language-model head fused with the token cross-entropy. The full (N, V) logits of a large
 * vocabulary (163840 in the released model) would dwarf every other activation, so they never exist:
 * the forward walks the vocabulary in chunks, one gemm per chunk, keeping an online log-sum-exp per
 * token, and saves only that log-sum-exp; the backward recomputes each chunk's logits from it. Rows
 * are also taken in blocks, so the scratch is (row block, vocab_chunk) whatever N is. The loss is per
 * token; the caller turns a masked mean into dlosses (mask / count). */
#pragma once

#include "common/real.h"

// losses[n] = logsumexp_v(x_n . w_v) - x_n . w_targets[n]; lse[n] = logsumexp_v(x_n . w_v), saved for
// the backward. A target < 0 means "no loss here": losses[n] = 0. Targets must be < V.
// argmax (N), if not NULL, receives each row's most likely token (lowest index on ties), for accuracy.
void lm_head_cross_entropy_forward(real *losses,        // (N)
                                   real *lse,           // (N)
                                   int *argmax,         // (N) or NULL
                                   const real *x,       // (N, C)
                                   const real *weight,  // (V, C)
                                   const int *targets,  // (N)
                                   int N, int C, int V, int vocab_chunk);

// With dlogits[n, v] = (softmax(x_n W^T)[v] - [v == targets[n]]) * dlosses[n] (zero where the target
// is < 0): dx += dlogits W, dweight += dlogits^T x. Either gradient may be NULL.
void lm_head_cross_entropy_backward(real *dx,             // (N, C)
                                    real *dweight,        // (V, C)
                                    const real *dlosses,  // (N)
                                    const real *x,        // (N, C)
                                    const real *weight,   // (V, C)
                                    const int *targets,   // (N)
                                    const real *lse,      // (N)
                                    int N, int C, int V, int vocab_chunk);

#ifdef KLT_HAVE_CUDA
/* CUDA: forward and backward fused (llm.c style), in blocks of rows: logits = x W^T (cuBLASLt, bf16 in,
 * fp32 out), per row the log-sum-exp, loss = lse - logit[target] (0 where target < 0) and the argmax
 * (lowest index on ties; argmax may be NULL); with dx != NULL also dlogits = (softmax - onehot) *
 * loss_weight (zero where target < 0), dx = dlogits W (OVERWRITTEN), and with dweight != NULL
 * dweight += dlogits^T x (fp32). Scratch: one row block's logits (fp32) and dlogits (bf16), the row
 * block sized to keep the fp32 logits near 512 MB (4096 rows at V = 32000, 768 at V = 163840). */
#include "kernels/device.h"
KLT_C_BEGIN
void lm_head_cross_entropy_cuda(float *losses /*(N)*/, int *argmax /*(N) or NULL*/, bf16 *dx /*(N,C) or NULL*/,
                                float *dweight /*(V,C) or NULL*/, const bf16 *x /*(N,C)*/, const bf16 *weight /*(V,C)*/,
                                const int *targets /*(N)*/, float loss_weight, int N, int C, int V);
KLT_C_END
#endif
