// Normalizations; see norm.h. Row sums accumulate in double: rows can be long and fp32 sums drift.
#include "kernels/norm.h"

#include <math.h>

#include "kernels/activation.h"

void rmsnorm_forward(real *out, real *rstd, const real *inp, const real *weight, real eps, int N, int C) {
  for (int n = 0; n < N; n++) {
    const real *x = inp + (size_t)n * C;
    double sum = 0;
    for (int c = 0; c < C; c++) sum += (double)x[c] * x[c];
    real r = (real)(1.0 / sqrt(sum / C + eps));
    rstd[n] = r;
    real *y = out + (size_t)n * C;
    for (int c = 0; c < C; c++) y[c] = x[c] * r * weight[c];
  }
}

void rmsnorm_backward(real *dinp, real *dweight, const real *dout, const real *inp, const real *weight,
                      const real *rstd, int N, int C) {
  for (int n = 0; n < N; n++) {
    const real *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
    real r = rstd[n];
    double dot = 0;  // sum_c (dy * w)_c x_c
    for (int c = 0; c < C; c++) dot += (double)dy[c] * weight[c] * x[c];
    if (dweight)
      for (int c = 0; c < C; c++) dweight[c] += dy[c] * x[c] * r;
    if (dinp) {
      real *dx = dinp + (size_t)n * C;
      real k = (real)(dot / C) * r * r * r;
      for (int c = 0; c < C; c++) dx[c] += r * dy[c] * weight[c] - k * x[c];
    }
  }
}

void gated_rmsnorm_forward(real *out, real *rstd, const real *o, const real *gate, const real *weight, real eps,
                           int N, int H, int D) {
  for (size_t row = 0; row < (size_t)N * H; row++) {
    const real *x = o + row * D, *g = gate + row * D;
    double sum = 0;
    for (int i = 0; i < D; i++) sum += (double)x[i] * x[i];
    real r = (real)(1.0 / sqrt(sum / D + eps));
    rstd[row] = r;
    real *y = out + row * D;
    for (int i = 0; i < D; i++) y[i] = x[i] * r * weight[i] * sigmoid_of(g[i]);
  }
}

void gated_rmsnorm_backward(real *do_, real *dgate, real *dweight, const real *dout, const real *o, const real *gate,
                            const real *weight, const real *rstd, int N, int H, int D) {
  for (size_t row = 0; row < (size_t)N * H; row++) {
    const real *x = o + row * D, *g = gate + row * D, *dy = dout + row * D;
    real r = rstd[row];
    double dot = 0;  // sum_i (dy * w * s)_i x_i: what the normalization's backward needs
    for (int i = 0; i < D; i++) dot += (double)dy[i] * weight[i] * sigmoid_of(g[i]) * x[i];
    real k = (real)(dot / D) * r * r * r;
    for (int i = 0; i < D; i++) {
      real s = sigmoid_of(g[i]);
      if (dgate) dgate[row * D + i] += dy[i] * x[i] * r * weight[i] * s * (1 - s);
      if (dweight) dweight[i] += dy[i] * x[i] * r * s;
      if (do_) do_[row * D + i] += r * dy[i] * weight[i] * s - k * x[i];
    }
  }
}

void l2norm_forward(real *out, real *inv_norm, const real *inp, real eps, int rows, int D) {
  for (size_t row = 0; row < (size_t)rows; row++) {
    const real *x = inp + row * D;
    double sum = 0;
    for (int i = 0; i < D; i++) sum += (double)x[i] * x[i];
    real inv = (real)(1.0 / sqrt(sum + eps));
    inv_norm[row] = inv;
    for (int i = 0; i < D; i++) out[row * D + i] = x[i] * inv;
  }
}

void l2norm_backward(real *dinp, const real *dout, const real *inp, const real *inv_norm, int rows, int D) {
  for (size_t row = 0; row < (size_t)rows; row++) {
    const real *x = inp + row * D, *dy = dout + row * D;
    real inv = inv_norm[row];
    double dot = 0;
    for (int i = 0; i < D; i++) dot += (double)dy[i] * x[i];
    real k = (real)dot * inv * inv * inv;
    for (int i = 0; i < D; i++) dinp[row * D + i] += inv * dy[i] - k * x[i];
  }
}
