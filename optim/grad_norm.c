#include "optim/grad_norm.h"

double grad_norm_squared(const real *g, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; i++) sum += (double)g[i] * (double)g[i];
  return sum;
}

real grad_clip_scale(double global_norm, real max_norm) {
  if (max_norm <= 0) return 1;
  double scale = (double)max_norm / (global_norm + 1e-6);
  return (real)(scale < 1.0 ? scale : 1.0);
}
