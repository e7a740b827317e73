/* Token embedding lookup: row t of the table for each token id. */
#pragma once
#include "common/real.h"

// out (N, C) = table[tokens[n]]; token ids are checked by the loader (a bad id never gets here).
void embedding_forward(real *out, const int *tokens, const real *table, int N, int C);
// dtable (V, C) += dout rows at their token ids, in token order (deterministic).
void embedding_backward(real *dtable, const real *dout, const int *tokens, int N, int C);
