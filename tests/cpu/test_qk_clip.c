// QK-Clip on an MLA layer built here: heads pushed above tau come back to exactly tau on the same
// input (every logit of theirs scaled by gamma, split sqrt(gamma) / sqrt(gamma) on nope and gamma on
// pe), other heads and all value rows are untouched.
#include <criterion/criterion.h>
#include <string.h>

#include "optim/qk_clip.h"
#include "tests/testing.h"

enum { H = 3, DN = 4, DR = 2, DV = 3, C = 5, L = 6, T = 7 };

typedef struct {
  real x[T * C];                     // (T, C) mixer input
  real latent[T * L];                // (T, L) normalized kv latent
  real k_pe[T * DR];                 // (T, Dr) shared by all heads, from kv_a_proj
  real q_proj[H * (DN + DR) * C];    // (H * (Dn + Dr), C)
  real kv_b_proj[H * (DN + DV) * L]; // (H * (Dn + Dv), L)
} Attention;

static double dot_row(const real *w, const real *v, int n) {
  double s = 0;
  for (int i = 0; i < n; i++) s += (double)w[i] * v[i];
  return s;
}

// Scaled logit of head h, query token i, key token j, written out from the MLA definition.
static double logit(const Attention *a, int h, int i, int j) {
  double s = 0;
  for (int d = 0; d < DN; d++) {
    double q = dot_row(a->q_proj + ((size_t)h * (DN + DR) + d) * C, a->x + i * C, C);
    double k = dot_row(a->kv_b_proj + ((size_t)h * (DN + DV) + d) * L, a->latent + j * L, L);
    s += q * k;
  }
  for (int d = 0; d < DR; d++)
    s += dot_row(a->q_proj + ((size_t)h * (DN + DR) + DN + d) * C, a->x + i * C, C) * a->k_pe[j * DR + d];
  return s / sqrt((double)(DN + DR));
}

static void max_logits(const Attention *a, real *out) {
  for (int h = 0; h < H; h++) {
    double m = -1e300;
    for (int i = 0; i < T; i++)
      for (int j = 0; j <= i; j++) m = fmax(m, logit(a, h, i, j));
    out[h] = m;
  }
}

static void scale(real *w, int rows, int cols, double factor) {
  for (int i = 0; i < rows * cols; i++) w[i] *= factor;
}

Test(qk_clip, clipped_heads_give_exactly_tau) {
  uint64_t rng = 41;
  Attention a;
  test_fill_normal(a.x, T * C, 1, &rng);
  test_fill_normal(a.latent, T * L, 1, &rng);
  real kv_a_proj_pe[DR * C];  // (Dr, C) the k_pe rows of kv_a_proj
  test_fill_normal(kv_a_proj_pe, DR * C, 1, &rng);
  for (int t = 0; t < T; t++)
    for (int d = 0; d < DR; d++) a.k_pe[t * DR + d] = dot_row(kv_a_proj_pe + d * C, a.x + t * C, C);
  test_fill_normal(a.q_proj, H * (DN + DR) * C, 1, &rng);
  test_fill_normal(a.kv_b_proj, H * (DN + DV) * L, 1, &rng);

  const real tau = 100;
  real before[H], after[H];
  max_logits(&a, before);
  cr_assert(before[0] > 0 && before[1] > 0 && before[2] > 0, "the random heads should have positive maxima");
  // Head 1 overflows through its queries (nope and pe), head 2 through its nope keys and pe queries.
  scale(a.q_proj + 1 * (DN + DR) * C, DN + DR, C, 3 * tau / before[1]);
  scale(a.kv_b_proj + 2 * (DN + DV) * L, DN, L, 40 * tau / before[2]);
  scale(a.q_proj + 2 * (DN + DR) * C + DN * C, DR, C, 40 * tau / before[2]);
  max_logits(&a, before);
  cr_assert_lt(before[0], tau, "head 0 must stay under tau (%g)", before[0]);
  cr_assert_gt(before[1], tau);
  cr_assert_gt(before[2], tau);

  Attention old = a;
  int clipped = qk_clip_apply(a.q_proj, a.kv_b_proj, before, tau, H, DN, DR, DV, C, L);
  cr_assert_eq(clipped, 2);
  max_logits(&a, after);
  cr_assert_eq(after[0], before[0]);
  for (int h = 1; h < H; h++) {
    cr_assert_float_eq(after[h], tau, 1e-9, "head %d: max logit %.17g after the clip", h, after[h]);
    double gamma = tau / before[h];
    for (int i = 0; i < T; i++)
      for (int j = 0; j <= i; j++)
        cr_assert_float_eq(logit(&a, h, i, j), gamma * logit(&old, h, i, j), 1e-9, "head %d (%d, %d)", h, i, j);
    for (int d = 0; d < DN + DR; d++)
      for (int c = 0; c < C; c++) {
        size_t at = ((size_t)h * (DN + DR) + d) * C + c;
        double expected = old.q_proj[at] * (d < DN ? sqrt(gamma) : gamma);
        cr_assert_float_eq(a.q_proj[at], expected, 1e-12, "head %d q row %d", h, d);
      }
    for (int d = 0; d < DN; d++)
      for (int l = 0; l < L; l++) {
        size_t at = ((size_t)h * (DN + DV) + d) * L + l;
        cr_assert_float_eq(a.kv_b_proj[at], old.kv_b_proj[at] * sqrt(gamma), 1e-12, "head %d k row %d", h, d);
      }
  }
  // Head 0 entirely, and every head's value rows, are bit-for-bit the same.
  cr_assert_eq(memcmp(a.q_proj, old.q_proj, (DN + DR) * C * sizeof(real)), 0);
  cr_assert_eq(memcmp(a.kv_b_proj, old.kv_b_proj, (DN + DV) * L * sizeof(real)), 0);
  for (int h = 0; h < H; h++) {
    size_t v_rows = ((size_t)h * (DN + DV) + DN) * L;
    cr_assert_eq(memcmp(a.kv_b_proj + v_rows, old.kv_b_proj + v_rows, DV * L * sizeof(real)), 0, "head %d v", h);
  }
}

