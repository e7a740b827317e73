// Depthwise causal short convolution + SiLU; see conv.h.
#include "kernels/conv.h"

#include <math.h>

#include "kernels/activation.h"

// First position of the document that position t of row b belongs to.
static int document_begin(const unsigned char *doc_start, int b, int t, int T, int previous_begin) {
  if (doc_start && t > 0 && doc_start[(size_t)b * T + t]) return t;
  return previous_begin;
}

void short_conv_silu_forward(real *out, real *pre, const real *x, const real *weight, const unsigned char *doc_start,
                             int B, int T, int C, int W) {
  for (int b = 0; b < B; b++) {
    int begin = 0;
    for (int t = 0; t < T; t++) {
      begin = document_begin(doc_start, b, t, T, begin);
      size_t row = (size_t)b * T + t;
      for (int c = 0; c < C; c++) {
        real sum = 0;
        for (int j = 0; j < W; j++) {
          int s = t - (W - 1) + j;
          if (s >= begin) sum += weight[(size_t)c * W + j] * x[((size_t)b * T + s) * C + c];
        }
        pre[row * C + c] = sum;
        out[row * C + c] = silu_of(sum);
      }
    }
  }
}

void short_conv_silu_backward(real *dx, real *dweight, const real *dout, const real *x, const real *weight,
                              const real *pre, const unsigned char *doc_start, int B, int T, int C, int W) {
  for (int b = 0; b < B; b++) {
    int begin = 0;
    for (int t = 0; t < T; t++) {
      begin = document_begin(doc_start, b, t, T, begin);
      size_t row = (size_t)b * T + t;
      for (int c = 0; c < C; c++) {
        real dpre = dout[row * C + c] * silu_derivative(pre[row * C + c]);
        for (int j = 0; j < W; j++) {
          int s = t - (W - 1) + j;
          if (s < begin) continue;
          size_t source = ((size_t)b * T + s) * C + c;
          if (dweight) dweight[(size_t)c * W + j] += dpre * x[source];
          if (dx) dx[source] += dpre * weight[(size_t)c * W + j];
        }
      }
    }
  }
}
