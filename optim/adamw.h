/* AdamW for the parameters Muon does not take (embeddings, lm head, norms, convolutions, A_log,
 * dt_bias, biases): one call updates one flat array in place. The step counter comes from the caller
 * (1-based, the number of updates including this one) so that bias correction survives a resume. */
#pragma once
#include <stddef.h>

#include "common/real.h"

typedef struct {
  double beta1;         // first-moment decay, 0.9
  double beta2;         // second-moment decay, 0.95
  double eps;           // added to sqrt(v_hat), 1e-8
  double weight_decay;  // decoupled: w -= lr * weight_decay * w
} AdamWConfig;

// The Moonlight / Kimi values: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
AdamWConfig adamw_config_default(void);

// m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
// w -= lr * (m / (1 - beta1^step) / (sqrt(v / (1 - beta2^step)) + eps) + weight_decay * w).
// step >= 1. weight, first_moment, second_moment are updated in place.
void adamw_step(real *weight,         // (n)
                real *first_moment,   // (n)
                real *second_moment,  // (n)
                const real *grad,     // (n)
                size_t n, const AdamWConfig *config, real lr, long step);

#ifdef KLT_HAVE_CUDA
#include "kernels/device.h"
KLT_C_BEGIN
// CUDA: the same update on fp32 device arrays; grad is multiplied by grad_scale first (global clipping).
// weight_bf16 (or NULL) receives the new weights rounded to bf16 (the copy the model computes with).
void adamw_step_cuda(float *weight, bf16 *weight_bf16, float *first_moment, float *second_moment, const float *grad,
                     size_t n, const AdamWConfig *config, float lr, long step, float grad_scale);
KLT_C_END
#endif
