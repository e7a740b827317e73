// MoE routing and permutation: the router against a naive sort-based top-k (with a bias that flips a
// choice and exact ties), its backward against finite differences, the permutation plan's counts,
// offsets and stability, the permute/unpermute round trip, and both backwards against finite
// differences.
#include <criterion/criterion.h>

#include "kernels/moe.h"
#include "tests/testing.h"

// Sorts experts by (score + bias) descending, then index ascending, with an insertion sort.
static void naive_top_k(int *chosen, const real *scores, const real *bias, int E, int top_k) {
  int order[64];
  cr_assert_leq(E, 64);
  for (int e = 0; e < E; e++) order[e] = e;
  for (int i = 1; i < E; i++)
    for (int j = i; j > 0; j--) {
      int a = order[j - 1], b = order[j];
      double va = scores[a] + (bias ? bias[a] : 0), vb = scores[b] + (bias ? bias[b] : 0);
      if (vb > va || (vb == va && b < a)) { order[j - 1] = b; order[j] = a; }
      else break;
    }
  for (int j = 0; j < top_k; j++) chosen[j] = order[j];
}

Test(moe, router_matches_naive_top_k) {
  int N = 20, E = 16, top_k = 4;
  real routed_scaling = 2.446;
  uint64_t rng = 31;
  real *logits = test_alloc(N * E), *bias = test_alloc(E), *scores = test_alloc(N * E);
  real *weight = test_alloc(N * top_k);
  int *index = malloc(sizeof(int) * N * top_k), chosen[16];
  test_fill_normal(logits, N * E, 2, &rng);
  test_fill_normal(bias, E, 0.2, &rng);
  moe_router_forward(index, weight, scores, logits, bias, N, E, top_k, routed_scaling);
  for (int n = 0; n < N; n++) {
    double sum = 0;
    for (int e = 0; e < E; e++) cr_assert_float_eq(scores[n * E + e], 1 / (1 + exp(-logits[n * E + e])), 1e-15);
    naive_top_k(chosen, scores + n * E, bias, E, top_k);
    for (int j = 0; j < top_k; j++) {
      cr_assert_eq(index[n * top_k + j], chosen[j], "token %d slot %d", n, j);
      sum += scores[n * E + chosen[j]];
    }
    for (int j = 0; j < top_k; j++)
      cr_assert_float_eq(weight[n * top_k + j], scores[n * E + chosen[j]] / sum * routed_scaling, 1e-14);
  }
  free(logits); free(bias); free(scores); free(weight); free(index);
}

Test(moe, bias_changes_the_choice_but_not_the_weights) {
  int E = 4, top_k = 2;
  real logits[4] = {2.0, 1.0, -1.0, 0.5}, bias[4] = {0, 0, 2.5, 0};
  real scores[4], weight[2];
  int index[2];
  moe_router_forward(index, weight, scores, logits, NULL, 1, E, top_k, 1);
  cr_assert_eq(index[0], 0); cr_assert_eq(index[1], 1);
  moe_router_forward(index, weight, scores, logits, bias, 1, E, top_k, 1);
  cr_assert_eq(index[0], 2, "bias lifts expert 2 to the top");
  cr_assert_eq(index[1], 0);
  double s0 = 1 / (1 + exp(-2.0)), s2 = 1 / (1 + exp(1.0));
  cr_assert_float_eq(weight[0], s2 / (s0 + s2), 1e-15, "weights use the unbiased scores");
  cr_assert_float_eq(weight[1], s0 / (s0 + s2), 1e-15);
}

Test(moe, ties_go_to_the_lower_expert_index) {
  int E = 6, top_k = 3;
  real logits[6] = {0.5, 1.0, 0.5, 1.0, 0.5, 1.0}, scores[6], weight[3];
  int index[3];
  moe_router_forward(index, weight, scores, logits, NULL, 1, E, top_k, 3);
  cr_assert_eq(index[0], 1); cr_assert_eq(index[1], 3); cr_assert_eq(index[2], 5);
  for (int j = 0; j < 3; j++) cr_assert_float_eq(weight[j], 1, 1e-15);
  for (int e = 0; e < E; e++) logits[e] = 0;
  moe_router_forward(index, weight, scores, logits, NULL, 1, E, top_k, 3);
  cr_assert_eq(index[0], 0); cr_assert_eq(index[1], 1); cr_assert_eq(index[2], 2);
}

