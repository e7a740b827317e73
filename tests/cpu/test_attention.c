// Causal document-masked attention: the blocked forward against a naive per-query loop (outputs, lse
// and the per-head max logit), the backward against finite differences with documents and Dqk != Dv,
// and a query whose document holds only itself.
#include <criterion/criterion.h>
#include <string.h>

#include "kernels/attention.h"
#include "tests/testing.h"

typedef struct {
  int B, T, H, Dqk, Dv;
  real scale;
  real *q, *k, *v;                    // (B, T, H, Dqk), (B, T, H, Dqk), (B, T, H, Dv)
  real *out, *lse, *max_logit;        // (B, T, H, Dv), (B, T, H), (H)
  real *weights;                      // (B, T, H, Dv): loss = sum(out * weights)
  unsigned char *doc_start;           // (B, T) or NULL
} AttentionCase;

static AttentionCase case_create(int B, int T, int H, int Dqk, int Dv, double std, uint64_t seed) {
  AttentionCase c = {.B = B, .T = T, .H = H, .Dqk = Dqk, .Dv = Dv, .scale = 1 / sqrt((double)Dqk)};
  uint64_t rng = seed;
  size_t n_qk = (size_t)B * T * H * Dqk, n_v = (size_t)B * T * H * Dv;
  c.q = test_alloc(n_qk); c.k = test_alloc(n_qk); c.v = test_alloc(n_v);
  c.out = test_alloc(n_v); c.lse = test_alloc((size_t)B * T * H); c.max_logit = test_alloc(H);
  c.weights = test_alloc(n_v);
  test_fill_normal(c.q, n_qk, std, &rng);
  test_fill_normal(c.k, n_qk, std, &rng);
  test_fill_normal(c.v, n_v, 1, &rng);
  test_fill_normal(c.weights, n_v, 1, &rng);
  return c;
}

static void case_free(AttentionCase *c) {
  free(c->q); free(c->k); free(c->v); free(c->out); free(c->lse); free(c->max_logit); free(c->weights);
  free(c->doc_start);
}

// Marks the listed positions as document starts in every row of the batch.
static void case_set_documents(AttentionCase *c, const int *starts, int count) {
  c->doc_start = calloc((size_t)c->B * c->T, 1);
  for (int b = 0; b < c->B; b++)
    for (int i = 0; i < count; i++) c->doc_start[(size_t)b * c->T + starts[i]] = 1;
}

static void case_forward(AttentionCase *c) {
  attention_forward(c->out, c->lse, c->max_logit, c->q, c->k, c->v, c->doc_start, c->scale, c->B, c->T, c->H,
                    c->Dqk, c->Dv);
}

// One query at a time over every key of the row, the mask written as "same document and not later".
static void naive_attention(const AttentionCase *c, real *out, real *lse, real *max_logit) {
  int T = c->T, H = c->H, Dqk = c->Dqk, Dv = c->Dv;
  double *logits = malloc(sizeof(double) * T);
  for (int h = 0; h < H; h++) max_logit[h] = -INFINITY;
  for (int b = 0; b < c->B; b++) {
    int *document = malloc(sizeof(int) * T);  // document id of each position
    for (int t = 0, id = 0; t < T; t++) {
      if (t > 0 && c->doc_start && c->doc_start[(size_t)b * T + t]) id++;
      document[t] = id;
    }
    for (int i = 0; i < T; i++)
      for (int h = 0; h < H; h++) {
        const real *qi = c->q + ((size_t)(b * T + i) * H + h) * Dqk;
        double m = -INFINITY;
        for (int j = 0; j <= i; j++) {
          logits[j] = -INFINITY;
          if (document[j] != document[i]) continue;
          const real *kj = c->k + ((size_t)(b * T + j) * H + h) * Dqk;
          double s = 0;
          for (int d = 0; d < Dqk; d++) s += (double)qi[d] * kj[d];
          logits[j] = c->scale * s;
          m = fmax(m, logits[j]);
        }
        if (m > max_logit[h]) max_logit[h] = m;
        double z = 0;
        for (int j = 0; j <= i; j++) z += exp(logits[j] - m);
        real *o = out + ((size_t)(b * T + i) * H + h) * Dv;
        for (int d = 0; d < Dv; d++) {
          double s = 0;
          for (int j = 0; j <= i; j++) s += exp(logits[j] - m) / z * c->v[((size_t)(b * T + j) * H + h) * Dv + d];
          o[d] = s;
        }
        lse[(size_t)(b * T + i) * H + h] = m + log(z);
      }
    free(document);
  }
  free(logits);
}

static void check_against_naive(AttentionCase *c) {
  size_t n_v = (size_t)c->B * c->T * c->H * c->Dv, n_lse = (size_t)c->B * c->T * c->H;
  real *out = test_alloc(n_v), *lse = test_alloc(n_lse), *max_logit = test_alloc(c->H);
  case_forward(c);
  naive_attention(c, out, lse, max_logit);
  cr_assert_lt(test_rel_error(c->out, out, n_v), 1e-12, "out");
  cr_assert_lt(test_rel_error(c->lse, lse, n_lse), 1e-12, "lse");
  for (int h = 0; h < c->H; h++)
    cr_assert_float_eq(c->max_logit[h], max_logit[h], 1e-12, "max_logit[%d] %g vs %g", h, c->max_logit[h],
                       max_logit[h]);
  free(out); free(lse); free(max_logit);
}

