// gemm and the linear layer: against a naive triple loop, and the backward against finite differences.
#include <criterion/criterion.h>

#include "kernels/gemm.h"
#include "tests/testing.h"

static void naive_gemm(bool ta, bool tb, int M, int N, int K, const real *A, const real *B, real *C) {
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double s = 0;
      for (int k = 0; k < K; k++) s += (double)(ta ? A[k * M + i] : A[i * K + k]) * (tb ? B[j * K + k] : B[k * N + j]);
      C[i * N + j] = (real)s;
    }
}

Test(gemm, matches_naive_in_all_transposes) {
  uint64_t rng = 1;
  int M = 7, N = 5, K = 9;
  real *A = test_alloc(M * K), *B = test_alloc(K * N), *C = test_alloc(M * N), *R = test_alloc(M * N);
  test_fill_normal(A, M * K, 1, &rng);
  test_fill_normal(B, K * N, 1, &rng);
  for (int t = 0; t < 4; t++) {
    bool ta = t & 1, tb = t & 2;
    gemm(ta, tb, M, N, K, 1, A, ta ? M : K, B, tb ? K : N, 0, C, N);
    naive_gemm(ta, tb, M, N, K, A, B, R);
    cr_assert_lt(test_rel_error(C, R, M * N), 1e-13, "transpose_a=%d transpose_b=%d", ta, tb);
  }
}

typedef struct { real *inp, *weight, *out, *w; int N, C, OC; } LinearCase;
static double linear_loss(void *p) {
  LinearCase *c = p;
  matmul_forward(c->out, c->inp, c->weight, c->N, c->C, c->OC);
  return test_dot(c->out, c->w, (size_t)c->N * c->OC);
}

Test(gemm, linear_backward_matches_finite_differences) {
  uint64_t rng = 2;
  LinearCase c = {.N = 6, .C = 5, .OC = 4};
  c.inp = test_alloc(c.N * c.C); c.weight = test_alloc(c.OC * c.C);
  c.out = test_alloc(c.N * c.OC); c.w = test_alloc(c.N * c.OC);
  test_fill_normal(c.inp, c.N * c.C, 1, &rng);
  test_fill_normal(c.weight, c.OC * c.C, 1, &rng);
  test_fill_normal(c.w, c.N * c.OC, 1, &rng);
  real *dinp = test_alloc(c.N * c.C), *dweight = test_alloc(c.OC * c.C);
  matmul_backward(dinp, dweight, c.w, c.inp, c.weight, c.N, c.C, c.OC);
  cr_assert_lt(test_grad_check(linear_loss, &c, c.inp, dinp, c.N * c.C, 1000, 1e-6), 1e-8);
  cr_assert_lt(test_grad_check(linear_loss, &c, c.weight, dweight, c.OC * c.C, 1000, 1e-6), 1e-8);
}