typedef struct {
  int N, E, top_k;
  real routed_scaling;
  real *logits, *bias, *scores, *weight, *loss_weights;  // (N, E), (E), (N, E), (N, top_k), (N, top_k)
  int *index;                                            // (N, top_k)
} RouterCase;

static double router_loss(void *ctx) {
  RouterCase *c = ctx;
  moe_router_forward(c->index, c->weight, c->scores, c->logits, c->bias, c->N, c->E, c->top_k, c->routed_scaling);
  return test_dot(c->weight, c->loss_weights, (size_t)c->N * c->top_k);
}

Test(moe, router_backward_matches_finite_differences) {
  RouterCase c = {.N = 6, .E = 8, .top_k = 3, .routed_scaling = 2.446};
  uint64_t rng = 32;
  c.logits = test_alloc(c.N * c.E); c.bias = test_alloc(c.E); c.scores = test_alloc(c.N * c.E);
  c.weight = test_alloc(c.N * c.top_k); c.loss_weights = test_alloc(c.N * c.top_k);
  c.index = malloc(sizeof(int) * c.N * c.top_k);
  // Logits spaced 0.4 apart in a shuffled order, so no perturbation of 1e-6 changes the choice.
  for (int n = 0; n < c.N; n++) {
    real *row = c.logits + n * c.E;
    for (int e = 0; e < c.E; e++) row[e] = -1.4 + 0.4 * e + 0.05 * test_rand_uniform(&rng);
    for (int e = c.E - 1; e > 0; e--) {
      int f = (int)(test_rand_u64(&rng) % (uint64_t)(e + 1));
      real t = row[e]; row[e] = row[f]; row[f] = t;
    }
  }
  test_fill_normal(c.loss_weights, c.N * c.top_k, 1, &rng);
  real *dlogits = test_alloc(c.N * c.E);
  router_loss(&c);
  moe_router_backward(dlogits, c.loss_weights, c.scores, c.index, c.N, c.E, c.top_k, c.routed_scaling);
  cr_assert_lt(test_grad_check(router_loss, &c, c.logits, dlogits, c.N * c.E, 1000, 1e-6), 1e-6);
  free(c.logits); free(c.bias); free(c.scores); free(c.weight); free(c.loss_weights); free(c.index); free(dlogits);
}

// Random assignments of distinct experts per token, never using the last expert (so one count is 0).
static int *random_assignments(int N, int E, int top_k, uint64_t *rng) {
  int *index = malloc(sizeof(int) * N * top_k);
  for (int n = 0; n < N; n++)
    for (int j = 0; j < top_k; j++) {
      int e, repeated;
      do {
        e = (int)(test_rand_u64(rng) % (uint64_t)(E - 1));
        repeated = 0;
        for (int i = 0; i < j; i++) repeated |= index[n * top_k + i] == e;
      } while (repeated);
      index[n * top_k + j] = e;
    }
  return index;
}

Test(moe, permute_plan_counts_offsets_and_stable_order) {
  int N = 11, E = 5, top_k = 3, rows = N * top_k;
  uint64_t rng = 33;
  int *index = random_assignments(N, E, top_k, &rng);
  int counts[5], offsets[6], *row_of = malloc(sizeof(int) * rows), *token_of = malloc(sizeof(int) * rows);
  moe_permute_plan(counts, offsets, row_of, token_of, index, N, E, top_k);
  cr_assert_eq(offsets[0], 0);
  for (int e = 0; e < E; e++) {
    int expected = 0;
    for (int a = 0; a < rows; a++) expected += index[a] == e;
    cr_assert_eq(counts[e], expected, "count of expert %d", e);
    cr_assert_eq(offsets[e + 1], offsets[e] + counts[e]);
  }
  cr_assert_eq(counts[E - 1], 0);
  cr_assert_eq(offsets[E], rows);
  int *seen = calloc(rows, sizeof(int));
  for (int a = 0; a < rows; a++) {
    int row = row_of[a], e = index[a];
    cr_assert(row >= offsets[e] && row < offsets[e + 1], "assignment %d lands outside expert %d", a, e);
    cr_assert_eq(token_of[row], a / top_k);
    seen[row]++;
  }
  for (int r = 0; r < rows; r++) cr_assert_eq(seen[r], 1, "row %d filled %d times", r, seen[r]);
  // Stable: within an expert, rows follow the (token, slot) order of the assignments.
  for (int a = 0; a < rows; a++)
    for (int b = a + 1; b < rows; b++)
      if (index[a] == index[b]) cr_assert_lt(row_of[a], row_of[b]);
  free(index); free(row_of); free(token_of); free(seen);
}

