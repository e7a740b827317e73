/* Token embedding lookup: row t of the table for each token id. */
#pragma once
#include "common/real.h"

// out (N, C) = table[tokens[n]]; token ids are checked by the loader (a bad id never gets here).
void embedding_forward(real *out, const int *tokens, const real *table, int N, int C);
// dtable (V, C) += dout rows at their token ids, in token order (deterministic).
void embedding_backward(real *dtable, const real *dout, const int *tokens, int N, int C);

#ifdef KLT_HAVE_CUDA
/* CUDA. The backward is deterministic: token positions are sorted by id (stable radix sort), then
 * each id's rows are summed in position order. */
#include "kernels/device.h"
KLT_C_BEGIN
void embedding_forward_cuda(bf16 *out /*(N,C)*/, const int *tokens /*(N)*/, const bf16 *table /*(V,C)*/, int N, int C);
// dtable (V, C) fp32 += dout rows at their token ids.
void embedding_backward_cuda(float *dtable, const bf16 *dout /*(N,C)*/, const int *tokens, int N, int C, int V);
KLT_C_END
#endif
