/* Muon in the Moonlight form, for every 2-D weight matrix (batched experts are one call per expert
 * matrix: each is orthogonalized alone). Sum-form momentum with a Nesterov look-ahead, the update
 * orthogonalized by a quintic Newton-Schulz iteration, then scaled by 0.2 * sqrt(max(rows, cols)) so
 * its RMS matches AdamW's and the AdamW learning rate and weight decay carry over.
 * Every matrix product goes through gemm() (three per Newton-Schulz step), the structure the CUDA
 * path reuses; the caller provides scratch memory so nothing is allocated inside the step. */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "common/real.h"

typedef struct {
  double momentum;      // mu, 0.95
  bool nesterov;        // orthogonalize G + mu M (true) or M (false)
  double weight_decay;  // decoupled, scaled by lr like AdamW's
  int ns_steps;         // Newton-Schulz steps, 5
} MuonConfig;

// Moonlight's values: momentum 0.95, Nesterov, weight decay 0.1, 5 Newton-Schulz steps.
MuonConfig muon_config_default(void);

// Elements of scratch that muon_newton_schulz and muon_step need for a (rows, cols) matrix.
size_t muon_scratch_elements(int rows, int cols);

// out (rows, cols) = approximately U V^T for in = U S V^T (singular values land in about [0.7, 1.2]
// once they are not tiny): X = in / (||in||_F + 1e-7), then `steps` times, on the orientation with
// rows <= cols, A = X X^T; B = b A + c A A; X = a X + B X, with (a, b, c) = (3.4445, -4.7750, 2.0315).
// out may equal in.
void muon_newton_schulz(real *out,       // (rows, cols)
                        const real *in,  // (rows, cols)
                        int rows, int cols, int steps, real *scratch);

// momentum = mu momentum + grad; U = grad + mu momentum (Nesterov) or momentum; X = NS(U);
// weight -= lr * (0.2 sqrt(max(rows, cols)) X + weight_decay weight).
void muon_step(real *weight,      // (rows, cols)
               real *momentum,    // (rows, cols)
               const real *grad,  // (rows, cols)
               int rows, int cols, const MuonConfig *config, real lr, real *scratch);

#ifdef KLT_HAVE_CUDA
#include "kernels/device.h"
KLT_C_BEGIN
// CUDA: muon_step for `batch` matrices of (rows, cols), each orthogonalized alone; matrix b's weight,
// momentum and gradient start at element offsets[b] of weight, momentum and grad (offsets: a device
// array of batch entries; the optimizer batches every matrix of one shape in the model into one
// call). Momentum and the per-matrix Frobenius normalization in fp32; Newton-Schulz through
// strided-batched cuBLASLt GEMMs with bf16 operands and outputs and fp32 accumulation. grad is
// multiplied by grad_scale first. Against the fp64 CPU step the weight update differs by about 1e-2
// relative (bf16). weight_bf16 (or NULL), at the same offsets, receives the new weights rounded to
// bf16. Scratch: the file's own device buffer, grown on demand (large batches are split
// into groups of at most 2^27 elements).
void muon_step_cuda(float *weight, bf16 *weight_bf16, float *momentum, const float *grad, const long long *offsets,
                    int rows, int cols, int batch, const MuonConfig *config, float lr, float grad_scale);
KLT_C_END
#endif
