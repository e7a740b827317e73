/* Normalizations: RMSNorm (pre-norm of every block, the MLA latent norm), the KDA output's per-head
 * RMSNorm gated by a sigmoid, and the L2 norm of KDA's q and k. Forwards save the reciprocal norms
 * the backwards need. */
#pragma once
#include "common/real.h"

// out (N, C) = inp * rstd * weight (C), rstd (N) = 1 / sqrt(mean(inp^2) + eps).
void rmsnorm_forward(real *out, real *rstd, const real *inp, const real *weight, real eps, int N, int C);
// dinp (N, C) +=, dweight (C) +=.
void rmsnorm_backward(real *dinp, real *dweight, const real *dout, const real *inp, const real *weight,
                      const real *rstd, int N, int C);

// out (N, H, D) = rmsnorm_over_D(o) * weight (D) * sigmoid(gate (N, H, D)); rstd (N, H) saved.
// The weight is shared by all heads (Hugging Face's o_norm has head_dim entries).
void gated_rmsnorm_forward(real *out, real *rstd, const real *o, const real *gate, const real *weight, real eps,
                           int N, int H, int D);
// do_ (N, H, D) +=, dgate (N, H, D) +=, dweight (D) +=.
void gated_rmsnorm_backward(real *do_, real *dgate, real *dweight, const real *dout, const real *o, const real *gate,
                            const real *weight, const real *rstd, int N, int H, int D);

// out (rows, D) = inp / sqrt(sum(inp^2) + eps) per row; inv_norm (rows) saved. eps 1e-6 for KDA.
void l2norm_forward(real *out, real *inv_norm, const real *inp, real eps, int rows, int D);
// dinp (rows, D) += the gradient through the normalization of dout (rows, D).
void l2norm_backward(real *dinp, const real *dout, const real *inp, const real *inv_norm, int rows, int D);
