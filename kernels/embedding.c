// Token embedding; see embedding.h.
#include "kernels/embedding.h"

#include <string.h>

void embedding_forward(real *out, const int *tokens, const real *table, int N, int C) {
  for (int n = 0; n < N; n++) memcpy(out + (size_t)n * C, table + (size_t)tokens[n] * C, (size_t)C * sizeof(real));
}

void embedding_backward(real *dtable, const real *dout, const int *tokens, int N, int C) {
  for (int n = 0; n < N; n++) {
    real *row = dtable + (size_t)tokens[n] * C;
    const real *d = dout + (size_t)n * C;
    for (int c = 0; c < C; c++) row[c] += d[c];
  }
}
