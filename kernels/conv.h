/* Depthwise causal short convolution followed by SiLU (KDA's q, k and v paths):
 *   pre[b, t, c] = sum_{j < W} weight[c, j] * x[b, t - (W - 1) + j, c];  out = silu(pre)
 * Taps that reach before position 0 or across a document start read zero, so packed documents never
 * see each other. The weight is PyTorch's depthwise Conv1d weight (C, 1, W) without the middle 1. */
#pragma once
#include "common/real.h"

// out, pre (B, T, C): the SiLU output and the convolution before it (saved for the backward).
void short_conv_silu_forward(real *out, real *pre, const real *x, const real *weight,
                             const unsigned char *doc_start,  // (B, T) or NULL
                             int B, int T, int C, int W);
// dx (B, T, C) +=, dweight (C, W) +=, from dout (B, T, C).
void short_conv_silu_backward(real *dx, real *dweight, const real *dout, const real *x, const real *weight,
                              const real *pre, const unsigned char *doc_start, int B, int T, int C, int W);