Test(qk_clip, heads_at_or_below_tau_or_not_positive_are_untouched) {
  uint64_t rng = 42;
  real q_proj[H * (DN + DR) * C], kv_b_proj[H * (DN + DV) * L];
  test_fill_normal(q_proj, H * (DN + DR) * C, 1, &rng);
  test_fill_normal(kv_b_proj, H * (DN + DV) * L, 1, &rng);
  real q_old[H * (DN + DR) * C], kv_old[H * (DN + DV) * L];
  memcpy(q_old, q_proj, sizeof q_old);
  memcpy(kv_old, kv_b_proj, sizeof kv_old);
  const real max_logit[H] = {100, 0, -250};
  cr_assert_eq(qk_clip_apply(q_proj, kv_b_proj, max_logit, 100, H, DN, DR, DV, C, L), 0);
  cr_assert_eq(memcmp(q_proj, q_old, sizeof q_old), 0);
  cr_assert_eq(memcmp(kv_b_proj, kv_old, sizeof kv_old), 0);
}

// The sharded optimizer clips q_proj and kv_b_proj on whichever rank owns each: with one of them NULL
// the other is scaled exactly as when both are given, and the count is the same.
Test(qk_clip, one_matrix_alone_is_scaled_as_with_both) {
  uint64_t rng = 7;
  real q_proj[H * (DN + DR) * C], kv_b_proj[H * (DN + DV) * L];
  test_fill_normal(q_proj, H * (DN + DR) * C, 1, &rng);
  test_fill_normal(kv_b_proj, H * (DN + DV) * L, 1, &rng);
  real q_both[H * (DN + DR) * C], kv_both[H * (DN + DV) * L], q_alone[H * (DN + DR) * C], kv_alone[H * (DN + DV) * L];
  memcpy(q_both, q_proj, sizeof q_both);
  memcpy(kv_both, kv_b_proj, sizeof kv_both);
  memcpy(q_alone, q_proj, sizeof q_alone);
  memcpy(kv_alone, kv_b_proj, sizeof kv_alone);
  const real max_logit[H] = {3, 0.5, 9};
  int both = qk_clip_apply(q_both, kv_both, max_logit, 1, H, DN, DR, DV, C, L);
  cr_assert_eq(both, 2);
  cr_assert_eq(qk_clip_apply(q_alone, NULL, max_logit, 1, H, DN, DR, DV, C, L), both);
  cr_assert_eq(qk_clip_apply(NULL, kv_alone, max_logit, 1, H, DN, DR, DV, C, L), both);
  cr_assert_eq(qk_clip_apply(NULL, NULL, max_logit, 1, H, DN, DR, DV, C, L), both);
  cr_assert_eq(memcmp(q_alone, q_both, sizeof q_both), 0);
  cr_assert_eq(memcmp(kv_alone, kv_both, sizeof kv_both), 0);
}
