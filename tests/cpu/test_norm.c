// Embedding and the normalizations: forwards against the formulas, backwards against finite differences.
#include <criterion/criterion.h>

#include "kernels/activation.h"
#include "kernels/embedding.h"
#include "kernels/norm.h"
#include "tests/testing.h"

#define N 5
#define C 7
#define H 3
#define D 4

typedef struct {
  real *x, *gate, *weight, *w, *out, *rstd;
  int *tokens;
  real eps;
  double scale;
} NormCase;

static NormCase make_case(double scale, uint64_t seed) {
  uint64_t rng = seed;
  NormCase c = {.x = test_alloc(N * H * D * 2), .gate = test_alloc(N * H * D), .weight = test_alloc(C + D),
                .w = test_alloc(N * H * D * 2), .out = test_alloc(N * H * D * 2), .rstd = test_alloc(N * H),
                .eps = 1e-5, .scale = scale};
  test_fill_normal(c.x, N * H * D * 2, scale, &rng);
  test_fill_normal(c.gate, N * H * D, 2, &rng);
  test_fill_uniform(c.weight, C + D, 0.5, 1.5, &rng);
  test_fill_normal(c.w, N * H * D * 2, 1, &rng);
  return c;
}

static double rmsnorm_loss(void *p) {
  NormCase *c = p;
  rmsnorm_forward(c->out, c->rstd, c->x, c->weight, c->eps, N, C);
  return test_dot(c->out, c->w, N * C);
}

Test(norm, rmsnorm_forward_and_backward) {
  for (int trial = 0; trial < 2; trial++) {
    NormCase c = make_case(trial ? 1e-3 : 1.0, 10 + trial);  // tiny inputs too: eps matters there
    rmsnorm_loss(&c);
    for (int n = 0; n < N; n++) {
      double ms = 0;
      for (int i = 0; i < C; i++) ms += c.x[n * C + i] * c.x[n * C + i];
      double r = 1 / sqrt(ms / C + c.eps);
      for (int i = 0; i < C; i++) cr_assert_float_eq(c.out[n * C + i], c.x[n * C + i] * r * c.weight[i], 1e-12);
    }
    real *dx = test_alloc(N * C), *dw = test_alloc(C);
    rmsnorm_backward(dx, dw, c.w, c.x, c.weight, c.rstd, N, C);
    cr_assert_lt(test_grad_check(rmsnorm_loss, &c, c.x, dx, N * C, 100, 1e-6 * c.scale), 1e-6);
    cr_assert_lt(test_grad_check(rmsnorm_loss, &c, c.weight, dw, C, 100, 1e-6), 1e-6);
  }
}

static double gated_loss(void *p) {
  NormCase *c = p;
  gated_rmsnorm_forward(c->out, c->rstd, c->x, c->gate, c->weight, c->eps, N, H, D);
  return test_dot(c->out, c->w, N * H * D);
}

Test(norm, gated_head_rmsnorm_forward_and_backward) {
  NormCase c = make_case(1.0, 3);
  gated_loss(&c);
  for (int row = 0; row < N * H; row++) {
    double ms = 0;
    for (int i = 0; i < D; i++) ms += c.x[row * D + i] * c.x[row * D + i];
    double r = 1 / sqrt(ms / D + c.eps);
    for (int i = 0; i < D; i++) {
      double expect = c.x[row * D + i] * r * c.weight[i] / (1 + exp(-c.gate[row * D + i]));
      cr_assert_float_eq(c.out[row * D + i], expect, 1e-12);
    }
  }
  real *dx = test_alloc(N * H * D), *dgate = test_alloc(N * H * D), *dw = test_alloc(D);
  gated_rmsnorm_backward(dx, dgate, dw, c.w, c.x, c.gate, c.weight, c.rstd, N, H, D);
  cr_assert_lt(test_grad_check(gated_loss, &c, c.x, dx, N * H * D, 100, 1e-6), 1e-6);
  cr_assert_lt(test_grad_check(gated_loss, &c, c.gate, dgate, N * H * D, 100, 1e-6), 1e-6);
  cr_assert_lt(test_grad_check(gated_loss, &c, c.weight, dw, D, 100, 1e-6), 1e-6);
}

static double l2_loss(void *p) {
  NormCase *c = p;
  l2norm_forward(c->out, c->rstd, c->x, (real)1e-6, N * H, D);
  return test_dot(c->out, c->w, N * H * D);
}

Test(norm, l2norm_forward_and_backward) {
  for (int trial = 0; trial < 2; trial++) {
    NormCase c = make_case(trial ? 1e-2 : 1.0, 20 + trial);
    l2_loss(&c);
    for (int row = 0; row < N * H; row++) {
      double ss = 0;
      for (int i = 0; i < D; i++) ss += c.x[row * D + i] * c.x[row * D + i];
      for (int i = 0; i < D; i++) cr_assert_float_eq(c.out[row * D + i], c.x[row * D + i] / sqrt(ss + 1e-6), 1e-12);
    }
    real *dx = test_alloc(N * H * D);
    l2norm_backward(dx, c.w, c.x, c.rstd, N * H, D);
    cr_assert_lt(test_grad_check(l2_loss, &c, c.x, dx, N * H * D, 100, 1e-6 * c.scale), 1e-6);
  }
}

typedef struct {
  int tokens[N];
  real *table, *out, *w;
} EmbeddingCase;

static double embedding_loss(void *p) {
  EmbeddingCase *c = p;
  embedding_forward(c->out, c->tokens, c->table, N, C);
  return test_dot(c->out, c->w, N * C);
}

Test(norm, embedding_forward_and_backward) {
  uint64_t rng = 4;
  EmbeddingCase c = {.tokens = {3, 0, 3, 5, 1}, .table = test_alloc(6 * C), .out = test_alloc(N * C),
                     .w = test_alloc(N * C)};
  test_fill_normal(c.table, 6 * C, 1, &rng);
  test_fill_normal(c.w, N * C, 1, &rng);
  embedding_loss(&c);
  for (int n = 0; n < N; n++)
    for (int i = 0; i < C; i++) cr_assert_eq(c.out[n * C + i], c.table[c.tokens[n] * C + i]);
  real *dtable = test_alloc(6 * C);
  embedding_backward(dtable, c.w, c.tokens, N, C);
  cr_assert_lt(test_grad_check(embedding_loss, &c, c.table, dtable, 6 * C, 100, 1e-6), 1e-8);
  for (int i = 0; i < C; i++) cr_assert_eq(dtable[4 * C + i], 0, "an unused row got a gradient");
}
