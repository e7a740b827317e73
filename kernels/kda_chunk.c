// The chunkwise KDA algorithm, forward and backward, written the way a GPU kernel computes it: per
// chunk of at most C tokens (never spanning a document start), gates cumulated in log space, the
// pairwise decays exp(gc_i - gc_j) (exponents <= 0 for j <= i, so nothing overflows), the UT transform
// by forward substitution, and the state carried between chunks; see kda.h.
//
// Per chunk with state S (K, V) entering it, qs = scale * q, gc = cumsum(g) within the chunk:
//   L[i][j]  = beta_i sum_c k_i[c] k_j[c] exp(gc_i[c] - gc_j[c])          j < i
//   (I + L) [W | U] = diag(beta) [exp(gc) * K | V]                          forward substitution
//   Vp = U - W S                                                            pseudo-values
//   Aqk[i][j] = sum_c qs_i[c] k_j[c] exp(gc_i[c] - gc_j[c])                 j <= i
//   O = (exp(gc) * Qs) S + Aqk Vp
//   S' = diag(exp(gc_last)) S + (exp(gc_last - gc) * K)^T Vp
// The backward walks the chunks in reverse with the chunk-entry states recomputed by a forward pass,
// and inverts each step of the above; the pairwise terms give the gate gradient, reverse-cumulated.
//
// Pairwise decays, as a kernel does them: the chunk is cut into sub-chunks of 16 rows. Between a
// sub-chunk I and all earlier rows j the decay factors through the anchor a = gc at I's first row,
// exp(gc_i - gc_j) = exp(gc_i - a) * exp(a - gc_j), and both factors are <= 1 because gc only falls:
// the block is one GEMM of rescaled rows, and nothing can overflow. Inside a sub-chunk the decays are
// formed pair by pair.
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/gemm.h"
#include "kernels/kda.h"

#define AT(b, t, h, X) ((((size_t)(b) * T + (t)) * H + (h)) * (X))
#define STATE(b, h) (((size_t)(b) * H + (h)) * K * V)

// Scratch for one chunk of at most C tokens.
typedef struct {
  int C, K, V;
  real *qs, *k, *v, *gc, *beta;  // (C, K) (C, K) (C, V) (C, K) (C)
  real *L, *Aqk;                 // (C, C)
  real *X;                       // (C, K + V): [W | U]
  real *rhs;                     // (C, K + V): [exp(gc) * K | V]
  real *vp;                      // (C, V) pseudo-values
  real *qg, *kl;                 // (C, K): exp(gc) * qs, exp(gc_last - gc) * k
  real *el;                      // (K) exp(gc_last)
  real *eg;                      // (C, K) exp(gc)
  real *KK;                      // (C, C) sum_c k_i k_j exp(gc_i - gc_j), lower with diagonal
  real *fa, *ka, *qa, *fb, *kb;  // (C, K) anchored factors and rescaled rows of the current sub-chunk
  real *G1, *G2, *GJ, *WL;       // (C, K) (C, K) (C, K) (C, C) backward products
  // backward
  real *dvp, *dX, *dL, *dA, *dqg, *dkl, *dqs, *dk, *dgc, *del, *dS_in;
} ChunkScratch;

static void scratch_init(ChunkScratch *s, int C, int K, int V) {
  s->C = C;
  s->K = K;
  s->V = V;
  real **ck[] = {&s->qs, &s->k, &s->gc, &s->qg, &s->kl, &s->dqg, &s->dkl, &s->dqs, &s->dk, &s->dgc, &s->eg,
                 &s->fa, &s->ka, &s->qa, &s->fb, &s->kb, &s->G1, &s->G2, &s->GJ};
  for (size_t i = 0; i < sizeof ck / sizeof ck[0]; i++) *ck[i] = klt_calloc((size_t)C * K, sizeof(real));
  real **cv[] = {&s->v, &s->vp, &s->dvp};
  for (size_t i = 0; i < sizeof cv / sizeof cv[0]; i++) *cv[i] = klt_calloc((size_t)C * V, sizeof(real));
  real **cc[] = {&s->L, &s->Aqk, &s->dL, &s->dA, &s->KK, &s->WL};
  for (size_t i = 0; i < sizeof cc / sizeof cc[0]; i++) *cc[i] = klt_calloc((size_t)C * C, sizeof(real));
  s->X = klt_calloc((size_t)C * (K + V), sizeof(real));
  s->rhs = klt_calloc((size_t)C * (K + V), sizeof(real));
  s->dX = klt_calloc((size_t)C * (K + V), sizeof(real));
  s->beta = klt_calloc((size_t)C, sizeof(real));
  s->el = klt_calloc((size_t)K, sizeof(real));
  s->del = klt_calloc((size_t)K, sizeof(real));
  s->dS_in = klt_calloc((size_t)K * V, sizeof(real));
}

