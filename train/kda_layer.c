// The KDA mixer's forward and backward; see kda_layer.h.
#include "train/kda_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/activation.h"
#include "kernels/conv.h"
#include "kernels/gemm.h"
#include "kernels/kda.h"
#include "kernels/norm.h"
#include "train/layer_params.h"

#define L2NORM_EPS 1e-6

void kda_layer_init(KdaLayer *L, const ModelConfig *m, const ParamRegistry *params, int index, int max_rows) {
  memset(L, 0, sizeof *L);
  L->H = m->kda_heads;
  L->K = m->kda_head_dim;
  L->d = m->hidden_size;
  L->W = m->conv_size;
  L->chunk = m->chunk_size;
  L->gate_bounded = m->gate_bounded;
  L->gate_lower_bound = (real)m->gate_lower_bound;
  L->eps = m->rms_norm_eps;
  layer_param(params, index, "self_attn.q_proj.weight", &L->q_proj, &L->dq_proj);
  layer_param(params, index, "self_attn.k_proj.weight", &L->k_proj, &L->dk_proj);
  layer_param(params, index, "self_attn.v_proj.weight", &L->v_proj, &L->dv_proj);
  layer_param(params, index, "self_attn.q_conv1d.weight", &L->q_conv, &L->dq_conv);
  layer_param(params, index, "self_attn.k_conv1d.weight", &L->k_conv, &L->dk_conv);
  layer_param(params, index, "self_attn.v_conv1d.weight", &L->v_conv, &L->dv_conv);
  layer_param(params, index, "self_attn.A_log", &L->A_log, &L->dA_log);
  layer_param(params, index, "self_attn.f_a_proj.weight", &L->f_a, &L->df_a);
  layer_param(params, index, "self_attn.f_b_proj.weight", &L->f_b, &L->df_b);
  layer_param(params, index, "self_attn.dt_bias", &L->dt_bias, &L->ddt_bias);
  layer_param(params, index, "self_attn.b_proj.weight", &L->b_proj, &L->db_proj);
  layer_param(params, index, "self_attn.g_a_proj.weight", &L->g_a, &L->dg_a);
  layer_param(params, index, "self_attn.g_b_proj.weight", &L->g_b, &L->dg_b);
  layer_param(params, index, "self_attn.o_norm.weight", &L->o_norm, &L->do_norm);
  layer_param(params, index, "self_attn.o_proj.weight", &L->o_proj, &L->do_proj);
  const size_t N = (size_t)max_rows, HK = (size_t)L->H * L->K, H = L->H, K = L->K;
  real **wide[] = {&L->qp, &L->kp, &L->vp, &L->q_pre, &L->k_pre, &L->v_pre, &L->q_act, &L->k_act, &L->q, &L->k,
                   &L->v, &L->f, &L->g, &L->o, &L->gate, &L->y, &L->dy, &L->do_, &L->dgate, &L->dq, &L->dk,
                   &L->dv, &L->dg, &L->df, &L->dact, &L->dpre, &L->dproj};
  for (size_t i = 0; i < sizeof wide / sizeof wide[0]; i++) *wide[i] = klt_calloc(N * HK, sizeof(real));
  real **per_head[] = {&L->q_inv_norm, &L->k_inv_norm, &L->b_logit, &L->beta, &L->o_rstd, &L->dbeta, &L->db_logit};
  for (size_t i = 0; i < sizeof per_head / sizeof per_head[0]; i++) *per_head[i] = klt_calloc(N * H, sizeof(real));
  real **low[] = {&L->f_low, &L->g_low, &L->df_low, &L->dg_low};
  for (size_t i = 0; i < sizeof low / sizeof low[0]; i++) *low[i] = klt_calloc(N * K, sizeof(real));
}

void kda_layer_free(KdaLayer *L) {
  real *buffers[] = {L->qp, L->kp, L->vp, L->q_pre, L->k_pre, L->v_pre, L->q_act, L->k_act, L->q, L->k, L->v,
                     L->f, L->g, L->o, L->gate, L->y, L->dy, L->do_, L->dgate, L->dq, L->dk, L->dv, L->dg, L->df,
                     L->dact, L->dpre, L->dproj, L->q_inv_norm, L->k_inv_norm, L->b_logit, L->beta, L->o_rstd,
                     L->dbeta, L->db_logit, L->f_low, L->g_low, L->df_low, L->dg_low};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
}

static KdaGateForm gate_form(const KdaLayer *L) { return L->gate_bounded ? KDA_GATE_BOUNDED : KDA_GATE_SOFTPLUS; }

