/* Helpers shared by the tests: a seeded RNG, random fills, error measures, and the central
 * finite-difference gradient check every CPU backward is held to. Header-only (static functions),
 * compiled into each test against the fp64 build (`real` = double). */
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/real.h"

// xorshift64*: deterministic across platforms, enough for test inputs.
static inline uint64_t test_rand_u64(uint64_t *state) {
  uint64_t x = *state;
  x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
  *state = x;
  return x * 0x2545F4914F6CDD1DULL;
}
static inline double test_rand_uniform(uint64_t *state) {  // [0, 1)
  return (double)(test_rand_u64(state) >> 11) * (1.0 / 9007199254740992.0);
}
static inline double test_rand_normal(uint64_t *state) {
  double u1 = test_rand_uniform(state), u2 = test_rand_uniform(state);
  return sqrt(-2.0 * log(u1 + 1e-300)) * cos(6.283185307179586 * u2);
}
static inline void test_fill_uniform(real *x, size_t n, double lo, double hi, uint64_t *state) {
  for (size_t i = 0; i < n; i++) x[i] = (real)(lo + (hi - lo) * test_rand_uniform(state));
}
static inline void test_fill_normal(real *x, size_t n, double std, uint64_t *state) {
  for (size_t i = 0; i < n; i++) x[i] = (real)(std * test_rand_normal(state));
}
static inline real *test_alloc(size_t n) {  // zeroed
  real *p = (real *)calloc(n ? n : 1, sizeof(real));
  if (!p) abort();
  return p;
}
static inline real *test_copy(const real *x, size_t n) {
  real *p = test_alloc(n);
  for (size_t i = 0; i < n; i++) p[i] = x[i];
  return p;
}

// ||a - b|| / ||b|| (Frobenius), with ||b|| floored at 1e-30.
static inline double test_rel_error(const real *a, const real *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)a[i] - (double)b[i];
    num += d * d;
    den += (double)b[i] * (double)b[i];
  }
  return sqrt(num) / fmax(sqrt(den), 1e-30);
}
static inline double test_max_abs_diff(const real *a, const real *b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - (double)b[i]));
  return m;
}
// sum(x * w): the scalar "loss" whose gradient with respect to x is w.
static inline double test_dot(const real *x, const real *w, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; i++) s += (double)x[i] * (double)w[i];
  return s;
}

// Central finite differences of loss() with respect to x[0..n), compared with the analytic gradient
// `grad`. Checks every element when n <= max_checked, else max_checked elements spread by a stride.
// Returns ||fd - grad|| / ||fd|| over the checked elements. loss() must recompute from x.
typedef double (*TestLossFn)(void *ctx);
static inline double test_grad_check(TestLossFn loss, void *ctx, real *x, const real *grad, size_t n,
                                     size_t max_checked, double h) {
  size_t stride = (n <= max_checked) ? 1 : (n + max_checked - 1) / max_checked;
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i += stride) {
    real saved = x[i];
    x[i] = saved + (real)h;
    double lp = loss(ctx);
    x[i] = saved - (real)h;
    double lm = loss(ctx);
    x[i] = saved;
    double fd = (lp - lm) / (2 * h);
    double d = fd - (double)grad[i];
    num += d * d;
    den += fd * fd;
  }
  return sqrt(num) / fmax(sqrt(den), 1e-30);
}

// A fresh directory /tmp/<prefix>_XXXXXX for this test process, removed when the process exits: also
// when a test ends in exit(2) through a user error, where a Criterion fini would not run.
static char test_dir_to_remove[512];
static inline void test_remove_dir(void) {
  char command[600];
  snprintf(command, sizeof command, "rm -rf %s", test_dir_to_remove);
  if (system(command) != 0) fprintf(stderr, "could not remove %s\n", test_dir_to_remove);
}
static inline void test_make_dir(char *dir, size_t cap, const char *prefix) {
  snprintf(dir, cap, "/tmp/%s_XXXXXX", prefix);
  if (!mkdtemp(dir)) abort();
  snprintf(test_dir_to_remove, sizeof test_dir_to_remove, "%s", dir);
  atexit(test_remove_dir);
}
