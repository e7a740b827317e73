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

#ifdef KLT_HAVE_CUDA
/* CUDA: the same causal depthwise convolution + SiLU on bf16 activations with an fp32 weight (C, W).
 * The forward does not keep the pre-activation: the backward recomputes it. dx is overwritten and
 * dweight added (deterministic). */
#include "kernels/device.h"
KLT_C_BEGIN
void short_conv_silu_forward_cuda(bf16 *out /*(B,T,C)*/, const bf16 *x /*(B,T,C)*/, const float *weight /*(C,W)*/,
                                  const unsigned char *doc_start /*(B,T) or NULL*/, int B, int T, int C, int W);
void short_conv_silu_backward_cuda(bf16 *dx, float *dweight, const bf16 *dout, const bf16 *x, const float *weight,
                                   const unsigned char *doc_start, int B, int T, int C, int W);
KLT_C_END
#endif