static void scratch_free(ChunkScratch *s) {
  real *all[] = {s->qs, s->k, s->gc, s->qg, s->kl, s->dqg, s->dkl, s->dqs, s->dk, s->dgc, s->v, s->vp, s->dvp,
                 s->L, s->Aqk, s->dL, s->dA, s->X, s->rhs, s->dX, s->beta, s->el, s->del, s->dS_in, s->eg, s->KK,
                 s->fa, s->ka, s->qa, s->fb, s->kb, s->G1, s->G2, s->GJ, s->WL};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

// End of the chunk starting at t0: at most C tokens, never past the next document start.
static int chunk_end(const unsigned char *doc_start, int b, int t0, int T, int C) {
  int end = t0 + 1;
  while (end < T && end < t0 + C && !(doc_start && doc_start[(size_t)b * T + end])) end++;
  return end;
}

#define KDA_SUBCHUNK 16

// For the sub-chunk starting at row I0 (m rows) and all rows j < I0: the anchored factors and rescaled
// rows fa = exp(gc_i - a), ka = k * fa, qa = qs * fa (rows of I) and fb = exp(a - gc_j), kb = k * fb.
static void anchor_rows(ChunkScratch *s, int I0, int m) {
  const int K = s->K;
  const real *a = s->gc + I0 * K;
  for (int r = 0; r < m; r++)
    for (int c = 0; c < K; c++) {
      int i = I0 + r;
      real f = real_exp(s->gc[i * K + c] - a[c]);
      s->fa[r * K + c] = f;
      s->ka[r * K + c] = f * s->k[i * K + c];
      s->qa[r * K + c] = f * s->qs[i * K + c];
    }
  for (int j = 0; j < I0; j++)
    for (int c = 0; c < K; c++) {
      real f = real_exp(a[c] - s->gc[j * K + c]);
      s->fb[j * K + c] = f;
      s->kb[j * K + c] = f * s->k[j * K + c];
    }
}

// KK[i][j] = sum_c k_i k_j exp(gc_i - gc_j) and Aqk[i][j] = sum_c qs_i k_j exp(gc_i - gc_j), j <= i;
// the upper triangles are zero.
static void pairwise_forward(ChunkScratch *s, int n) {
  const int K = s->K, C = s->C;
  memset(s->KK, 0, sizeof(real) * C * C);
  memset(s->Aqk, 0, sizeof(real) * C * C);
  for (int I0 = 0; I0 < n; I0 += KDA_SUBCHUNK) {
    int m = n - I0 < KDA_SUBCHUNK ? n - I0 : KDA_SUBCHUNK;
    for (int i = I0; i < I0 + m; i++)
      for (int j = I0; j <= i; j++) {
        real kk = 0, qk = 0;
        for (int c = 0; c < K; c++) {
          real e = real_exp(s->gc[i * K + c] - s->gc[j * K + c]);
          kk += s->k[i * K + c] * s->k[j * K + c] * e;
          qk += s->qs[i * K + c] * s->k[j * K + c] * e;
        }
        s->KK[i * C + j] = kk;
        s->Aqk[i * C + j] = qk;
      }
    if (I0 == 0) continue;
    anchor_rows(s, I0, m);
    gemm(false, true, m, I0, K, 1, s->ka, K, s->kb, K, 0, s->KK + I0 * C, C);
    gemm(false, true, m, I0, K, 1, s->qa, K, s->kb, K, 0, s->Aqk + I0 * C, C);
  }
}

// Given dL (strictly lower) and dA = dAqk (lower): adds into dk, dqs, dgc and dbeta (n rows).
static void pairwise_backward(ChunkScratch *s, int n, real *dbeta) {
  const int K = s->K, C = s->C;
  for (int I0 = 0; I0 < n; I0 += KDA_SUBCHUNK) {
    int m = n - I0 < KDA_SUBCHUNK ? n - I0 : KDA_SUBCHUNK;
    for (int i = I0; i < I0 + m; i++)
      for (int j = I0; j <= i; j++) {
        real dl = j < i ? s->dL[i * C + j] : 0, da = s->dA[i * C + j];
        if (dl == 0 && da == 0) continue;
        dbeta[i] += dl * s->KK[i * C + j];
        real wl = dl * s->beta[i];
        for (int c = 0; c < K; c++) {
          real e = real_exp(s->gc[i * K + c] - s->gc[j * K + c]);
          real ki = s->k[i * K + c], kj = s->k[j * K + c], qi = s->qs[i * K + c];
          s->dk[i * K + c] += wl * kj * e;
          s->dk[j * K + c] += (wl * ki + da * qi) * e;
          s->dqs[i * K + c] += da * kj * e;
          if (j < i) {  // a diagonal pair (e = 1) gives the gate nothing: its +t and -t would only round
            real t = (wl * ki + da * qi) * kj * e;
            s->dgc[i * K + c] += t;
            s->dgc[j * K + c] -= t;
          }
        }
      }
    if (I0 == 0) continue;
    anchor_rows(s, I0, m);
    // WL = dL * beta_i on the block rows I, columns j < I0; dA's block is read in place.
    for (int r = 0; r < m; r++) {
      int i = I0 + r;
      real sum = 0;
      for (int j = 0; j < I0; j++) {
        s->WL[r * C + j] = s->dL[i * C + j] * s->beta[i];
        sum += s->dL[i * C + j] * s->KK[i * C + j];
      }
      dbeta[i] += sum;
    }
    gemm(false, false, m, K, I0, 1, s->WL, C, s->kb, K, 0, s->G1, K);           // sum_j WL_ij kb_j
    gemm(false, false, m, K, I0, 1, s->dA + I0 * C, C, s->kb, K, 0, s->G2, K);  // sum_j dA_ij kb_j
    for (int r = 0; r < m; r++)
      for (int c = 0; c < K; c++) {
        int i = I0 + r;
        real g1 = s->G1[r * K + c], g2 = s->G2[r * K + c];
        s->dk[i * K + c] += s->fa[r * K + c] * g1;
        s->dqs[i * K + c] += s->fa[r * K + c] * g2;
        s->dgc[i * K + c] += s->ka[r * K + c] * g1 + s->qa[r * K + c] * g2;
      }
    gemm(true, false, I0, K, m, 1, s->WL, C, s->ka, K, 0, s->GJ, K);             // sum_i WL_ij ka_i
    gemm(true, false, I0, K, m, 1, s->dA + I0 * C, C, s->qa, K, 1, s->GJ, K);    // + sum_i dA_ij qa_i
    for (int j = 0; j < I0; j++)
      for (int c = 0; c < K; c++) {
        real gj = s->GJ[j * K + c];
        s->dk[j * K + c] += s->fb[j * K + c] * gj;
        s->dgc[j * K + c] -= s->kb[j * K + c] * gj;
      }
  }
}

// Loads the chunk [t0, t0 + n) of row b, head h and computes everything the output and state need.
static void chunk_prepare(ChunkScratch *s, const real *q, const real *k, const real *v, const real *g,
                          const real *beta, real scale, int b, int h, int t0, int n, int T, int H) {
  const int K = s->K, V = s->V, KV = K + V;
  for (int i = 0; i < n; i++) {
    int t = t0 + i;
    for (int c = 0; c < K; c++) {
      s->qs[i * K + c] = scale * q[AT(b, t, h, K) + c];
      s->k[i * K + c] = k[AT(b, t, h, K) + c];
      s->gc[i * K + c] = g[AT(b, t, h, K) + c] + (i ? s->gc[(i - 1) * K + c] : 0);
    }
    for (int c = 0; c < V; c++) s->v[i * V + c] = v[AT(b, t, h, V) + c];
    s->beta[i] = beta[((size_t)b * T + t) * H + h];
  }
  const real *gl = s->gc + (n - 1) * K;
  for (int c = 0; c < K; c++) s->el[c] = real_exp(gl[c]);
  for (int i = 0; i < n; i++)
    for (int c = 0; c < K; c++) {
      real e = real_exp(s->gc[i * K + c]);
      s->eg[i * K + c] = e;
      s->qg[i * K + c] = e * s->qs[i * K + c];
      s->kl[i * K + c] = real_exp(gl[c] - s->gc[i * K + c]) * s->k[i * K + c];
      s->rhs[i * KV + c] = e * s->k[i * K + c];
    }
  for (int i = 0; i < n; i++)
    for (int c = 0; c < V; c++) s->rhs[i * KV + K + c] = s->v[i * V + c];
  pairwise_forward(s, n);
  for (int i = 0; i < n; i++)
    for (int j = 0; j < i; j++) s->L[i * s->C + j] = s->beta[i] * s->KK[i * s->C + j];
  // UT transform: (I + L) X = diag(beta) rhs, row by row.
  for (int i = 0; i < n; i++) {
    real *x = s->X + i * KV;
    for (int c = 0; c < KV; c++) x[c] = s->beta[i] * s->rhs[i * KV + c];
    for (int j = 0; j < i; j++) {
      real l = s->L[i * s->C + j];
      if (l != 0)
        for (int c = 0; c < KV; c++) x[c] -= l * s->X[j * KV + c];
    }
  }
}

// Vp = U - W S; out rows = qg S + Aqk Vp; S <- diag(el) S + kl^T Vp.
static void chunk_apply(ChunkScratch *s, real *out_rows, size_t out_stride, real *S, int n) {
  const int K = s->K, V = s->V, KV = K + V;
  for (int i = 0; i < n; i++) memcpy(s->vp + i * V, s->X + i * KV + K, sizeof(real) * V);
  gemm(false, false, n, V, K, -1, s->X, KV, S, V, 1, s->vp, V);
  if (out_rows) {
    real *o = klt_malloc(sizeof(real) * n * V);
    gemm(false, false, n, V, K, 1, s->qg, K, S, V, 0, o, V);
    gemm(false, false, n, V, n, 1, s->Aqk, s->C, s->vp, V, 1, o, V);
    for (int i = 0; i < n; i++) memcpy(out_rows + i * out_stride, o + i * V, sizeof(real) * V);
    free(o);
  }
  for (int c = 0; c < K; c++)
    for (int d = 0; d < V; d++) S[c * V + d] *= s->el[c];
  gemm(true, false, K, V, n, 1, s->kl, K, s->vp, V, 1, S, V);
}

void kda_chunk_forward(real *out, real *final_state, const real *q, const real *k, const real *v, const real *g,
                       const real *beta, const real *initial_state, const unsigned char *doc_start, real scale, int B,
                       int T, int H, int K, int V, int chunk_size) {
  CHECK(chunk_size > 0, "chunk size %d", chunk_size);
  ChunkScratch s;
  scratch_init(&s, chunk_size, K, V);
  real *S = klt_malloc(sizeof(real) * K * V);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      if (initial_state) memcpy(S, initial_state + STATE(b, h), sizeof(real) * K * V);
      else memset(S, 0, sizeof(real) * K * V);
      for (int t0 = 0; t0 < T;) {
        int t1 = chunk_end(doc_start, b, t0, T, chunk_size);
        if (t0 > 0 && doc_start && doc_start[(size_t)b * T + t0]) memset(S, 0, sizeof(real) * K * V);
        chunk_prepare(&s, q, k, v, g, beta, scale, b, h, t0, t1 - t0, T, H);
        chunk_apply(&s, out + AT(b, t0, h, V), (size_t)H * V, S, t1 - t0);
        t0 = t1;
      }
      if (final_state) memcpy(final_state + STATE(b, h), S, sizeof(real) * K * V);
    }
  free(S);
  scratch_free(&s);
}

