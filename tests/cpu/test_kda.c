// KDA core: the recurrence's backward against finite differences; the chunkwise form against the
// recurrence (forward and backward) with initial states, document starts inside and at chunk
// boundaries, lengths not a multiple of the chunk, and decays close to 0 and close to 1.
#include <criterion/criterion.h>
#include <stdbool.h>

#include "kernels/kda.h"
#include "tests/testing.h"

typedef struct {
  int B, T, H, K, V, chunk;
  bool chunked;
  real *q, *k, *v, *g, *beta, *h0, *out, *hT, *w_out, *w_state;
  unsigned char *doc_start;
  real scale;
} KdaCase;

// Inputs as the layer makes them: q, k L2-normalized rows, beta in (0, 1), g <= 0 in [g_low, g_high].
static KdaCase make_case(int B, int T, int H, int K, int V, int chunk, double g_low, double g_high, uint64_t seed) {
  KdaCase c = {.B = B, .T = T, .H = H, .K = K, .V = V, .chunk = chunk, .scale = (real)(1 / sqrt((double)K))};
  size_t nk = (size_t)B * T * H * K, nv = (size_t)B * T * H * V, ns = (size_t)B * H * K * V;
  uint64_t rng = seed;
  c.q = test_alloc(nk); c.k = test_alloc(nk); c.v = test_alloc(nv); c.g = test_alloc(nk);
  c.beta = test_alloc((size_t)B * T * H); c.h0 = test_alloc(ns); c.out = test_alloc(nv); c.hT = test_alloc(ns);
  c.w_out = test_alloc(nv); c.w_state = test_alloc(ns);
  c.doc_start = calloc((size_t)B * T, 1);
  test_fill_normal(c.q, nk, 1, &rng);
  test_fill_normal(c.k, nk, 1, &rng);
  for (size_t r = 0; r < nk / K; r++) {
    double nq = 0, nkk = 0;
    for (int i = 0; i < K; i++) { nq += c.q[r * K + i] * c.q[r * K + i]; nkk += c.k[r * K + i] * c.k[r * K + i]; }
    for (int i = 0; i < K; i++) { c.q[r * K + i] /= sqrt(nq); c.k[r * K + i] /= sqrt(nkk); }
  }
  test_fill_normal(c.v, nv, 1, &rng);
  test_fill_uniform(c.g, nk, g_low, g_high, &rng);
  test_fill_uniform(c.beta, (size_t)B * T * H, 0.05, 0.95, &rng);
  test_fill_normal(c.h0, ns, 0.5, &rng);
  test_fill_normal(c.w_out, nv, 1, &rng);
  test_fill_normal(c.w_state, ns, 1, &rng);
  return c;
}

static void forward(KdaCase *c) {
  if (c->chunked)
    kda_chunk_forward(c->out, c->hT, c->q, c->k, c->v, c->g, c->beta, c->h0, c->doc_start, c->scale, c->B, c->T, c->H,
                      c->K, c->V, c->chunk);
  else
    kda_recurrent_forward(c->out, c->hT, c->q, c->k, c->v, c->g, c->beta, c->h0, c->doc_start, c->scale, c->B, c->T,
                          c->H, c->K, c->V);
}

static double loss(void *p) {
  KdaCase *c = p;
  forward(c);
  return test_dot(c->out, c->w_out, (size_t)c->B * c->T * c->H * c->V) +
         test_dot(c->hT, c->w_state, (size_t)c->B * c->H * c->K * c->V);
}

typedef struct {
  real *dq, *dk, *dv, *dg, *dbeta, *dh0;
} KdaGrads;

static KdaGrads backward(KdaCase *c) {
  size_t nk = (size_t)c->B * c->T * c->H * c->K, nv = (size_t)c->B * c->T * c->H * c->V;
  KdaGrads d = {test_alloc(nk), test_alloc(nk), test_alloc(nv), test_alloc(nk), test_alloc((size_t)c->B * c->T * c->H),
                test_alloc((size_t)c->B * c->H * c->K * c->V)};
  if (c->chunked)
    kda_chunk_backward(d.dq, d.dk, d.dv, d.dg, d.dbeta, d.dh0, c->w_out, c->w_state, c->q, c->k, c->v, c->g, c->beta,
                       c->h0, c->doc_start, c->scale, c->B, c->T, c->H, c->K, c->V, c->chunk);
  else
    kda_recurrent_backward(d.dq, d.dk, d.dv, d.dg, d.dbeta, d.dh0, c->w_out, c->w_state, c->q, c->k, c->v, c->g,
                           c->beta, c->h0, c->doc_start, c->scale, c->B, c->T, c->H, c->K, c->V);
  return d;
}

static void check_finite_differences(KdaCase *c, const char *what) {
  KdaGrads d = backward(c);
  size_t nk = (size_t)c->B * c->T * c->H * c->K, nv = (size_t)c->B * c->T * c->H * c->V;
  struct { const char *name; real *x, *dx; size_t n; } inputs[] = {
      {"q", c->q, d.dq, nk}, {"k", c->k, d.dk, nk}, {"v", c->v, d.dv, nv}, {"g", c->g, d.dg, nk},
      {"beta", c->beta, d.dbeta, (size_t)c->B * c->T * c->H}, {"initial_state", c->h0, d.dh0, (size_t)c->B * c->H * c->K * c->V}};
  for (int i = 0; i < 6; i++) {
    double error = test_grad_check(loss, c, inputs[i].x, inputs[i].dx, inputs[i].n, 300, 1e-6);
    cr_expect_lt(error, 1e-6, "%s: d%s relative error %.3g", what, inputs[i].name, error);
  }
}

