/* The optimizer of klt-train: walks the parameter registry and applies, per tensor, Muon (2-D
 * matrices, each expert's matrix alone) or AdamW (everything else, or everything with
 * optimizer = adamw), then QK-Clip on the MLA layers and the router-bias update on the MoE layers.
 * The math lives in optim/; this file decides which rule applies to which tensor.
 *
 * Sharded (ZeRO-1) over the data-parallel ranks, always when there are several: the shard plan
 * (train/shard_plan.h) gives each rank a contiguous range of the parameter arena. A step is
 *   optimizer_reduce_gradients   each rank's range gets the gradient summed over the ranks
 *   optimizer_grad_norm_squared  the global norm: owned pieces + one scalar all-reduce
 *   optimizer_step               Muon / AdamW / QK-Clip on the owned range only, then every rank's
 *                                new weights to every rank (all-gather), then the router biases (every
 *                                rank alike, from the reduced loads)
 * and the optimizer state exists only for the owned range. One rank: one range, the whole arena. */
#pragma once
#include "dist/world.h"
#include "optim/schedule.h"
#include "train/config.h"
#include "train/model.h"
#include "train/shard_plan.h"

typedef struct {
  const Config *config;
  Model *model;
  const World *world;     // the data-parallel ranks (NULL: one process); must outlive the optimizer
  ShardPlan plan;         // rank r updates arena elements [plan.cuts[r], plan.cuts[r + 1])
  ArenaRange owned;       // this rank's range of the plan
  real *state1, *state2;  // (owned.end - owned.begin): arena element j at [j - owned.begin]; per element
                          // Muon momentum or AdamW first moment; AdamW second moment
  real *scratch;          // Newton-Schulz workspace for the largest Muon matrix
  long step;              // optimizer steps taken (AdamW's bias correction counts from 1)
  real grad_scale;        // multiplies every gradient before the update (global-norm clipping); 1 by default
  float *device_state1, *device_state2;  // the states on the GPU when the model is there (else NULL), owned range
  double *device_norm;                    // GPU: the owned gradients' sum of squares
  struct MuonGroups *muon_groups;         // GPU: the Muon matrices batched by shape (optimizer_gpu.c)
  Schedule schedule;
} Optimizer;

typedef struct {
  double lr;
  int clipped_heads;        // QK-Clip: heads rescaled this step
  double max_logit;         // largest scaled attention logit over MLA layers and heads
  double load_imbalance;    // max over MoE layers of (max load / mean load)
} OptimizerReport;

// world: the data-parallel ranks the optimizer is sharded over (NULL or one rank: not sharded).
void optimizer_create(Optimizer *opt, Model *model, const Config *config, const World *world);
void optimizer_free(Optimizer *opt);
// Collective: sums the ranks' gradients so that each rank's owned range holds the sum (the rest of the
// gradient arena is left as this rank's own contributions). CPU: MPI_Reduce_scatter; GPU: one
// ncclReduce per range. Nothing on one rank.
void optimizer_reduce_gradients(Optimizer *opt);
// Collective: the squared global norm of the reduced gradients (before clipping), from the owned ranges.
double optimizer_grad_norm_squared(Optimizer *opt);
// One update from the reduced gradients (multiplied by grad_scale first), at schedule position
// `position` (steps or tokens, as the stage says); collective (the weight all-gather). Max logits and
// expert loads must already be reduced over ranks.
OptimizerReport optimizer_step(Optimizer *opt, double position);
// On the GPU: copy weights and the owned optimizer states to the host arrays (before a save), or back
// to the device (after a load). No-ops on the CPU.
void optimizer_state_to_host(Optimizer *opt);
void optimizer_state_to_device(Optimizer *opt);
// Schedule position at which step `step` (0-based) takes its learning rate, in the stage's unit.
double optimizer_position(const Optimizer *opt, long step);
