// CPU reference of MoE routing and of the permutation that groups tokens by expert.
#include "kernels/moe.h"

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"

// Guards the renormalization against all chosen scores underflowing to zero.
#define MOE_WEIGHT_EPSILON 1e-20

void moe_router_forward(int *expert_index, real *expert_weight, real *scores, const real *logits, const real *bias,
                        int N, int E, int top_k, real routed_scaling) {
  CHECK(N >= 0 && E > 0 && top_k > 0 && top_k <= E, "router shape N=%d E=%d top_k=%d", N, E, top_k);
  for (int n = 0; n < N; n++) {
    real *s = scores + (size_t)n * E;
    for (int e = 0; e < E; e++) s[e] = 1 / (1 + exp(-logits[(size_t)n * E + e]));
    int *chosen = expert_index + (size_t)n * top_k;
    // top_k passes of a selection: top_k is small (8) and the scan keeps the tie rule obvious, a strict
    // > comparison in increasing e keeps the lower index.
    for (int j = 0; j < top_k; j++) {
      int best = -1;
      real best_value = 0;
      for (int e = 0; e < E; e++) {
        bool taken = false;
        for (int i = 0; i < j; i++) taken = taken || chosen[i] == e;
        if (taken) continue;
        real value = s[e] + (bias ? bias[e] : 0);
        if (best < 0 || value > best_value) {
          best = e;
          best_value = value;
        }
      }
      chosen[j] = best;
    }
    real sum = 0;
    for (int j = 0; j < top_k; j++) sum += s[chosen[j]];
    for (int j = 0; j < top_k; j++)
      expert_weight[(size_t)n * top_k + j] = s[chosen[j]] / (sum + (real)MOE_WEIGHT_EPSILON) * routed_scaling;
  }
}

void moe_router_backward(real *dlogits, const real *dexpert_weight, const real *scores, const int *expert_index,
                         int N, int E, int top_k, real routed_scaling) {
  CHECK(N >= 0 && E > 0 && top_k > 0 && top_k <= E, "router shape N=%d E=%d top_k=%d", N, E, top_k);
  for (int n = 0; n < N; n++) {
    const real *s = scores + (size_t)n * E;
    const int *chosen = expert_index + (size_t)n * top_k;
    const real *dw = dexpert_weight + (size_t)n * top_k;
    // w_j = r s_j / S with S = sum of chosen s + eps, so ds_i = (r / S) (dw_i - sum_j dw_j s_j / S).
    real sum = (real)MOE_WEIGHT_EPSILON, weighted = 0;
    for (int j = 0; j < top_k; j++) sum += s[chosen[j]];
    for (int j = 0; j < top_k; j++) weighted += dw[j] * s[chosen[j]];
    for (int j = 0; j < top_k; j++) {
      int e = chosen[j];
      real dscore = routed_scaling / sum * (dw[j] - weighted / sum);
      dlogits[(size_t)n * E + e] += dscore * s[e] * (1 - s[e]);
    }
  }
}

void moe_permute_plan(int *expert_counts, int *expert_offsets, int *row_of_assignment, int *token_of_row,
                      const int *expert_index, int N, int E, int top_k) {
  CHECK(N >= 0 && E > 0 && top_k > 0, "permute shape N=%d E=%d top_k=%d", N, E, top_k);
  size_t assignments = (size_t)N * top_k;
  for (int e = 0; e < E; e++) expert_counts[e] = 0;
  for (size_t a = 0; a < assignments; a++) {
    CHECK(expert_index[a] >= 0 && expert_index[a] < E, "expert index %d out of [0, %d)", expert_index[a], E);
    expert_counts[expert_index[a]]++;
  }
  expert_offsets[0] = 0;
  for (int e = 0; e < E; e++) expert_offsets[e + 1] = expert_offsets[e] + expert_counts[e];
  // The counts double as fill cursors, and are whole again once every assignment is placed.
  for (int e = 0; e < E; e++) expert_counts[e] = 0;
  for (size_t a = 0; a < assignments; a++) {
    int e = expert_index[a];
    int row = expert_offsets[e] + expert_counts[e]++;
    row_of_assignment[a] = row;
    token_of_row[row] = (int)(a / (size_t)top_k);
  }
}

