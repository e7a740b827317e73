/* ZeRO-1 ownership of the parameter arena: which data-parallel rank runs the optimizer on which
 * parameters, holds their optimizer state and stores them in checkpoints.
 *
 * The idea: the registry lays every tensor out in one arena, so ownership is a set of cuts of that
 * arena into one contiguous range per rank, rank r owning elements [cuts[r], cuts[r + 1]). Each
 * tensor costs what its update costs: a Muon matrix about the flops of its Newton-Schulz iterations
 * (plus its elementwise momentum), anything else (AdamW) a fixed cost per element, the router bias
 * (moved by load balancing on every rank, not by the optimizer) nothing. Cut r is placed where the
 * running cost is closest to r / ranks of the total, at an allowed position: a Muon matrix is never
 * split (its owner orthogonalizes it whole), any other tensor may be cut between two rows (first
 * dimension), so every rank's piece of a tensor is a row slice a checkpoint can store. Each cut lies
 * within half a unit (one Muon matrix, or one row) of its target, so no rank carries more than
 * total / ranks plus the largest unit. One rank: one range, the whole arena.
 *
 * The registry keeps each expert's matrix as its own 2-D tensor, so "a Muon matrix" is a 2-D tensor
 * of group GROUP_MUON while the optimizer is muonclip. The plan does not depend on ep: after the
 * gradient reduction every rank holds every gradient of its range (experts included). */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "train/params.h"

typedef struct {
  size_t begin, end;  // arena elements [begin, end)
} ArenaRange;

typedef struct {
  int ranks;
  size_t *cuts;  // (ranks + 1): cuts[0] = 0, cuts[ranks] = total, non-decreasing
} ShardPlan;

// Cost of updating tensor p, in flop-equivalents; muon: GROUP_MUON tensors run Muon (optimizer =
// muonclip, as optimizer_uses_muon says) with ns_steps Newton-Schulz steps.
double shard_plan_tensor_cost(const ParamInfo *p, bool muon, int ns_steps);
// The plan for `ranks` ranks (>= 1); free with shard_plan_free.
void shard_plan_make(ShardPlan *plan, const ParamRegistry *registry, int ranks, bool muon, int ns_steps);
void shard_plan_free(ShardPlan *plan);
static inline ArenaRange shard_plan_range(const ShardPlan *plan, int rank) {
  ArenaRange range = {plan->cuts[rank], plan->cuts[rank + 1]};
  return range;
}
