// CPU reference of the chunked LM head + cross-entropy: blocks of rows against chunks of the
// vocabulary, logits through gemm(), an online log-sum-exp across chunks.
#include "kernels/cross_entropy.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "common/check.h"
#include "kernels/gemm.h"

// Rows per block: bounds the logits scratch at (128, vocab_chunk) and the per-row state on the stack.
#define CROSS_ENTROPY_BLOCK_ROWS 128

static void cross_entropy_check_shapes(const int *targets, int N, int C, int V, int vocab_chunk) {
  CHECK(N >= 0 && C > 0 && V > 0 && vocab_chunk > 0, "lm head shape N=%d C=%d V=%d vocab_chunk=%d", N, C, V,
        vocab_chunk);
  for (int n = 0; n < N; n++) CHECK(targets[n] < V, "target %d of row %d is not below V=%d", targets[n], n, V);
}

void lm_head_cross_entropy_forward(real *losses, real *lse, int *argmax, const real *x, const real *weight,
                                   const int *targets, int N, int C, int V, int vocab_chunk) {
  cross_entropy_check_shapes(targets, N, C, V, vocab_chunk);
  if (vocab_chunk > V) vocab_chunk = V;
  real *logits = klt_malloc(sizeof(real) * CROSS_ENTROPY_BLOCK_ROWS * vocab_chunk);  // (rows, vocab_chunk)
  real running_max[CROSS_ENTROPY_BLOCK_ROWS], running_sum[CROSS_ENTROPY_BLOCK_ROWS];
  real target_logit[CROSS_ENTROPY_BLOCK_ROWS];
  int best[CROSS_ENTROPY_BLOCK_ROWS];
  for (int n0 = 0; n0 < N; n0 += CROSS_ENTROPY_BLOCK_ROWS) {
    int rows = N - n0 < CROSS_ENTROPY_BLOCK_ROWS ? N - n0 : CROSS_ENTROPY_BLOCK_ROWS;
    for (int r = 0; r < rows; r++) {
      running_max[r] = -INFINITY;
      running_sum[r] = 0;
      target_logit[r] = 0;
      best[r] = 0;
    }
    for (int v0 = 0; v0 < V; v0 += vocab_chunk) {
      int width = V - v0 < vocab_chunk ? V - v0 : vocab_chunk;
      gemm(false, true, rows, width, C, 1, x + (size_t)n0 * C, C, weight + (size_t)v0 * C, C, 0, logits, width);
      for (int r = 0; r < rows; r++) {
        const real *row = logits + (size_t)r * width;
        real chunk_max = row[0];
        int chunk_best = 0;
        for (int c = 1; c < width; c++)
          if (row[c] > chunk_max) {
            chunk_max = row[c];
            chunk_best = c;
          }
        if (chunk_max > running_max[r]) best[r] = v0 + chunk_best;
        real new_max = chunk_max > running_max[r] ? chunk_max : running_max[r];
        real sum = 0;
        for (int c = 0; c < width; c++) sum += exp(row[c] - new_max);
        running_sum[r] = running_sum[r] * exp(running_max[r] - new_max) + sum;
        running_max[r] = new_max;
        int target = targets[n0 + r];
        if (target >= v0 && target < v0 + width) target_logit[r] = row[target - v0];
      }
    }
    for (int r = 0; r < rows; r++) {
      lse[n0 + r] = running_max[r] + log(running_sum[r]);
      losses[n0 + r] = targets[n0 + r] < 0 ? 0 : lse[n0 + r] - target_logit[r];
      if (argmax) argmax[n0 + r] = best[r];
    }
  }
  free(logits);
}

void lm_head_cross_entropy_backward(real *dx, real *dweight, const real *dlosses, const real *x, const real *weight,
                                    const int *targets, const real *lse, int N, int C, int V, int vocab_chunk) {
  cross_entropy_check_shapes(targets, N, C, V, vocab_chunk);
  if (!dx && !dweight) return;
  if (vocab_chunk > V) vocab_chunk = V;
  real *dlogits = klt_malloc(sizeof(real) * CROSS_ENTROPY_BLOCK_ROWS * vocab_chunk);  // (rows, vocab_chunk)
  for (int n0 = 0; n0 < N; n0 += CROSS_ENTROPY_BLOCK_ROWS) {
    int rows = N - n0 < CROSS_ENTROPY_BLOCK_ROWS ? N - n0 : CROSS_ENTROPY_BLOCK_ROWS;
    for (int v0 = 0; v0 < V; v0 += vocab_chunk) {
      int width = V - v0 < vocab_chunk ? V - v0 : vocab_chunk;
      gemm(false, true, rows, width, C, 1, x + (size_t)n0 * C, C, weight + (size_t)v0 * C, C, 0, dlogits, width);
      for (int r = 0; r < rows; r++) {
        real *row = dlogits + (size_t)r * width;
        int n = n0 + r, target = targets[n];
        if (target < 0) {
          for (int c = 0; c < width; c++) row[c] = 0;
          continue;
        }
        for (int c = 0; c < width; c++) row[c] = exp(row[c] - lse[n]) * dlosses[n];
        if (target >= v0 && target < v0 + width) row[target - v0] -= dlosses[n];
      }
      if (dx) gemm(false, false, rows, C, width, 1, dlogits, width, weight + (size_t)v0 * C, C, 1, dx + (size_t)n0 * C, C);
      if (dweight)
        gemm(true, false, width, C, rows, 1, dlogits, width, x + (size_t)n0 * C, C, 1, dweight + (size_t)v0 * C, C);
    }
  }
  free(dlogits);
}