void moe_permute_forward(real *sorted, const real *x, const int *token_of_row, int rows, int C) {
  for (int r = 0; r < rows; r++) {
    const real *source = x + (size_t)token_of_row[r] * C;
    real *destination = sorted + (size_t)r * C;
    for (int c = 0; c < C; c++) destination[c] = source[c];
  }
}

void moe_permute_backward(real *dx, const real *dsorted, const int *token_of_row, int rows, int C) {
  for (int r = 0; r < rows; r++) {
    const real *source = dsorted + (size_t)r * C;
    real *destination = dx + (size_t)token_of_row[r] * C;
    for (int c = 0; c < C; c++) destination[c] += source[c];
  }
}

void moe_unpermute_forward(real *out, const real *expert_out, const real *expert_weight, const int *row_of_assignment,
                           int N, int top_k, int C) {
  for (int n = 0; n < N; n++) {
    real *o = out + (size_t)n * C;
    for (int c = 0; c < C; c++) o[c] = 0;
    for (int j = 0; j < top_k; j++) {
      size_t a = (size_t)n * top_k + j;
      const real *source = expert_out + (size_t)row_of_assignment[a] * C;
      for (int c = 0; c < C; c++) o[c] += expert_weight[a] * source[c];
    }
  }
}

void moe_unpermute_backward(real *dexpert_out, real *dexpert_weight, const real *dout, const real *expert_out,
                            const real *expert_weight, const int *row_of_assignment, int N, int top_k, int C) {
  for (int n = 0; n < N; n++) {
    const real *g = dout + (size_t)n * C;
    for (int j = 0; j < top_k; j++) {
      size_t a = (size_t)n * top_k + j;
      size_t row = (size_t)row_of_assignment[a];
      if (dexpert_out) {
        real *destination = dexpert_out + row * C;
        for (int c = 0; c < C; c++) destination[c] += expert_weight[a] * g[c];
      }
      if (dexpert_weight) {
        const real *source = expert_out + row * C;
        real dot = 0;
        for (int c = 0; c < C; c++) dot += g[c] * source[c];
        dexpert_weight[a] += dot;
      }
    }
  }
}

double moe_sequence_balance_loss(real *dlogits, const real *scores, const int *expert_index, int B, int T, int E,
                                 int top_k, real coef, real weight) {
  double *f = klt_calloc((size_t)E, sizeof(double)), *P = klt_calloc((size_t)E, sizeof(double));
  double total = 0;
  for (int b = 0; b < B; b++) {
    memset(f, 0, sizeof(double) * E);
    memset(P, 0, sizeof(double) * E);
    for (int t = 0; t < T; t++) {
      size_t n = (size_t)b * T + t;
      for (int j = 0; j < top_k; j++) f[expert_index[n * top_k + j]] += (double)E / ((double)top_k * T);
      double sum = 0;
      for (int e = 0; e < E; e++) sum += scores[n * E + e];
      for (int e = 0; e < E; e++) P[e] += scores[n * E + e] / sum / T;
    }
    double loss = 0;
    for (int e = 0; e < E; e++) loss += f[e] * P[e];
    total += coef * loss;
    if (!dlogits) continue;
    // dL/ds_te = coef / T * (f_e / S_t - sum_j f_j s_tj / S_t^2), then through the sigmoid.
    for (int t = 0; t < T; t++) {
      size_t n = (size_t)b * T + t;
      double sum = 0, fs = 0;
      for (int e = 0; e < E; e++) {
        sum += scores[n * E + e];
        fs += f[e] * scores[n * E + e];
      }
      for (int e = 0; e < E; e++) {
        double s = scores[n * E + e];
        double ds = coef / T * (f[e] / sum - fs / (sum * sum));
        dlogits[n * E + e] += (real)(weight * ds * s * (1 - s));
      }
    }
  }
  free(f);
  free(P);
  return total;
}