typedef struct {
  int N, E, top_k, C;
  int counts[8], offsets[9];
  int *index, *row_of, *token_of;                // (N, top_k), (N * top_k), (N * top_k)
  real *x, *sorted, *expert_out, *weight, *out;  // (N, C), (rows, C), (rows, C), (N, top_k), (N, C)
  real *sorted_loss_weights, *out_loss_weights;  // (rows, C), (N, C)
} PermuteCase;

static PermuteCase permute_case_create(uint64_t seed) {
  PermuteCase c = {.N = 7, .E = 6, .top_k = 2, .C = 5};
  uint64_t rng = seed;
  size_t rows = (size_t)c.N * c.top_k;
  c.index = random_assignments(c.N, c.E, c.top_k, &rng);
  c.row_of = malloc(sizeof(int) * rows); c.token_of = malloc(sizeof(int) * rows);
  moe_permute_plan(c.counts, c.offsets, c.row_of, c.token_of, c.index, c.N, c.E, c.top_k);
  c.x = test_alloc(c.N * c.C); c.sorted = test_alloc(rows * c.C); c.expert_out = test_alloc(rows * c.C);
  c.weight = test_alloc(rows); c.out = test_alloc(c.N * c.C);
  c.sorted_loss_weights = test_alloc(rows * c.C); c.out_loss_weights = test_alloc(c.N * c.C);
  test_fill_normal(c.x, c.N * c.C, 1, &rng);
  test_fill_normal(c.expert_out, rows * c.C, 1, &rng);
  test_fill_uniform(c.weight, rows, 0.1, 1, &rng);
  test_fill_normal(c.sorted_loss_weights, rows * c.C, 1, &rng);
  test_fill_normal(c.out_loss_weights, c.N * c.C, 1, &rng);
  return c;
}

static void permute_case_free(PermuteCase *c) {
  free(c->index); free(c->row_of); free(c->token_of); free(c->x); free(c->sorted); free(c->expert_out);
  free(c->weight); free(c->out); free(c->sorted_loss_weights); free(c->out_loss_weights);
}

Test(moe, permute_then_unpermute_with_unit_weights_is_identity) {
  PermuteCase c = permute_case_create(34);
  int rows = c.N * c.top_k;
  for (int n = 0; n < c.N; n++)  // weights of a token sum to 1, as after renormalization
    for (int j = 0; j < c.top_k; j++) c.weight[n * c.top_k + j] = j == 0 ? 0.3 : 0.7 / (c.top_k - 1);
  moe_permute_forward(c.sorted, c.x, c.token_of, rows, c.C);
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < c.C; i++) cr_assert_eq(c.sorted[r * c.C + i], c.x[c.token_of[r] * c.C + i]);
  for (int i = 0; i < c.N * c.C; i++) c.out[i] = 1e9;  // must be overwritten
  moe_unpermute_forward(c.out, c.sorted, c.weight, c.row_of, c.N, c.top_k, c.C);
  cr_assert_lt(test_rel_error(c.out, c.x, c.N * c.C), 1e-15);
  permute_case_free(&c);
}

static double permute_loss(void *ctx) {
  PermuteCase *c = ctx;
  moe_permute_forward(c->sorted, c->x, c->token_of, c->N * c->top_k, c->C);
  return test_dot(c->sorted, c->sorted_loss_weights, (size_t)c->N * c->top_k * c->C);
}

static double unpermute_loss(void *ctx) {
  PermuteCase *c = ctx;
  moe_unpermute_forward(c->out, c->expert_out, c->weight, c->row_of, c->N, c->top_k, c->C);
  return test_dot(c->out, c->out_loss_weights, (size_t)c->N * c->C);
}