void kda_chunk_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta, real *dinitial_state, const real *dout,
                        const real *dfinal_state, const real *q, const real *k, const real *v, const real *g,
                        const real *beta, const real *initial_state, const unsigned char *doc_start, real scale,
                        int B, int T, int H, int K, int V, int chunk_size) {
  CHECK(chunk_size > 0, "chunk size %d", chunk_size);
  const int C = chunk_size, KV = K + V;
  const size_t state = (size_t)K * V;
  ChunkScratch s;
  scratch_init(&s, C, K, V);
  int *starts = klt_malloc(sizeof(int) * (T + 1));
  real *entry = klt_malloc(sizeof(real) * (size_t)T * state);  // state entering each chunk
  real *S = klt_malloc(sizeof(real) * state), *dS = klt_malloc(sizeof(real) * state);
  real *dO = klt_malloc(sizeof(real) * (size_t)C * V);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      // Forward pass: chunk boundaries and the state entering each chunk.
      int chunks = 0;
      if (initial_state) memcpy(S, initial_state + STATE(b, h), sizeof(real) * state);
      else memset(S, 0, sizeof(real) * state);
      for (int t0 = 0; t0 < T; chunks++) {
        int t1 = chunk_end(doc_start, b, t0, T, C);
        if (t0 > 0 && doc_start && doc_start[(size_t)b * T + t0]) memset(S, 0, sizeof(real) * state);
        starts[chunks] = t0;
        memcpy(entry + chunks * state, S, sizeof(real) * state);
        chunk_prepare(&s, q, k, v, g, beta, scale, b, h, t0, t1 - t0, T, H);
        chunk_apply(&s, NULL, 0, S, t1 - t0);
        t0 = t1;
      }
      starts[chunks] = T;
      if (dfinal_state) memcpy(dS, dfinal_state + STATE(b, h), sizeof(real) * state);
      else memset(dS, 0, sizeof(real) * state);
      for (int ci = chunks - 1; ci >= 0; ci--) {
        const int t0 = starts[ci], n = starts[ci + 1] - t0;
        const real *S0 = entry + ci * state;
        chunk_prepare(&s, q, k, v, g, beta, scale, b, h, t0, n, T, H);
        memcpy(S, S0, sizeof(real) * state);
        chunk_apply(&s, NULL, 0, S, n);  // fills vp
        for (int i = 0; i < n; i++) memcpy(dO + i * V, dout + AT(b, t0 + i, h, V), sizeof(real) * V);
        // dVp = Aqk^T dO + kl dS'
        gemm(true, false, n, V, n, 1, s.Aqk, C, dO, V, 0, s.dvp, V);
        gemm(false, false, n, V, K, 1, s.kl, K, dS, V, 1, s.dvp, V);
        // dS_in = qg^T dO + diag(el) dS' - W^T dVp
        gemm(true, false, K, V, n, 1, s.qg, K, dO, V, 0, s.dS_in, V);
        for (int c = 0; c < K; c++)
          for (int d = 0; d < V; d++) s.dS_in[c * V + d] += s.el[c] * dS[c * V + d];
        gemm(true, false, K, V, n, -1, s.X, KV, s.dvp, V, 1, s.dS_in, V);
        // dqg = dO S0^T; dkl = Vp dS'^T; del = rowsum(dS' * S0); dAqk = dO Vp^T (lower)
        gemm(false, true, n, K, V, 1, dO, V, S0, V, 0, s.dqg, K);
        gemm(false, true, n, K, V, 1, s.vp, V, dS, V, 0, s.dkl, K);
        for (int c = 0; c < K; c++) {
          real sum = 0;
          for (int d = 0; d < V; d++) sum += dS[c * V + d] * S0[c * V + d];
          s.del[c] = sum;
        }
        gemm(false, true, n, n, V, 1, dO, V, s.vp, V, 0, s.dA, C);
        // dX = [dW | dU] = [-dVp S0^T | dVp]
        for (int i = 0; i < n; i++) memcpy(s.dX + i * KV + K, s.dvp + i * V, sizeof(real) * V);
        gemm(false, true, n, K, V, -1, s.dvp, V, S0, V, 0, s.dX, KV);
        // Through the UT transform: Y = (I + L)^-T dX (back substitution), dL = -Y X^T (strictly lower),
        // d(diag(beta) rhs) = Y.
        for (int i = n - 1; i >= 0; i--) {
          real *y = s.dX + i * KV;
          for (int j = i + 1; j < n; j++) {
            real l = s.L[j * C + i];
            if (l != 0)
              for (int c = 0; c < KV; c++) y[c] -= l * s.dX[j * KV + c];
          }
        }
        for (int i = 0; i < n; i++)
          for (int j = 0; j < i; j++) {
            real sum = 0;
            for (int c = 0; c < KV; c++) sum += s.dX[i * KV + c] * s.X[j * KV + c];
            s.dL[i * C + j] = -sum;
          }
        memset(s.dqs, 0, sizeof(real) * n * K);
        memset(s.dk, 0, sizeof(real) * n * K);
        memset(s.dgc, 0, sizeof(real) * n * K);
        real *dbeta_local = klt_calloc((size_t)n, sizeof(real));
        for (int i = 0; i < n; i++) {
          const real *y = s.dX + i * KV, *rhs = s.rhs + i * KV;
          real sum = 0;
          for (int c = 0; c < KV; c++) sum += y[c] * rhs[c];
          dbeta_local[i] += sum;
          for (int c = 0; c < K; c++) {  // rhs k part = exp(gc) k
            real e = s.eg[i * K + c];
            real dkd = s.beta[i] * y[c];
            s.dk[i * K + c] += e * dkd;
            s.dgc[i * K + c] += dkd * rhs[c];
          }
          if (dv)
            for (int c = 0; c < V; c++) dv[AT(b, t0 + i, h, V) + c] += s.beta[i] * y[K + c];
        }
        // dVp's U part went to dv above through Y; qg, kl, el:
        for (int i = 0; i < n; i++)
          for (int c = 0; c < K; c++) {
            real e = s.eg[i * K + c];
            s.dqs[i * K + c] += e * s.dqg[i * K + c];
            s.dgc[i * K + c] += s.dqg[i * K + c] * s.qg[i * K + c];
            real el_i = real_exp(s.gc[(n - 1) * K + c] - s.gc[i * K + c]);
            s.dk[i * K + c] += el_i * s.dkl[i * K + c];
            if (i < n - 1) {  // (the last row's term would cancel itself)
              real t = s.dkl[i * K + c] * s.kl[i * K + c];
              s.dgc[i * K + c] -= t;
              s.dgc[(n - 1) * K + c] += t;
            }
          }
        for (int c = 0; c < K; c++) s.dgc[(n - 1) * K + c] += s.del[c] * s.el[c];
        pairwise_backward(&s, n, dbeta_local);
        // Write out: dq = scale dqs; dg = reverse cumsum of dgc within the chunk.
        for (int i = n - 1; i >= 0; i--) {
          int t = t0 + i;
          if (i < n - 1)
            for (int c = 0; c < K; c++) s.dgc[i * K + c] += s.dgc[(i + 1) * K + c];
          for (int c = 0; c < K; c++) {
            if (dq) dq[AT(b, t, h, K) + c] += scale * s.dqs[i * K + c];
            if (dk) dk[AT(b, t, h, K) + c] += s.dk[i * K + c];
            if (dg) dg[AT(b, t, h, K) + c] += s.dgc[i * K + c];
          }
          if (dbeta) dbeta[((size_t)b * T + t) * H + h] += dbeta_local[i];
        }
        free(dbeta_local);
        // The state entering this chunk: zero at a document start (nothing flows further back).
        bool reset = t0 > 0 && doc_start && doc_start[(size_t)b * T + t0];
        if (reset) memset(dS, 0, sizeof(real) * state);
        else memcpy(dS, s.dS_in, sizeof(real) * state);
      }
      if (dinitial_state)
        for (size_t i = 0; i < state; i++) dinitial_state[STATE(b, h) + i] += dS[i];
    }
  free(starts);
  free(entry);
  free(S);
  free(dS);
  free(dO);
  scratch_free(&s);
}
