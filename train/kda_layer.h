/* The KDA mixer (Kimi Delta Attention), as released:
 *   q, k = l2norm(silu(conv(W_q x))), l2norm(silu(conv(W_k x))); v = silu(conv(W_v x))
 *   g = gate(f_b(f_a(x)), A_log, dt_bias)        per channel log decay (softplus or bounded form)
 *   beta = sigmoid(b_proj(x))
 *   o = chunkwise KDA(q, k, v, g, beta) with scale dk^-1/2, state reset at document starts
 *   out = o_proj( rmsnorm_head(o) * o_norm * sigmoid(g_b(g_a(x))) )
 * Owns its activations; the backward recomputes nothing but the KDA core's internals. */
#pragma once
#include "common/real.h"
#include "train/model_config.h"
#include "train/params.h"

typedef struct {
  int H, K, d, W, chunk;  // heads, head dim (dk = dv), model width, conv kernel, KDA chunk
  bool gate_bounded;
  real gate_lower_bound;
  double eps;
  real *q_proj, *k_proj, *v_proj, *q_conv, *k_conv, *v_conv, *A_log, *f_a, *f_b, *dt_bias, *b_proj, *g_a, *g_b,
      *o_norm, *o_proj;
  real *dq_proj, *dk_proj, *dv_proj, *dq_conv, *dk_conv, *dv_conv, *dA_log, *df_a, *df_b, *ddt_bias, *db_proj,
      *dg_a, *dg_b, *do_norm, *do_proj;
  int B, T;
  const real *x;                   // (N, d) the layer's input, kept by the model
  const unsigned char *doc_start;  // (B, T)
  real *qp, *kp, *vp;              // (N, H*K) projections before the convolution
  real *q_pre, *k_pre, *v_pre;     // (N, H*K) convolution outputs before SiLU
  real *q_act, *k_act;             // (N, H*K) after SiLU, before the L2 norm
  real *q, *k, *v;                 // (N, H, K) KDA inputs
  real *q_inv_norm, *k_inv_norm;   // (N, H)
  real *f_low, *f;                 // (N, K), (N, H*K) gate projections
  real *g;                         // (N, H, K) log decay
  real *b_logit, *beta;            // (N, H)
  real *o;                         // (N, H, K) KDA output
  real *g_low, *gate;              // (N, K), (N, H*K) output gate logits
  real *o_rstd;                    // (N, H)
  real *y;                         // (N, H*K) gated, normalized output (input of o_proj)
  // backward scratch
  real *dy, *do_, *dgate, *dg_low, *dq, *dk, *dv, *dg, *dbeta, *db_logit, *df, *df_low, *dact, *dpre, *dproj;
} KdaLayer;

void kda_layer_init(KdaLayer *layer, const ModelConfig *config, const ParamRegistry *params, int index, int max_rows);
void kda_layer_free(KdaLayer *layer);
// out (N, d) = mixer(x (N, d)); x must stay unchanged until the backward.
void kda_layer_forward(KdaLayer *layer, real *out, const real *x, const unsigned char *doc_start, int B, int T);
// dx (N, d) += gradient through the mixer of dout (N, d); parameter gradients added into the registry.
void kda_layer_backward(KdaLayer *layer, real *dx, const real *dout);
