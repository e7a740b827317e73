// The ZeRO-1 shard plan (train/shard_plan.c): on the registries of the shipped models and of odd
// hand-made ones, for 1 to 16 ranks, with Muon and with AdamW only: the ranges cover the arena once
// (no gap, no overlap), no cut falls inside a Muon matrix, every cut inside another tensor falls
// between two rows, and no rank carries more than total / ranks plus the largest unit (one Muon
// matrix or one row).
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

#include "train/config.h"
#include "train/model_config.h"
#include "train/params.h"
#include "train/shard_plan.h"

// The registry of configs/models/<name>.ini (not allocated: the plan needs only the layout).
static ParamRegistry model_registry(const char *name) {
  Config config;
  config_set_defaults(&config);
  char path[1024];
  snprintf(path, sizeof path, "%s/configs/models/%s.ini", getenv("KLT_SOURCE_DIR"), name);
  config_load_file(&config, path);
  ModelConfig model;
  model_config_from(&model, &config);
  ParamRegistry r;
  params_init(&r);
  model_register_params(&model, &r);
  return r;
}

// Cost rank `rank` carries: its elements of each tensor at that tensor's cost per element.
static double rank_cost(const ShardPlan *plan, const ParamRegistry *r, int rank, bool muon, int ns) {
  ArenaRange range = shard_plan_range(plan, rank);
  double cost = 0;
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    size_t lo = p->offset > range.begin ? p->offset : range.begin;
    size_t hi = p->offset + p->numel < range.end ? p->offset + p->numel : range.end;
    if (hi > lo) cost += shard_plan_tensor_cost(p, muon, ns) * (double)(hi - lo) / (double)p->numel;
  }
  return cost;
}

static void check_plan(const ParamRegistry *r, int ranks, bool muon, int ns, const char *what) {
  ShardPlan plan;
  shard_plan_make(&plan, r, ranks, muon, ns);
  cr_assert_eq(plan.ranks, ranks);
  // Coverage, no overlap: the ranges are consecutive from 0 to total.
  cr_assert_eq(plan.cuts[0], 0, "%s, %d ranks: the first range does not start at 0", what, ranks);
  cr_assert_eq(plan.cuts[ranks], r->total, "%s, %d ranks: the last range does not end at the arena's end", what,
               ranks);
  for (int k = 1; k <= ranks; k++)
    cr_assert_geq(plan.cuts[k], plan.cuts[k - 1], "%s, %d ranks: ranges %d and %d overlap", what, ranks, k - 1, k);
  // Cuts: never inside a Muon matrix; inside any other tensor, at a row boundary.
  double total = 0, largest_unit = 0;
  for (int i = 0; i < r->count; i++) {
    const ParamInfo *p = &r->params[i];
    double cost = shard_plan_tensor_cost(p, muon, ns);
    bool atomic = muon && p->group == GROUP_MUON;
    double unit = atomic ? cost : cost / (double)p->shape[0];
    if (unit > largest_unit) largest_unit = unit;
    total += cost;
    size_t row = p->numel / (size_t)p->shape[0];
    for (int k = 1; k < ranks; k++) {
      size_t cut = plan.cuts[k];
      if (cut <= p->offset || cut >= p->offset + p->numel) continue;
      cr_assert(!atomic, "%s, %d ranks: cut %d splits the Muon matrix %s", what, ranks, k, p->name);
      cr_assert_eq((cut - p->offset) % row, 0, "%s, %d ranks: cut %d falls inside a row of %s", what, ranks, k,
                   p->name);
    }
  }
  // Balance.
  for (int k = 0; k < ranks; k++) {
    double cost = rank_cost(&plan, r, k, muon, ns);
    cr_assert_leq(cost, total / ranks + largest_unit + 1e-9 * total,
                  "%s, %d ranks: rank %d carries %.4g, more than %.4g / %d + the largest unit %.4g", what, ranks, k,
                  cost, total, ranks, largest_unit);
  }
  // Deterministic.
  ShardPlan again;
  shard_plan_make(&again, r, ranks, muon, ns);
  for (int k = 0; k <= ranks; k++) cr_assert_eq(again.cuts[k], plan.cuts[k]);
  shard_plan_free(&again);
  shard_plan_free(&plan);
}

Test(shard_plan, shipped_models_for_1_to_16_ranks) {
  const char *models[] = {"tiny", "small", "kimi-linear-48b-a3b"};
  for (size_t m = 0; m < sizeof models / sizeof models[0]; m++) {
    ParamRegistry r = model_registry(models[m]);
    for (int ranks = 1; ranks <= 16; ranks++) {
      check_plan(&r, ranks, true, 5, models[m]);
      check_plan(&r, ranks, false, 5, models[m]);
    }
    params_free(&r);
  }
}

Test(shard_plan, one_rank_owns_the_whole_arena) {
  ParamRegistry r = model_registry("tiny");
  ShardPlan plan;
  shard_plan_make(&plan, &r, 1, true, 5);
  ArenaRange all = shard_plan_range(&plan, 0);
  cr_assert_eq(all.begin, 0);
  cr_assert_eq(all.end, r.total);
  shard_plan_free(&plan);
  params_free(&r);
}

// A Muon matrix larger than everything else together: its owner gets it alone, other ranks may get
// nothing; a router bias (no cost) and odd row widths around it.
Test(shard_plan, one_dominant_matrix_and_empty_ranges) {
  ParamRegistry r;
  params_init(&r);
  params_add(&r, "norm", 7, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES, true);
  params_add(&r, "big", 256, 512, 0, 0, GROUP_MUON, true, INIT_NORMAL, true);
  params_add(&r, "bias", 5, 0, 0, 0, GROUP_NONE, false, INIT_ZEROS, true);
  params_add(&r, "conv", 9, 1, 3, 0, GROUP_ADAMW, true, INIT_CONV, true);
  params_add(&r, "small", 3, 5, 0, 0, GROUP_MUON, true, INIT_NORMAL, true);
  for (int ranks = 1; ranks <= 12; ranks++) {
    check_plan(&r, ranks, true, 5, "dominant");
    check_plan(&r, ranks, false, 5, "dominant, adamw");
  }
  ShardPlan plan;
  shard_plan_make(&plan, &r, 4, true, 5);
  int owners = 0;
  for (int k = 0; k < 4; k++) {
    ArenaRange range = shard_plan_range(&plan, k);
    if (range.begin <= r.params[1].offset && r.params[1].offset + r.params[1].numel <= range.end) owners++;
  }
  cr_assert_eq(owners, 1, "the big matrix must have exactly one owner");
  shard_plan_free(&plan);
  params_free(&r);
}

// Equal AdamW vectors over as many ranks as elements and more.
Test(shard_plan, adamw_elements_split_evenly) {
  ParamRegistry r;
  params_init(&r);
  params_add(&r, "a", 60, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES, true);
  params_add(&r, "b", 40, 0, 0, 0, GROUP_ADAMW, true, INIT_ONES, true);
  ShardPlan plan;
  shard_plan_make(&plan, &r, 4, true, 5);
  for (int k = 0; k < 4; k++) cr_assert_eq(plan.cuts[k + 1] - plan.cuts[k], 25, "rank %d", k);
  shard_plan_free(&plan);
  for (int ranks = 1; ranks <= 130; ranks += 7) check_plan(&r, ranks, true, 5, "vectors");
  params_free(&r);
}
