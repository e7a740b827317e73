// Router bias: the update rule on a hand-made load, the imbalance measure, and a skewed router
// (sigmoid scores + bias, top-k, computed here) that the updates bring towards balance.
#include <criterion/criterion.h>

#include "optim/router_bias.h"
#include "tests/testing.h"

Test(router_bias, moves_by_rate_towards_the_mean) {
  real bias[4] = {0.5, 0.5, 0.5, 0.5};
  const double load[4] = {10, 30, 20, 20};  // mean 20
  router_bias_update(bias, load, 4, 0.25);
  cr_assert_eq(bias[0], 0.75, "underloaded expert gains");
  cr_assert_eq(bias[1], 0.25, "overloaded expert loses");
  cr_assert_eq(bias[2], 0.5, "expert at the mean stays");
  cr_assert_eq(bias[3], 0.5, "expert at the mean stays");
}

Test(router_bias, load_imbalance_is_max_over_mean) {
  const double balanced[3] = {7, 7, 7}, skewed[4] = {1, 1, 1, 9}, empty[2] = {0, 0};
  cr_assert_eq(load_imbalance(balanced, 3), 1.0);
  cr_assert_eq(load_imbalance(skewed, 4), 3.0);
  cr_assert_eq(load_imbalance(empty, 2), 1.0);
}

enum { TOKENS = 512, EXPERTS = 16, TOP_K = 2 };

// Tokens per expert when each token picks the top-k of sigmoid(logit) + bias.
static void route(const double *logits, const real *bias, double *load) {
  for (int e = 0; e < EXPERTS; e++) load[e] = 0;
  for (int t = 0; t < TOKENS; t++) {
    int chosen[TOP_K];
    for (int k = 0; k < TOP_K; k++) {
      int best = -1;
      double best_score = -1e300;
      for (int e = 0; e < EXPERTS; e++) {
        int taken = 0;
        for (int j = 0; j < k; j++) taken |= chosen[j] == e;
        double score = 1 / (1 + exp(-logits[t * EXPERTS + e])) + bias[e];
        if (!taken && score > best_score) { best = e; best_score = score; }
      }
      chosen[k] = best;
      load[best] += 1;
    }
  }
}

Test(router_bias, skewed_router_moves_towards_balance) {
  uint64_t rng = 31;
  double *logits = calloc(TOKENS * EXPERTS, sizeof(double));
  for (int t = 0; t < TOKENS; t++)
    for (int e = 0; e < EXPERTS; e++) logits[t * EXPERTS + e] = test_rand_normal(&rng) + 0.3 * e;  // favours high e
  real bias[EXPERTS] = {0};
  double load[EXPERTS];
  route(logits, bias, load);
  double start = load_imbalance(load, EXPERTS), previous_window = start;
  // Deterministic: 4.56 at the start, settling at 1.28 (sign steps of a fixed rate oscillate).
  cr_assert_gt(start, 3.0, "the test router should start badly skewed (%g)", start);
  for (int window = 0; window < 4; window++) {
    double worst = 0;
    for (int iteration = 0; iteration < 50; iteration++) {
      router_bias_update(bias, load, EXPERTS, 0.002);
      route(logits, bias, load);
      worst = fmax(worst, load_imbalance(load, EXPERTS));
    }
    cr_assert_leq(worst, previous_window, "window %d: imbalance %g after %g", window, worst, previous_window);
    previous_window = worst;
  }
  cr_assert_lt(previous_window, 1.4, "imbalance %g after 200 updates (started at %g)", previous_window, start);
  cr_assert_gt(bias[0], bias[EXPERTS - 1], "the disfavoured expert must end with the larger bias");
  free(logits);
}
