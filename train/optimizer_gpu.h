/* The optimizer's per-tensor updates on the GPU (CUDA backend), called from optimizer.c when the
 * model lives on the device: Muon (every matrix of one shape in the model batched into one call), AdamW,
 * QK-Clip on the fp32 master weights; the updates write the bf16 copies too. The rule choice per tensor is
 * optimizer.c's (optimizer_uses_muon, optimizer_decay_of). */
#pragma once
#include "train/optimizer.h"

bool optimizer_uses_muon(const Optimizer *opt, const ParamInfo *p);
real optimizer_decay_of(const Optimizer *opt, const ParamInfo *p);
// The part [*begin, *end) of tensor p (arena elements) in this rank's owned range; false when none.
bool optimizer_owned_part(const Optimizer *opt, const ParamInfo *p, size_t *begin, size_t *end);
// Whether tensor p lies wholly in this rank's owned range.
bool optimizer_owns(const Optimizer *opt, const ParamInfo *p);

#ifdef KLT_HAVE_CUDA
#include "optim/adamw.h"
#include "optim/muon.h"
// optimizer_reduce_gradients and the owned part of optimizer_grad_norm_squared on the device gradients.
void optimizer_reduce_gradients_gpu(Optimizer *opt);
double optimizer_grad_norm_squared_gpu(Optimizer *opt);
// Updates the owned part of every trained tensor, applies QK-Clip on the owned q / kv_b projections,
// all-gathers the new fp32 master weights and refreshes the bf16 copies of the others' ranges; returns
// the heads clipped and sets *max_logit.
int optimizer_update_gpu(Optimizer *opt, MuonConfig *muon, AdamWConfig *adamw, real lr, double *max_logit);
// Frees the Muon batching plan (made on the first update).
void optimizer_free_gpu(Optimizer *opt);
// After the host-side router-bias update of MoE layer `layer`: the new bias to the device.
void optimizer_upload_router_bias_gpu(Optimizer *opt, int layer, const real *bias);
#endif
