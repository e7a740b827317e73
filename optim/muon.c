#include "optim/muon.h"

#include <math.h>
#include <string.h>

#include "common/check.h"
#include "kernels/gemm.h"

// Quintic coefficients of Keller Jordan's Muon, kept by Moonlight: they push every singular value
// in (0, 1] towards [0.7, 1.2] quickly rather than to exactly 1 slowly.
static const real NS_A = (real)3.4445, NS_B = (real)-4.7750, NS_C = (real)2.0315;

// Moonlight Eq. 4: match AdamW's update RMS of about 0.2.
static const double MUON_UPDATE_RMS = 0.2;

MuonConfig muon_config_default(void) {
  return (MuonConfig){.momentum = 0.95, .nesterov = true, .weight_decay = 0.1, .ns_steps = 5};
}

// Newton-Schulz needs two (rows, cols) iterates and two (m, m) Gram-sized buffers, m = min(rows, cols);
// muon_step adds one (rows, cols) buffer for its input.
size_t muon_scratch_elements(int rows, int cols) {
  size_t n = (size_t)rows * cols, m = (size_t)(rows < cols ? rows : cols);
  return 3 * n + 2 * m * m;
}

void muon_newton_schulz(real *out, const real *in, int rows, int cols, int steps, real *scratch) {
  CHECK(rows > 0 && cols > 0 && steps >= 0, "bad Newton-Schulz shape (%d, %d) or steps %d", rows, cols, steps);
  size_t n = (size_t)rows * cols;
  int m = rows < cols ? rows : cols;
  real *x = scratch;                 // (rows, cols)
  real *x_next = x + n;              // (rows, cols)
  real *gram = x_next + n;           // (m, m)
  real *poly = gram + (size_t)m * m; // (m, m)

  double norm_squared = 0.0;
  for (size_t i = 0; i < n; i++) norm_squared += (double)in[i] * (double)in[i];
  real inverse_norm = (real)(1.0 / (sqrt(norm_squared) + 1e-7));
  for (size_t i = 0; i < n; i++) x[i] = in[i] * inverse_norm;

  // The iteration works on the wide orientation Y (m, max) with m <= max, so the Gram matrix is the
  // small one. A tall X is Y^T: rather than transposing, use Y Y^T = X^T X and
  // Y' = a Y + P Y  <=>  X' = a X + X P^T.
  bool tall = rows > cols;
  for (int step = 0; step < steps; step++) {
    if (tall) gemm(true, false, m, m, rows, 1, x, cols, x, cols, 0, gram, m);
    else gemm(false, true, m, m, cols, 1, x, cols, x, cols, 0, gram, m);
    for (size_t i = 0; i < (size_t)m * m; i++) poly[i] = NS_B * gram[i];
    gemm(false, false, m, m, m, NS_C, gram, m, gram, m, 1, poly, m);
    for (size_t i = 0; i < n; i++) x_next[i] = NS_A * x[i];
    if (tall) gemm(false, true, rows, cols, cols, 1, x, cols, poly, m, 1, x_next, cols);
    else gemm(false, false, rows, cols, rows, 1, poly, m, x, cols, 1, x_next, cols);
    real *swap = x; x = x_next; x_next = swap;
  }
  memcpy(out, x, n * sizeof(real));
}

void muon_step(real *weight, real *momentum, const real *grad, int rows, int cols, const MuonConfig *config,
               real lr, real *scratch) {
  size_t n = (size_t)rows * cols;
  real mu = (real)config->momentum;
  real *update = scratch;  // (rows, cols)
  for (size_t i = 0; i < n; i++) {
    momentum[i] = mu * momentum[i] + grad[i];
    update[i] = config->nesterov ? grad[i] + mu * momentum[i] : momentum[i];
  }
  muon_newton_schulz(update, update, rows, cols, config->ns_steps, update + n);
  real scale = (real)(MUON_UPDATE_RMS * sqrt((double)(rows > cols ? rows : cols)));
  real decay = (real)config->weight_decay;
  for (size_t i = 0; i < n; i++) weight[i] -= lr * (scale * update[i] + decay * weight[i]);
}
