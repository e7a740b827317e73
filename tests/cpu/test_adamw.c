// AdamW against an independent fp64 computation over several steps and against the closed form of
// the first step; the gradient norm and clipping factor on known values.
#include <criterion/criterion.h>

#include "optim/adamw.h"
#include "optim/grad_norm.h"
#include "tests/testing.h"

Test(adamw, steps_match_independent_fp64) {
  uint64_t rng = 21;
  size_t n = 37;
  real *w = test_alloc(n), *m = test_alloc(n), *v = test_alloc(n), *g = test_alloc(n);
  double *w_ref = calloc(n, sizeof(double)), *m_ref = calloc(n, sizeof(double)), *v_ref = calloc(n, sizeof(double));
  test_fill_normal(w, n, 1.0, &rng);
  for (size_t i = 0; i < n; i++) w_ref[i] = w[i];
  AdamWConfig config = {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  double lr = 3e-3;
  for (long step = 1; step <= 4; step++) {
    test_fill_normal(g, n, step == 3 ? 1e-9 : 0.5, &rng);  // one step with gradients near eps
    adamw_step(w, m, v, g, n, &config, lr, step);
    for (size_t i = 0; i < n; i++) {
      m_ref[i] = 0.9 * m_ref[i] + 0.1 * g[i];
      v_ref[i] = 0.95 * v_ref[i] + 0.05 * g[i] * g[i];
      double m_hat = m_ref[i] / (1 - pow(0.9, step)), v_hat = v_ref[i] / (1 - pow(0.95, step));
      w_ref[i] = w_ref[i] * (1 - lr * 0.1) - lr * m_hat / (sqrt(v_hat) + 1e-8);
    }
    for (size_t i = 0; i < n; i++) {
      cr_assert_float_eq(m[i], m_ref[i], 1e-15, "step %ld first moment %zu", step, i);
      cr_assert_float_eq(v[i], v_ref[i], 1e-15, "step %ld second moment %zu", step, i);
      cr_assert_float_eq(w[i], w_ref[i], 1e-14, "step %ld weight %zu", step, i);
    }
  }
  free(w); free(m); free(v); free(g); free(w_ref); free(m_ref); free(v_ref);
}

// With bias correction the first step moves every weight by lr * g / (|g| + eps), about lr * sign(g),
// plus the decoupled decay lr * wd * w.
Test(adamw, first_step_is_sign_descent_plus_decay) {
  real w[4] = {1.0, -2.0, 0.5, 0.0}, m[4] = {0}, v[4] = {0};
  const real g[4] = {3.0, -1e-3, 0.0, 2e-8};
  AdamWConfig config = adamw_config_default();
  adamw_step(w, m, v, g, 4, &config, 0.01, 1);
  const double expected[4] = {1.0 - 0.01 * (3.0 / (3.0 + 1e-8) + 0.1 * 1.0),
                              -2.0 - 0.01 * (-1e-3 / (1e-3 + 1e-8) + 0.1 * -2.0),
                              0.5 - 0.01 * (0.0 + 0.1 * 0.5),
                              0.0 - 0.01 * (2e-8 / (2e-8 + 1e-8))};
  for (int i = 0; i < 4; i++) cr_assert_float_eq(w[i], expected[i], 1e-15, "element %d: %.17g", i, w[i]);
}

Test(grad_norm, sum_of_squares_and_clip_factor) {
  const real g[5] = {3, -4, 0, 12, 0};
  cr_assert_eq(grad_norm_squared(g, 5), 169.0);
  cr_assert_eq(grad_norm_squared(g, 0), 0.0);
  cr_assert_float_eq(grad_clip_scale(13.0, 1.0), 1.0 / (13.0 + 1e-6), 1e-16);
  cr_assert_eq(grad_clip_scale(0.5, 1.0), 1.0);
  cr_assert_eq(grad_clip_scale(0.0, 1.0), 1.0);
  cr_assert_eq(grad_clip_scale(1e6, 0.0), 1.0, "max_norm 0 turns clipping off");
}
