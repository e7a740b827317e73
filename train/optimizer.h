/* The optimizer of klt-train: walks the parameter registry and applies, per tensor, Muon (2-D
 * matrices, each expert's matrix alone) or AdamW (everything else, or everything with
 * optimizer = adamw), then QK-Clip on the MLA layers and the router-bias update on the MoE layers.
 * The math lives in optim/; this file decides which rule applies to which tensor. */
#pragma once
#include "optim/schedule.h"
#include "train/config.h"
#include "train/model.h"

typedef struct {
  const Config *config;
  Model *model;
  real *state1, *state2;  // per element: Muon momentum or AdamW first moment; AdamW second moment
  real *scratch;          // Newton-Schulz workspace for the largest Muon matrix
  long step;              // optimizer steps taken (AdamW's bias correction counts from 1)
  real grad_scale;        // multiplies every gradient before the update (global-norm clipping); 1 by default
  float *device_state1, *device_state2;  // the states on the GPU when the model is there (else NULL)
  struct MuonGroups *muon_groups;         // GPU: the Muon matrices batched by shape (optimizer_gpu.c)
  Schedule schedule;
} Optimizer;

typedef struct {
  double lr;
  int clipped_heads;        // QK-Clip: heads rescaled this step
  double max_logit;         // largest scaled attention logit over MLA layers and heads
  double load_imbalance;    // max over MoE layers of (max load / mean load)
} OptimizerReport;

void optimizer_create(Optimizer *opt, Model *model, const Config *config);
void optimizer_free(Optimizer *opt);
// One update from the (already reduced and clipped) gradients, at schedule position `position`
// (steps or tokens, as the stage says). Max logits and expert loads must already be reduced over ranks.
OptimizerReport optimizer_step(Optimizer *opt, double position);
// On the GPU: copy weights and optimizer states to the host arrays (before a save), or back to the
// device (after a load). No-ops on the CPU.
void optimizer_state_to_host(Optimizer *opt);
void optimizer_state_to_device(Optimizer *opt);
// Schedule position at which step `step` (0-based) takes its learning rate, in the stage's unit.
double optimizer_position(const Optimizer *opt, long step);
