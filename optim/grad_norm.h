/* Global gradient norm and clipping. The trainer sums grad_norm_squared over every gradient it owns
 * (and over ranks), takes the square root, and multiplies each gradient by grad_clip_scale before
 * the optimizer step. The sum is kept in double so that millions of fp32 squares do not lose the
 * small terms. */
#pragma once
#include <stddef.h>

#include "common/real.h"

// Sum of squares of g (n), accumulated in double.
double grad_norm_squared(const real *g, size_t n);

// Factor to multiply every gradient by: min(1, max_norm / (global_norm + 1e-6)).
// max_norm <= 0 turns clipping off (factor 1).
real grad_clip_scale(double global_norm, real max_norm);

#ifdef KLT_HAVE_CUDA
#include <stdbool.h>

#include "kernels/device.h"
KLT_C_BEGIN
// CUDA: sum of squares of g (n) into *result (a device double), or added to it when accumulate; a
// fixed two-pass reduction in double, so the result is deterministic.
void grad_norm_squared_cuda(double *result, const float *g, size_t n, bool accumulate);
KLT_C_END
#endif
