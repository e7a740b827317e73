// Ownership of the parameter arena by the data-parallel ranks; see shard_plan.h.
#include "train/shard_plan.h"

#include <math.h>
#include <stdlib.h>

#include "common/check.h"

// One elementwise update (AdamW, or Muon's momentum and apply) in flop-equivalents. It only sets how
// AdamW tensors trade against Muon matrices; the update of an element moves ~20-30 bytes, which a
// GPU or a CPU core spends the time of tens to thousands of GEMM flops on. Untuned.
#define SHARD_ELEMENT_COST 64.0

static bool is_atomic(const ParamInfo *p, bool muon) { return muon && p->group == GROUP_MUON; }

double shard_plan_tensor_cost(const ParamInfo *p, bool muon, int ns_steps) {
  if (p->group == GROUP_NONE) return 0;
  double elementwise = SHARD_ELEMENT_COST * (double)p->numel;
  if (!is_atomic(p, muon)) return elementwise;
  CHECK(p->ndim == 2, "Muon tensor %s has %d dimensions; the plan expects each Muon matrix as a 2-D tensor", p->name,
        p->ndim);
  // Newton-Schulz on the wide orientation (m <= n): A = X X^T (2 m m n), B = b A + c A A (2 m^3),
  // X = a X + B X (2 m m n) per step.
  double m = (double)(p->shape[0] < p->shape[1] ? p->shape[0] : p->shape[1]);
  double n = (double)(p->shape[0] < p->shape[1] ? p->shape[1] : p->shape[0]);
  return (double)ns_steps * (4 * m * m * n + 2 * m * m * m) + elementwise;
}

void shard_plan_make(ShardPlan *plan, const ParamRegistry *r, int ranks, bool muon, int ns_steps) {
  CHECK(ranks >= 1, "a shard plan needs at least one rank, got %d", ranks);
  plan->ranks = ranks;
  plan->cuts = klt_calloc((size_t)ranks + 1, sizeof(size_t));
  plan->cuts[ranks] = r->total;
  double total = 0;
  for (int i = 0; i < r->count; i++) total += shard_plan_tensor_cost(&r->params[i], muon, ns_steps);
  // Walk the tensors; every target that falls inside tensor i's cost interval [before, before + cost)
  // gets its cut at the nearest allowed position of that tensor.
  int next = 1;
  double before = 0;
  for (int i = 0; i < r->count && next < ranks; i++) {
    const ParamInfo *p = &r->params[i];
    double cost = shard_plan_tensor_cost(p, muon, ns_steps);
    for (double target = total * next / ranks; next < ranks && target < before + cost;
         target = total * next / ranks) {
      size_t cut;
      if (is_atomic(p, muon)) {
        cut = target - before < before + cost - target ? p->offset : p->offset + p->numel;
      } else {
        int64_t rows = p->shape[0];
        size_t row_elements = p->numel / (size_t)rows;
        int64_t row = llround((target - before) / (cost / (double)rows));
        if (row < 0) row = 0;
        if (row > rows) row = rows;
        cut = p->offset + (size_t)row * row_elements;
      }
      plan->cuts[next++] = cut;
    }
    before += cost;
  }
  for (; next < ranks; next++) plan->cuts[next] = r->total;  // targets that rounding left past the end
  for (int k = 1; k <= ranks; k++)
    CHECK(plan->cuts[k] >= plan->cuts[k - 1], "shard plan: cut %d (%zu) before cut %d (%zu)", k, plan->cuts[k], k - 1,
          plan->cuts[k - 1]);
}

void shard_plan_free(ShardPlan *plan) {
  free(plan->cuts);
  plan->cuts = NULL;
  plan->ranks = 0;
}
