// The token-by-token KDA recurrence and its backward: the oracle of the chunkwise form; see kda.h.
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/kda.h"

// Strides of the (B, T, H, X) layouts.
#define AT(b, t, h, X) ((((size_t)(b) * T + (t)) * H + (h)) * (X))
#define STATE(b, h) (((size_t)(b) * H + (h)) * K * V)

static inline bool resets(const unsigned char *doc_start, int b, int t, int T) {
  return doc_start && t > 0 && doc_start[(size_t)b * T + t];
}

// One step: S <- (I - beta k k^T) diag(exp g) S + beta k v^T; writes u = beta (v - k^T diag(exp g) S).
static void recurrent_step(real *S, real *u, const real *k, const real *v, const real *g, real beta, int K, int V) {
  for (int a = 0; a < K; a++) {
    real decay = (real)exp((double)g[a]);
    for (int c = 0; c < V; c++) S[a * V + c] *= decay;
  }
  for (int c = 0; c < V; c++) {
    real kv = 0;
    for (int a = 0; a < K; a++) kv += k[a] * S[a * V + c];
    u[c] = beta * (v[c] - kv);
  }
  for (int a = 0; a < K; a++)
    for (int c = 0; c < V; c++) S[a * V + c] += k[a] * u[c];
}

void kda_recurrent_forward(real *out, real *final_state, const real *q, const real *k, const real *v, const real *g,
                           const real *beta, const real *initial_state, const unsigned char *doc_start, real scale,
                           int B, int T, int H, int K, int V) {
  real *S = klt_malloc(sizeof(real) * K * V), *u = klt_malloc(sizeof(real) * V);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      if (initial_state) memcpy(S, initial_state + STATE(b, h), sizeof(real) * K * V);
      else memset(S, 0, sizeof(real) * K * V);
      for (int t = 0; t < T; t++) {
        if (resets(doc_start, b, t, T)) memset(S, 0, sizeof(real) * K * V);
        recurrent_step(S, u, k + AT(b, t, h, K), v + AT(b, t, h, V), g + AT(b, t, h, K),
                       beta[((size_t)b * T + t) * H + h], K, V);
        const real *qt = q + AT(b, t, h, K);
        real *o = out + AT(b, t, h, V);
        for (int c = 0; c < V; c++) {
          real sum = 0;
          for (int a = 0; a < K; a++) sum += qt[a] * S[a * V + c];
          o[c] = scale * sum;
        }
      }
      if (final_state) memcpy(final_state + STATE(b, h), S, sizeof(real) * K * V);
    }
  free(S);
  free(u);
}

void kda_recurrent_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta, real *dinitial_state,
                            const real *dout, const real *dfinal_state, const real *q, const real *k, const real *v,
                            const real *g, const real *beta, const real *initial_state,
                            const unsigned char *doc_start, real scale, int B, int T, int H, int K, int V) {
  const size_t KV = (size_t)K * V;
  // Every state of one (row, head): states[t + 1] is the state after step t, states[0] the initial one.
  // The state entering step t is states[t], or zero where a document starts at t.
  real *states = klt_malloc(sizeof(real) * (T + 1) * KV);
  real *us = klt_malloc(sizeof(real) * (size_t)T * V);
  real *dS = klt_malloc(sizeof(real) * KV), *A = klt_malloc(sizeof(real) * KV), *du = klt_malloc(sizeof(real) * V);
  real *zero = klt_calloc(KV, sizeof(real));
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      real *S = states;
      if (initial_state) memcpy(S, initial_state + STATE(b, h), sizeof(real) * KV);
      else memset(S, 0, sizeof(real) * KV);
      for (int t = 0; t < T; t++) {
        if (resets(doc_start, b, t, T)) memset(states + (t + 1) * KV, 0, sizeof(real) * KV);
        else memcpy(states + (t + 1) * KV, states + t * KV, sizeof(real) * KV);
        recurrent_step(states + (t + 1) * KV, us + (size_t)t * V, k + AT(b, t, h, K), v + AT(b, t, h, V),
                       g + AT(b, t, h, K), beta[((size_t)b * T + t) * H + h], K, V);
      }
      if (dfinal_state) memcpy(dS, dfinal_state + STATE(b, h), sizeof(real) * KV);
      else memset(dS, 0, sizeof(real) * KV);
      for (int t = T - 1; t >= 0; t--) {
        const real *qt = q + AT(b, t, h, K), *kt = k + AT(b, t, h, K), *vt = v + AT(b, t, h, V);
        const real *gt = g + AT(b, t, h, K), *dot = dout + AT(b, t, h, V), *u = us + (size_t)t * V;
        const real *S_prev = resets(doc_start, b, t, T) ? zero : states + t * KV, *S_t = states + (t + 1) * KV;
        real bt = beta[((size_t)b * T + t) * H + h];
        // o = scale S_t^T q
        for (int a = 0; a < K; a++) {
          real sum = 0;
          for (int c = 0; c < V; c++) {
            dS[a * V + c] += scale * qt[a] * dot[c];
            sum += S_t[a * V + c] * dot[c];
          }
          if (dq) dq[AT(b, t, h, K) + a] += scale * sum;
        }
        // S_t = A + k u^T with A = diag(exp g) S_prev and u = beta (v - A^T k)
        for (int a = 0; a < K; a++) {
          real decay = (real)exp((double)gt[a]);
          for (int c = 0; c < V; c++) A[a * V + c] = decay * S_prev[a * V + c];
        }
        for (int c = 0; c < V; c++) {
          real sum = 0;
          for (int a = 0; a < K; a++) sum += dS[a * V + c] * kt[a];
          du[c] = sum;
        }
        // u = beta r with r = v - A^T k: dbeta = du . r, dv = beta du, dr = -beta du.
        real dbeta_t = 0;
        for (int c = 0; c < V; c++) {
          real kv = 0;
          for (int a = 0; a < K; a++) kv += kt[a] * A[a * V + c];
          dbeta_t += du[c] * (vt[c] - kv);
          if (dv) dv[AT(b, t, h, V) + c] += bt * du[c];
        }
        if (dbeta) dbeta[((size_t)b * T + t) * H + h] += dbeta_t;
        // r's -A^T k term: A gains -beta k du^T, k gains -beta A du; and S_t's k u^T gives k dS u.
        for (int a = 0; a < K; a++) {
          real dka = 0;
          for (int c = 0; c < V; c++) {
            dka += dS[a * V + c] * u[c] - bt * A[a * V + c] * du[c];
            dS[a * V + c] -= bt * kt[a] * du[c];  // now dA
          }
          if (dk) dk[AT(b, t, h, K) + a] += dka;
        }
        // A = diag(exp g) S_prev
        for (int a = 0; a < K; a++) {
          real decay = (real)exp((double)gt[a]), dga = 0;
          for (int c = 0; c < V; c++) {
            dga += dS[a * V + c] * A[a * V + c];
            dS[a * V + c] *= decay;
          }
          if (dg) dg[AT(b, t, h, K) + a] += dga;
        }
        if (resets(doc_start, b, t, T)) memset(dS, 0, sizeof(real) * KV);
      }
      if (dinitial_state)
        for (size_t i = 0; i < KV; i++) dinitial_state[STATE(b, h) + i] += dS[i];
    }
  free(states);
  free(us);
  free(dS);
  free(A);
  free(du);
  free(zero);
}
