// The MoE feed-forward layer; see moe_layer.h.
#include "train/moe_layer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "train/layer_params.h"

void moe_layer_init(MoeLayer *L, const ModelConfig *m, const ParamRegistry *params, int index, int max_rows,
                    const World *world) {
  memset(L, 0, sizeof *L);
  L->E = m->num_experts;
  L->top_k = m->experts_per_token;
  L->F = m->expert_intermediate_size;
  L->shared_F = m->expert_intermediate_size * m->num_shared_experts;
  L->d = m->hidden_size;
  L->scaling = (real)m->routed_scaling_factor;
  L->aux_loss_coef = (real)m->aux_loss_coef;
  real *unused;
  layer_param(params, index, "block_sparse_moe.gate.weight", &L->router, &L->drouter);
  layer_param(params, index, "block_sparse_moe.gate.e_score_correction_bias", &L->bias, &unused);
  moe_dispatch_init(&L->dispatch, L->E, L->top_k, L->d, max_rows, world);
  int local = L->dispatch.local_experts;
  real ***matrices[] = {&L->w_gate, &L->w_up, &L->w_down, &L->dw_gate, &L->dw_up, &L->dw_down};
  for (int i = 0; i < 6; i++) *matrices[i] = klt_calloc((size_t)local, sizeof(real *));
  for (int e = 0; e < local; e++) {
    char suffix[96];
    int expert = L->dispatch.local_expert_begin + e;
    snprintf(suffix, sizeof suffix, "block_sparse_moe.experts.%d.w1.weight", expert);
    layer_param(params, index, suffix, &L->w_gate[e], &L->dw_gate[e]);
    snprintf(suffix, sizeof suffix, "block_sparse_moe.experts.%d.w3.weight", expert);
    layer_param(params, index, suffix, &L->w_up[e], &L->dw_up[e]);
    snprintf(suffix, sizeof suffix, "block_sparse_moe.experts.%d.w2.weight", expert);
    layer_param(params, index, suffix, &L->w_down[e], &L->dw_down[e]);
  }
  if (L->shared_F > 0) {
    layer_param(params, index, "block_sparse_moe.shared_experts.gate_proj.weight", &L->shared_gate, &L->dshared_gate);
    layer_param(params, index, "block_sparse_moe.shared_experts.up_proj.weight", &L->shared_up, &L->dshared_up);
    layer_param(params, index, "block_sparse_moe.shared_experts.down_proj.weight", &L->shared_down, &L->dshared_down);
    L->shared_saved = swiglu_activations_alloc((size_t)max_rows, L->shared_F);
    L->shared_scratch = swiglu_activations_alloc((size_t)max_rows, L->shared_F);
    L->shared_out = klt_calloc((size_t)max_rows * L->d, sizeof(real));
  }
  size_t N = (size_t)max_rows, R = (size_t)moe_dispatch_max_local_rows(&L->dispatch);
  L->logits = klt_calloc(N * L->E, sizeof(real));
  L->scores = klt_calloc(N * L->E, sizeof(real));
  L->dlogits = klt_calloc(N * L->E, sizeof(real));
  L->expert_index = klt_calloc(N * L->top_k, sizeof(int));
  L->expert_weight = klt_calloc(N * L->top_k, sizeof(real));
  L->dexpert_weight = klt_calloc(N * L->top_k, sizeof(real));
  L->rows = klt_calloc(R * L->d, sizeof(real));
  L->expert_out = klt_calloc(R * L->d, sizeof(real));
  L->dexpert_out = klt_calloc(R * L->d, sizeof(real));
  L->drows = klt_calloc(R * L->d, sizeof(real));
  L->saved = swiglu_activations_alloc(R, L->F);
  L->scratch = swiglu_activations_alloc(R, L->F);
  L->load = klt_calloc((size_t)L->E, sizeof(double));
}

void moe_layer_free(MoeLayer *L) {
  moe_dispatch_free(&L->dispatch);
  free(L->w_gate); free(L->w_up); free(L->w_down);
  free(L->dw_gate); free(L->dw_up); free(L->dw_down);
  if (L->shared_F > 0) {
    swiglu_activations_free(L->shared_saved);
    swiglu_activations_free(L->shared_scratch);
    free(L->shared_out);
  }
  free(L->logits); free(L->scores); free(L->dlogits);
  free(L->expert_index); free(L->expert_weight); free(L->dexpert_weight);
  free(L->rows); free(L->expert_out); free(L->dexpert_out); free(L->drows);
  swiglu_activations_free(L->saved);
  swiglu_activations_free(L->scratch);
  free(L->load);
}