Test(moe, permute_backwards_match_finite_differences) {
  PermuteCase c = permute_case_create(35);
  int rows = c.N * c.top_k;
  real *dx = test_alloc(c.N * c.C), *dexpert_out = test_alloc(rows * c.C), *dweight = test_alloc(rows);
  moe_permute_backward(dx, c.sorted_loss_weights, c.token_of, rows, c.C);
  cr_assert_lt(test_grad_check(permute_loss, &c, c.x, dx, c.N * c.C, 1000, 1e-6), 1e-6, "permute dx");
  moe_unpermute_backward(dexpert_out, dweight, c.out_loss_weights, c.expert_out, c.weight, c.row_of, c.N, c.top_k,
                         c.C);
  cr_assert_lt(test_grad_check(unpermute_loss, &c, c.expert_out, dexpert_out, rows * c.C, 1000, 1e-6), 1e-6,
               "unpermute dexpert_out");
  cr_assert_lt(test_grad_check(unpermute_loss, &c, c.weight, dweight, rows, 1000, 1e-6), 1e-6,
               "unpermute dexpert_weight");
  // Backwards add: a second call doubles the gradients.
  real *dx_once = test_copy(dx, c.N * c.C), *dweight_once = test_copy(dweight, rows);
  moe_permute_backward(dx, c.sorted_loss_weights, c.token_of, rows, c.C);
  moe_unpermute_backward(NULL, dweight, c.out_loss_weights, c.expert_out, c.weight, c.row_of, c.N, c.top_k, c.C);
  for (int i = 0; i < c.N * c.C; i++) dx_once[i] *= 2;
  for (int i = 0; i < rows; i++) dweight_once[i] *= 2;
  cr_assert_lt(test_rel_error(dx, dx_once, c.N * c.C), 1e-15);
  cr_assert_lt(test_rel_error(dweight, dweight_once, rows), 1e-15);
  free(dx); free(dexpert_out); free(dweight); free(dx_once); free(dweight_once);
  permute_case_free(&c);
}

typedef struct {
  real *logits, *scores, *weights, *dlogits;
  int index[12 * 2];
  int B, T, E, k;
} BalanceCase;

static double balance_loss(void *p) {
  BalanceCase *c = p;
  int N = c->B * c->T;
  for (int i = 0; i < N * c->E; i++) c->scores[i] = 1 / (1 + exp(-c->logits[i]));
  return moe_sequence_balance_loss(NULL, c->scores, c->index, c->B, c->T, c->E, c->k, 0.3, 1);
}

Test(moe, sequence_balance_loss_value_and_gradient) {
  BalanceCase c = {.B = 2, .T = 6, .E = 5, .k = 2};
  int N = c.B * c.T;
  uint64_t rng = 77;
  c.logits = test_alloc(N * c.E); c.scores = test_alloc(N * c.E); c.dlogits = test_alloc(N * c.E);
  test_fill_normal(c.logits, N * c.E, 1, &rng);
  for (int n = 0; n < N; n++) {  // a fixed choice: the selection carries no gradient
    c.index[n * 2] = n % c.E;
    c.index[n * 2 + 1] = (n + 2) % c.E;
  }
  double loss = balance_loss(&c);
  // Uniform scores and balanced choices give exactly coef per row (sum_i f_i P_i = 1).
  real *uniform = test_alloc(N * c.E);
  for (int i = 0; i < N * c.E; i++) uniform[i] = 0.5;
  int balanced[10 * 2];
  for (int t = 0; t < 10; t++) { balanced[t * 2] = t % 5; balanced[t * 2 + 1] = (t + 1) % 5; }
  cr_assert_float_eq(moe_sequence_balance_loss(NULL, uniform, balanced, 1, 10, 5, 2, 0.3, 1), 0.3, 1e-12);
  cr_assert_gt(loss, 0);
  moe_sequence_balance_loss(c.dlogits, c.scores, c.index, c.B, c.T, c.E, c.k, 0.3, 1);
  cr_assert_lt(test_grad_check(balance_loss, &c, c.logits, c.dlogits, N * c.E, 200, 1e-6), 1e-6);
  free(uniform);
}
