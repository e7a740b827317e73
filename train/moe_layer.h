/* The MoE feed-forward layer: a sigmoid router in the compute precision (fp32 on GPU), top-k experts
 * chosen by score + bias (the bias only routes), weights renormalized and scaled by
 * routed_scaling_factor; tokens reach their experts through dist/moe_dispatch (a local permutation on
 * one rank, an all-to-all with expert parallelism), each expert is a SwiGLU on its rows, results are
 * combined by weight, and the shared expert is added unweighted. No token is dropped. */
#pragma once
#include "dist/moe_dispatch.h"
#include "dist/world.h"
#include "train/ffn_layer.h"
#include "train/model_config.h"
#include "train/params.h"

typedef struct {
  int E, top_k, F, shared_F, d;  // experts, chosen per token, expert width, shared width, model width
  real scaling;
  real aux_loss_coef;  // sequence-wise balance loss coefficient (0: off)
  real *router, *drouter, *bias;
  real **w_gate, **w_up, **w_down, **dw_gate, **dw_up, **dw_down;  // (local experts) matrices
  real *shared_gate, *shared_up, *shared_down, *dshared_gate, *dshared_up, *dshared_down;
  MoeDispatch dispatch;
  const real *x;  // (N, d)
  int N, B, T;
  real *logits, *scores;      // (N, E)
  int *expert_index;          // (N, top_k)
  real *expert_weight;        // (N, top_k)
  real *rows, *expert_out;    // (max local rows, d)
  SwigluActivations saved, scratch;        // (max local rows, F)
  SwigluActivations shared_saved, shared_scratch;  // (N, shared_F)
  real *shared_out;           // (N, d)
  double *load;               // (E) tokens routed per expert since the last reset
  double aux_loss;            // the last forward's balance loss, summed over its rows
  real *dexpert_out, *drows, *dexpert_weight, *dlogits;
} MoeLayer;

void moe_layer_init(MoeLayer *layer, const ModelConfig *config, const ParamRegistry *params, int index, int max_rows,
                    const World *world);
void moe_layer_free(MoeLayer *layer);
// x (B*T rows) is kept until the backward.
void moe_layer_forward(MoeLayer *layer, real *out, const real *x, int B, int T);
// aux_weight scales the balance loss's gradient (the model passes its per-token loss weight x T, so the
// loss counts once per sequence of the global batch).
void moe_layer_backward(MoeLayer *layer, real *dx, const real *dout, real aux_weight);