static void mark_documents(KdaCase *c) {
  for (int b = 0; b < c->B; b++) c->doc_start[(size_t)b * c->T] = 1;
  c->doc_start[7] = 1;                       // row 0: a document starting inside a chunk
  c->doc_start[2 * c->chunk] = 1;            // and one exactly at a chunk boundary
  c->doc_start[(size_t)c->T + c->T - 2] = 1; // row 1: a two-token document at the end
}

Test(kda, recurrence_backward_matches_finite_differences) {
  KdaCase c = make_case(2, 23, 2, 5, 4, 4, -2, -0.01, 1);
  mark_documents(&c);
  check_finite_differences(&c, "recurrent");
}

Test(kda, chunk_backward_matches_finite_differences) {
  KdaCase c = make_case(2, 40, 2, 5, 4, 36, -2, -0.01, 2);
  c.chunked = true;
  mark_documents(&c);
  check_finite_differences(&c, "chunk");
}

static void compare_forms(KdaCase *c, const char *what) {
  size_t nk = (size_t)c->B * c->T * c->H * c->K, nv = (size_t)c->B * c->T * c->H * c->V;
  size_t ns = (size_t)c->B * c->H * c->K * c->V, nb = (size_t)c->B * c->T * c->H;
  c->chunked = false;
  forward(c);
  real *out = test_copy(c->out, nv), *hT = test_copy(c->hT, ns);
  KdaGrads r = backward(c);
  c->chunked = true;
  forward(c);
  cr_assert_lt(test_rel_error(c->out, out, nv), 1e-10, "%s: output", what);
  cr_assert_lt(test_rel_error(c->hT, hT, ns), 1e-10, "%s: final state", what);
  KdaGrads k = backward(c);
  cr_assert_lt(test_rel_error(k.dq, r.dq, nk), 1e-10, "%s: dq", what);
  cr_assert_lt(test_rel_error(k.dk, r.dk, nk), 1e-10, "%s: dk", what);
  cr_assert_lt(test_rel_error(k.dv, r.dv, nv), 1e-10, "%s: dv", what);
  cr_assert_lt(test_rel_error(k.dg, r.dg, nk), 1e-10, "%s: dg", what);
  cr_assert_lt(test_rel_error(k.dbeta, r.dbeta, nb), 1e-10, "%s: dbeta", what);
  cr_assert_lt(test_rel_error(k.dh0, r.dh0, ns), 1e-10, "%s: dinitial_state", what);
  for (size_t i = 0; i < nv; i++) cr_assert(isfinite(c->out[i]), "%s: non-finite output", what);
}

Test(kda, chunk_equals_recurrence) {
  int chunks[] = {64, 8, 5};
  for (int i = 0; i < 3; i++) {
    KdaCase c = make_case(2, 70, 2, 6, 5, chunks[i], -1.5, -0.001, 10 + i);
    mark_documents(&c);
    compare_forms(&c, chunks[i] == 64 ? "chunk 64" : "small chunk");
  }
}

Test(kda, chunk_equals_recurrence_for_extreme_decays) {
  KdaCase near_zero = make_case(1, 40, 2, 6, 5, 64, -20, -8, 21);   // decay exp(g) down to ~2e-9
  compare_forms(&near_zero, "decay near 0");
  KdaCase near_one = make_case(1, 40, 2, 6, 5, 64, -1e-4, -1e-6, 22);  // decay ~1
  compare_forms(&near_one, "decay near 1");
}

Test(kda, final_state_continues_the_sequence) {
  KdaCase whole = make_case(1, 50, 2, 6, 5, 8, -1, -0.01, 31);
  whole.chunked = true;
  forward(&whole);
  int T1 = 21, H = 2, K = 6, V = 5;
  KdaCase first = whole, second = whole;
  first.T = T1;
  first.out = test_alloc((size_t)T1 * H * V);
  first.hT = test_alloc((size_t)H * K * V);
  forward(&first);
  second.T = 50 - T1;
  second.q = whole.q + (size_t)T1 * H * K; second.k = whole.k + (size_t)T1 * H * K; second.g = whole.g + (size_t)T1 * H * K;
  second.v = whole.v + (size_t)T1 * H * V; second.beta = whole.beta + (size_t)T1 * H;
  second.h0 = first.hT;
  second.out = test_alloc((size_t)(50 - T1) * H * V);
  second.hT = test_alloc((size_t)H * K * V);
  second.doc_start = whole.doc_start + T1;
  forward(&second);
  cr_assert_lt(test_rel_error(second.out, whole.out + (size_t)T1 * H * V, (size_t)(50 - T1) * H * V), 1e-12);
  cr_assert_lt(test_rel_error(second.hT, whole.hT, (size_t)H * K * V), 1e-12);
}
