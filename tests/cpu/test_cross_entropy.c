// LM head + cross-entropy over vocabulary chunks: against full logits computed naively, the backward
// against finite differences, ignored targets, and independence from the chunk size.
#include <criterion/criterion.h>

#include "kernels/cross_entropy.h"
#include "tests/testing.h"

typedef struct {
  int N, C, V, vocab_chunk;
  real *x, *weight, *dlosses;  // (N, C), (V, C), (N)
  real *losses, *lse;          // (N), (N)
  int *targets;                // (N), some < 0
  int *argmax;                 // (N)
} CrossEntropyCase;

static CrossEntropyCase case_create(int N, int C, int V, int vocab_chunk, uint64_t seed) {
  CrossEntropyCase c = {.N = N, .C = C, .V = V, .vocab_chunk = vocab_chunk};
  uint64_t rng = seed;
  c.x = test_alloc((size_t)N * C); c.weight = test_alloc((size_t)V * C); c.dlosses = test_alloc(N);
  c.losses = test_alloc(N); c.lse = test_alloc(N);
  c.targets = malloc(sizeof(int) * N);
  c.argmax = malloc(sizeof(int) * N);
  test_fill_normal(c.x, (size_t)N * C, 1, &rng);
  test_fill_normal(c.weight, (size_t)V * C, 1, &rng);
  test_fill_normal(c.dlosses, N, 1, &rng);
  for (int n = 0; n < N; n++) c.targets[n] = (n % 5 == 3) ? -1 : (int)(test_rand_u64(&rng) % (uint64_t)V);
  return c;
}

static void case_free(CrossEntropyCase *c) {
  free(c->x); free(c->weight); free(c->dlosses); free(c->losses); free(c->lse); free(c->targets); free(c->argmax);
}

static void case_forward(CrossEntropyCase *c) {
  lm_head_cross_entropy_forward(c->losses, c->lse, c->argmax, c->x, c->weight, c->targets, c->N, c->C, c->V, c->vocab_chunk);
}

static void naive_cross_entropy(const CrossEntropyCase *c, real *losses, real *lse, int *argmax) {
  double *logits = malloc(sizeof(double) * c->V);
  for (int n = 0; n < c->N; n++) {
    double m = -INFINITY;
    for (int v = 0; v < c->V; v++) {
      double s = 0;
      for (int i = 0; i < c->C; i++) s += (double)c->x[(size_t)n * c->C + i] * c->weight[(size_t)v * c->C + i];
      logits[v] = s;
      if (s > m) argmax[n] = v;
      m = fmax(m, s);
    }
    double z = 0;
    for (int v = 0; v < c->V; v++) z += exp(logits[v] - m);
    lse[n] = m + log(z);
    losses[n] = c->targets[n] < 0 ? 0 : lse[n] - logits[c->targets[n]];
  }
  free(logits);
}

Test(cross_entropy, forward_matches_full_logits) {
  // 130 rows span two row blocks; V = 37 is not a multiple of the chunk 8. std-1 inputs with C = 16
  // give logits of several units, so the log-sum-exp shift matters.
  CrossEntropyCase c = case_create(130, 16, 37, 8, 21);
  real *losses = test_alloc(c.N), *lse = test_alloc(c.N);
  int *argmax = malloc(sizeof(int) * c.N);
  case_forward(&c);
  naive_cross_entropy(&c, losses, lse, argmax);
  for (int n = 0; n < c.N; n++) cr_assert_eq(c.argmax[n], argmax[n], "row %d argmax", n);
  free(argmax);
  cr_assert_lt(test_rel_error(c.losses, losses, c.N), 1e-13);
  cr_assert_lt(test_rel_error(c.lse, lse, c.N), 1e-13);
  for (int n = 0; n < c.N; n++) {
    if (c.targets[n] < 0) cr_assert_eq(c.losses[n], 0, "row %d has no target and must have no loss", n);
    else cr_assert_gt(c.losses[n], 0);
  }
  free(losses); free(lse);
  case_free(&c);
}

Test(cross_entropy, chunk_one_and_chunk_beyond_vocab_agree) {
  CrossEntropyCase c = case_create(9, 6, 13, 1, 22);
  size_t nx = (size_t)c.N * c.C, nw = (size_t)c.V * c.C;
  real *losses[3], *dx[3], *dweight[3];
  int chunks[3] = {1, 13, 100};
  for (int i = 0; i < 3; i++) {
    c.vocab_chunk = chunks[i];
    case_forward(&c);
    losses[i] = test_copy(c.losses, c.N);
    dx[i] = test_alloc(nx); dweight[i] = test_alloc(nw);
    lm_head_cross_entropy_backward(dx[i], dweight[i], c.dlosses, c.x, c.weight, c.targets, c.lse, c.N, c.C, c.V,
                                   c.vocab_chunk);
  }
  for (int i = 1; i < 3; i++) {
    cr_assert_lt(test_rel_error(losses[i], losses[0], c.N), 1e-14, "chunk %d losses", chunks[i]);
    cr_assert_lt(test_rel_error(dx[i], dx[0], nx), 1e-14, "chunk %d dx", chunks[i]);
    cr_assert_lt(test_rel_error(dweight[i], dweight[0], nw), 1e-14, "chunk %d dweight", chunks[i]);
  }
  for (int i = 0; i < 3; i++) { free(losses[i]); free(dx[i]); free(dweight[i]); }
  case_free(&c);
}

static double cross_entropy_loss(void *ctx) {
  CrossEntropyCase *c = ctx;
  case_forward(c);
  return test_dot(c->losses, c->dlosses, c->N);
}

Test(cross_entropy, backward_matches_finite_differences) {
  CrossEntropyCase c = case_create(7, 5, 11, 4, 23);
  size_t nx = (size_t)c.N * c.C, nw = (size_t)c.V * c.C;
  real *dx = test_alloc(nx), *dweight = test_alloc(nw);
  case_forward(&c);
  lm_head_cross_entropy_backward(dx, dweight, c.dlosses, c.x, c.weight, c.targets, c.lse, c.N, c.C, c.V,
                                 c.vocab_chunk);
  cr_assert_lt(test_grad_check(cross_entropy_loss, &c, c.x, dx, nx, 1000, 1e-6), 1e-6, "dx");
  cr_assert_lt(test_grad_check(cross_entropy_loss, &c, c.weight, dweight, nw, 1000, 1e-6), 1e-6, "dweight");
  // Rows without a target get no gradient; a second backward adds the same amount again.
  for (int n = 0; n < c.N; n++)
    if (c.targets[n] < 0)
      for (int i = 0; i < c.C; i++) cr_assert_eq(dx[(size_t)n * c.C + i], 0, "row %d has no target", n);
  real *dx2 = test_copy(dx, nx);
  case_forward(&c);
  lm_head_cross_entropy_backward(dx2, NULL, c.dlosses, c.x, c.weight, c.targets, c.lse, c.N, c.C, c.V,
                                 c.vocab_chunk);
  for (size_t i = 0; i < nx; i++) dx[i] *= 2;
  cr_assert_lt(test_rel_error(dx2, dx, nx), 1e-14, "backward adds into dx");
  free(dx); free(dweight); free(dx2);
  case_free(&c);
}
