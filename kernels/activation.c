// Activations and the KDA gate; see activation.h.
#include "kernels/activation.h"

void sigmoid_forward(real *out, const real *x, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = sigmoid_of(x[i]);
}

void sigmoid_backward(real *dx, const real *dout, const real *out, size_t n) {
  for (size_t i = 0; i < n; i++) dx[i] += dout[i] * out[i] * (1 - out[i]);
}

void swiglu_forward(real *out, const real *gate, const real *up, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = silu_of(gate[i]) * up[i];
}

void swiglu_backward(real *dgate, real *dup, const real *dout, const real *gate, const real *up, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (dgate) dgate[i] += dout[i] * up[i] * silu_derivative(gate[i]);
    if (dup) dup[i] += dout[i] * silu_of(gate[i]);
  }
}

void kda_gate_forward(real *g, const real *f, const real *A_log, const real *dt_bias, KdaGateForm form,
                      real lower_bound, int N, int H, int K) {
  for (int n = 0; n < N; n++)
    for (int h = 0; h < H; h++) {
      real a = (real)exp((double)A_log[h]);
      for (int k = 0; k < K; k++) {
        size_t i = ((size_t)n * H + h) * K + k;
        real u = f[i] + dt_bias[h * K + k];
        g[i] = form == KDA_GATE_SOFTPLUS ? -a * softplus_of(u) : lower_bound * sigmoid_of(a * u);
      }
    }
}

void kda_gate_backward(real *df, real *dA_log, real *ddt_bias, const real *dg, const real *f, const real *A_log,
                       const real *dt_bias, KdaGateForm form, real lower_bound, int N, int H, int K) {
  for (int n = 0; n < N; n++)
    for (int h = 0; h < H; h++) {
      real a = (real)exp((double)A_log[h]);
      for (int k = 0; k < K; k++) {
        size_t i = ((size_t)n * H + h) * K + k;
        real u = f[i] + dt_bias[h * K + k];
        real du, da;  // dg/du and dg/dA_log
        if (form == KDA_GATE_SOFTPLUS) {
          du = -a * sigmoid_of(u);
          da = -a * softplus_of(u);
        } else {
          real s = sigmoid_of(a * u);
          real dz = lower_bound * s * (1 - s);
          du = dz * a;
          da = dz * a * u;
        }
        if (df) df[i] += dg[i] * du;
        if (ddt_bias) ddt_bias[h * K + k] += dg[i] * du;
        if (dA_log) dA_log[h] += dg[i] * da;
      }
    }
}