Test(attention, forward_matches_naive_without_documents) {
  AttentionCase c = case_create(2, 150, 3, 12, 8, 1, 11);
  check_against_naive(&c);
  case_free(&c);
}

Test(attention, forward_matches_naive_with_documents_and_large_logits) {
  // Starts chosen so that some query blocks straddle documents and some key blocks lie wholly outside
  // a query's window; position 5 is a one-token document. std 3 gives logits of tens: the online
  // softmax must stay stable.
  AttentionCase c = case_create(2, 150, 2, 12, 8, 3, 12);
  int starts[] = {0, 5, 6, 40, 100, 149};
  case_set_documents(&c, starts, 6);
  check_against_naive(&c);
  case_free(&c);
}

Test(attention, max_logit_is_overwritten_not_accumulated) {
  AttentionCase c = case_create(1, 20, 2, 4, 4, 1, 13);
  c.max_logit[0] = c.max_logit[1] = 1e6;
  check_against_naive(&c);
  case_free(&c);
}

Test(attention, one_token_document_attends_only_to_itself) {
  AttentionCase c = case_create(1, 9, 2, 6, 5, 1, 14);
  int starts[] = {0, 4, 5};  // position 4 is alone in its document
  case_set_documents(&c, starts, 3);
  case_forward(&c);
  for (int h = 0; h < c.H; h++) {
    const real *o = c.out + ((size_t)4 * c.H + h) * c.Dv, *v4 = c.v + ((size_t)4 * c.H + h) * c.Dv;
    for (int d = 0; d < c.Dv; d++) cr_assert_float_eq(o[d], v4[d], 1e-14);
    double s = 0;
    for (int d = 0; d < c.Dqk; d++)
      s += c.q[((size_t)4 * c.H + h) * c.Dqk + d] * c.k[((size_t)4 * c.H + h) * c.Dqk + d];
    cr_assert_float_eq(c.lse[4 * c.H + h], c.scale * s, 1e-14);
  }
  // Its softmax has one entry, so its query gets no gradient and its key only through later queries
  // of its document (none).
  size_t n_qk = (size_t)c.T * c.H * c.Dqk;
  real *dq = test_alloc(n_qk), *dk = test_alloc(n_qk);
  attention_backward(dq, dk, NULL, c.weights, c.q, c.k, c.v, c.out, c.lse, c.doc_start, c.scale, c.B, c.T, c.H,
                     c.Dqk, c.Dv);
  for (int h = 0; h < c.H; h++)
    for (int d = 0; d < c.Dqk; d++) {
      cr_assert_float_eq(dq[((size_t)4 * c.H + h) * c.Dqk + d], 0, 1e-14);
      cr_assert_float_eq(dk[((size_t)4 * c.H + h) * c.Dqk + d], 0, 1e-14);
    }
  free(dq); free(dk);
  case_free(&c);
}

static double attention_loss(void *ctx) {
  AttentionCase *c = ctx;
  case_forward(c);
  return test_dot(c->out, c->weights, (size_t)c->B * c->T * c->H * c->Dv);
}

static void check_backward(AttentionCase *c) {
  size_t n_qk = (size_t)c->B * c->T * c->H * c->Dqk, n_v = (size_t)c->B * c->T * c->H * c->Dv;
  real *dq = test_alloc(n_qk), *dk = test_alloc(n_qk), *dv = test_alloc(n_v);
  case_forward(c);
  attention_backward(dq, dk, dv, c->weights, c->q, c->k, c->v, c->out, c->lse, c->doc_start, c->scale, c->B,
                     c->T, c->H, c->Dqk, c->Dv);
  cr_assert_lt(test_grad_check(attention_loss, c, c->q, dq, n_qk, 700, 1e-6), 1e-6, "dq");
  cr_assert_lt(test_grad_check(attention_loss, c, c->k, dk, n_qk, 700, 1e-6), 1e-6, "dk");
  cr_assert_lt(test_grad_check(attention_loss, c, c->v, dv, n_v, 700, 1e-6), 1e-6, "dv");
  // Accumulation: a second backward adds the same gradient again (after a forward at the unperturbed
  // inputs: the finite differences left out and lse at a perturbed point).
  real *dq2 = test_copy(dq, n_qk);
  case_forward(c);
  attention_backward(dq2, NULL, NULL, c->weights, c->q, c->k, c->v, c->out, c->lse, c->doc_start, c->scale, c->B,
                     c->T, c->H, c->Dqk, c->Dv);
  for (size_t i = 0; i < n_qk; i++) dq[i] *= 2;
  cr_assert_lt(test_rel_error(dq2, dq, n_qk), 1e-13, "backward adds into dq");
  free(dq); free(dk); free(dv); free(dq2);
}

Test(attention, backward_matches_finite_differences_with_documents) {
  AttentionCase c = case_create(2, 70, 2, 6, 4, 1, 15);  // 70 > one block of queries and of keys
  int starts[] = {0, 3, 4, 30, 66, 69};
  case_set_documents(&c, starts, 6);
  check_backward(&c);
  case_free(&c);
}

Test(attention, backward_matches_finite_differences_without_documents) {
  AttentionCase c = case_create(1, 67, 2, 5, 7, 1, 16);  // Dv > Dqk as well
  check_backward(&c);
  case_free(&c);
}