void kda_layer_forward(KdaLayer *L, real *out, const real *x, const unsigned char *doc_start, int B, int T) {
  const int N = B * T, H = L->H, K = L->K, HK = H * K, d = L->d;
  L->B = B;
  L->T = T;
  L->x = x;
  L->doc_start = doc_start;
  matmul_forward(L->qp, x, L->q_proj, N, d, HK);
  matmul_forward(L->kp, x, L->k_proj, N, d, HK);
  matmul_forward(L->vp, x, L->v_proj, N, d, HK);
  short_conv_silu_forward(L->q_act, L->q_pre, L->qp, L->q_conv, doc_start, B, T, HK, L->W);
  short_conv_silu_forward(L->k_act, L->k_pre, L->kp, L->k_conv, doc_start, B, T, HK, L->W);
  short_conv_silu_forward(L->v, L->v_pre, L->vp, L->v_conv, doc_start, B, T, HK, L->W);
  l2norm_forward(L->q, L->q_inv_norm, L->q_act, (real)L2NORM_EPS, N * H, K);
  l2norm_forward(L->k, L->k_inv_norm, L->k_act, (real)L2NORM_EPS, N * H, K);
  matmul_forward(L->f_low, x, L->f_a, N, d, K);
  matmul_forward(L->f, L->f_low, L->f_b, N, K, HK);
  kda_gate_forward(L->g, L->f, L->A_log, L->dt_bias, gate_form(L), L->gate_lower_bound, N, H, K);
  matmul_forward(L->b_logit, x, L->b_proj, N, d, H);
  sigmoid_forward(L->beta, L->b_logit, (size_t)N * H);
  real scale = (real)(1.0 / sqrt((double)K));
  kda_chunk_forward(L->o, NULL, L->q, L->k, L->v, L->g, L->beta, NULL, doc_start, scale, B, T, H, K, K, L->chunk);
  matmul_forward(L->g_low, x, L->g_a, N, d, K);
  matmul_forward(L->gate, L->g_low, L->g_b, N, K, HK);
  gated_rmsnorm_forward(L->y, L->o_rstd, L->o, L->gate, L->o_norm, (real)L->eps, N, H, K);
  matmul_forward(out, L->y, L->o_proj, N, HK, d);
}

static void zero(real *x, size_t n) { memset(x, 0, n * sizeof(real)); }

// dx += gradient through projection -> conv -> SiLU, from the gradient dact of the SiLU output.
static void conv_projection_backward(KdaLayer *L, real *dx, const real *dact, const real *proj, const real *pre,
                                     const real *conv, real *dconv, const real *weight, real *dweight) {
  const int N = L->B * L->T, HK = L->H * L->K;
  zero(L->dproj, (size_t)N * HK);
  short_conv_silu_backward(L->dproj, dconv, dact, proj, conv, pre, L->doc_start, L->B, L->T, HK, L->W);
  matmul_backward(dx, dweight, L->dproj, L->x, weight, N, L->d, HK);
}

void kda_layer_backward(KdaLayer *L, real *dx, const real *dout) {
  const int B = L->B, T = L->T, N = B * T, H = L->H, K = L->K, HK = H * K, d = L->d;
  const size_t wide = (size_t)N * HK;
  zero(L->dy, wide);
  matmul_backward(L->dy, L->do_proj, dout, L->y, L->o_proj, N, HK, d);
  zero(L->do_, wide);
  zero(L->dgate, wide);
  gated_rmsnorm_backward(L->do_, L->dgate, L->do_norm, L->dy, L->o, L->gate, L->o_norm, L->o_rstd, N, H, K);
  zero(L->dg_low, (size_t)N * K);
  matmul_backward(L->dg_low, L->dg_b, L->dgate, L->g_low, L->g_b, N, K, HK);
  matmul_backward(dx, L->dg_a, L->dg_low, L->x, L->g_a, N, d, K);

  zero(L->dq, wide);
  zero(L->dk, wide);
  zero(L->dv, wide);
  zero(L->dg, wide);
  zero(L->dbeta, (size_t)N * H);
  real scale = (real)(1.0 / sqrt((double)K));
  kda_chunk_backward(L->dq, L->dk, L->dv, L->dg, L->dbeta, NULL, L->do_, NULL, L->q, L->k, L->v, L->g, L->beta, NULL,
                     L->doc_start, scale, B, T, H, K, K, L->chunk);

  zero(L->db_logit, (size_t)N * H);
  sigmoid_backward(L->db_logit, L->dbeta, L->beta, (size_t)N * H);
  matmul_backward(dx, L->db_proj, L->db_logit, L->x, L->b_proj, N, d, H);

  zero(L->df, wide);
  kda_gate_backward(L->df, L->dA_log, L->ddt_bias, L->dg, L->f, L->A_log, L->dt_bias, gate_form(L),
                    L->gate_lower_bound, N, H, K);
  zero(L->df_low, (size_t)N * K);
  matmul_backward(L->df_low, L->df_b, L->df, L->f_low, L->f_b, N, K, HK);
  matmul_backward(dx, L->df_a, L->df_low, L->x, L->f_a, N, d, K);

  zero(L->dact, wide);
  l2norm_backward(L->dact, L->dq, L->q_act, L->q_inv_norm, N * H, K);
  conv_projection_backward(L, dx, L->dact, L->qp, L->q_pre, L->q_conv, L->dq_conv, L->q_proj, L->dq_proj);
  zero(L->dact, wide);
  l2norm_backward(L->dact, L->dk, L->k_act, L->k_inv_norm, N * H, K);
  conv_projection_backward(L, dx, L->dact, L->kp, L->k_pre, L->k_conv, L->dk_conv, L->k_proj, L->dk_proj);
  conv_projection_backward(L, dx, L->dv, L->vp, L->v_pre, L->v_conv, L->dv_conv, L->v_proj, L->dv_proj);
}