// The rows of local expert e start at this offset in the dispatched buffer.
static SwigluActivations shifted(SwigluActivations a, size_t offset) {
  SwigluActivations s = {a.gate + offset, a.up + offset, a.act + offset};
  return s;
}

void moe_layer_forward(MoeLayer *L, real *out, const real *x, int B, int T) {
  const int N = B * T, d = L->d, F = L->F;
  L->x = x;
  L->N = N;
  L->B = B;
  L->T = T;
  matmul_forward(L->logits, x, L->router, N, d, L->E);
  moe_router_forward(L->expert_index, L->expert_weight, L->scores, L->logits, L->bias, N, L->E, L->top_k, L->scaling);
  L->aux_loss = L->aux_loss_coef > 0 ? moe_sequence_balance_loss(NULL, L->scores, L->expert_index, B, T, L->E,
                                                                   L->top_k, L->aux_loss_coef, 0)
                                      : 0;
  moe_dispatch_plan(&L->dispatch, L->expert_index, N);
  for (int e = 0; e < L->E; e++) L->load[e] += L->dispatch.expert_counts[e];
  moe_dispatch_forward(&L->dispatch, L->rows, x);
  size_t offset = 0;
  for (int e = 0; e < L->dispatch.local_experts; e++) {
    int count = L->dispatch.local_expert_rows[e];
    swiglu_mlp_forward(L->expert_out + offset * d, shifted(L->saved, offset * F), L->rows + offset * d, L->w_gate[e],
                       L->w_up[e], L->w_down[e], count, d, F);
    offset += (size_t)count;
  }
  moe_combine_forward(&L->dispatch, out, L->expert_out, L->expert_weight);
  if (L->shared_F > 0) {
    swiglu_mlp_forward(L->shared_out, L->shared_saved, x, L->shared_gate, L->shared_up, L->shared_down, N, d,
                       L->shared_F);
    for (size_t i = 0; i < (size_t)N * d; i++) out[i] += L->shared_out[i];
  }
}

void moe_layer_backward(MoeLayer *L, real *dx, const real *dout, real aux_weight) {
  const int N = L->N, d = L->d, F = L->F;
  if (L->shared_F > 0)
    swiglu_mlp_backward(dx, L->dshared_gate, L->dshared_up, L->dshared_down, dout, L->x, L->shared_saved,
                        L->shared_gate, L->shared_up, L->shared_down, L->shared_scratch, N, d, L->shared_F);
  size_t rows = (size_t)L->dispatch.local_rows;
  memset(L->dexpert_out, 0, rows * d * sizeof(real));
  memset(L->dexpert_weight, 0, (size_t)N * L->top_k * sizeof(real));
  moe_combine_backward(&L->dispatch, L->dexpert_out, L->dexpert_weight, dout, L->expert_weight);
  memset(L->drows, 0, rows * d * sizeof(real));
  size_t offset = 0;
  for (int e = 0; e < L->dispatch.local_experts; e++) {
    int count = L->dispatch.local_expert_rows[e];
    swiglu_mlp_backward(L->drows + offset * d, L->dw_gate[e], L->dw_up[e], L->dw_down[e], L->dexpert_out + offset * d,
                        L->rows + offset * d, shifted(L->saved, offset * F), L->w_gate[e], L->w_up[e], L->w_down[e],
                        shifted(L->scratch, offset * F), count, d, F);
    offset += (size_t)count;
  }
  moe_dispatch_backward(&L->dispatch, dx, L->drows);
  memset(L->dlogits, 0, (size_t)N * L->E * sizeof(real));
  moe_router_backward(L->dlogits, L->dexpert_weight, L->scores, L->expert_index, N, L->E, L->top_k, L->scaling);
  if (L->aux_loss_coef > 0)
    moe_sequence_balance_loss(L->dlogits, L->scores, L->expert_index, L->B, L->T, L->E, L->top_k, L->aux_loss_coef,
                              aux_weight);
  matmul_backward(dx, L->drouter, L->dlogits, L->x, L->router, N, d, L->E);
}
