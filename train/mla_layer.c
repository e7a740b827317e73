// The MLA mixer's forward and backward; see mla_layer.h.
#include "train/mla_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/attention.h"
#include "kernels/gemm.h"
#include "kernels/norm.h"
#include "train/layer_params.h"

void mla_layer_init(MlaLayer *L, const ModelConfig *m, const ParamRegistry *params, int index, int max_rows) {
  memset(L, 0, sizeof *L);
  L->H = m->mla_heads;
  L->Dn = m->qk_nope_dim;
  L->Dr = m->qk_pe_dim;
  L->Dv = m->v_dim;
  L->R = m->kv_lora_rank;
  L->d = m->hidden_size;
  L->eps = m->rms_norm_eps;
  layer_param(params, index, "self_attn.q_proj.weight", &L->q_proj, &L->dq_proj);
  layer_param(params, index, "self_attn.kv_a_proj_with_mqa.weight", &L->kv_a_proj, &L->dkv_a_proj);
  layer_param(params, index, "self_attn.kv_a_layernorm.weight", &L->kv_a_norm, &L->dkv_a_norm);
  layer_param(params, index, "self_attn.kv_b_proj.weight", &L->kv_b_proj, &L->dkv_b_proj);
  layer_param(params, index, "self_attn.o_proj.weight", &L->o_proj, &L->do_proj);
  size_t N = (size_t)max_rows, H = L->H, Dqk = L->Dn + L->Dr;
  L->q = klt_calloc(N * H * Dqk, sizeof(real));
  L->compressed = klt_calloc(N * (L->R + L->Dr), sizeof(real));
  L->latent = klt_calloc(N * L->R, sizeof(real));
  L->latent_normed = klt_calloc(N * L->R, sizeof(real));
  L->latent_rstd = klt_calloc(N, sizeof(real));
  L->kv = klt_calloc(N * H * (L->Dn + L->Dv), sizeof(real));
  L->k = klt_calloc(N * H * Dqk, sizeof(real));
  L->v = klt_calloc(N * H * L->Dv, sizeof(real));
  L->attn = klt_calloc(N * H * L->Dv, sizeof(real));
  L->lse = klt_calloc(N * H, sizeof(real));
  L->step_max_logit = klt_calloc(H, sizeof(real));
  L->call_max_logit = klt_calloc(H, sizeof(real));
  L->dattn = klt_calloc(N * H * L->Dv, sizeof(real));
  L->dq = klt_calloc(N * H * Dqk, sizeof(real));
  L->dk = klt_calloc(N * H * Dqk, sizeof(real));
  L->dv = klt_calloc(N * H * L->Dv, sizeof(real));
  L->dkv = klt_calloc(N * H * (L->Dn + L->Dv), sizeof(real));
  L->dlatent_normed = klt_calloc(N * L->R, sizeof(real));
  L->dlatent = klt_calloc(N * L->R, sizeof(real));
  L->dcompressed = klt_calloc(N * (L->R + L->Dr), sizeof(real));
  for (int h = 0; h < L->H; h++) L->step_max_logit[h] = -INFINITY;
}

void mla_layer_free(MlaLayer *L) {
  real *buffers[] = {L->q, L->compressed, L->latent, L->latent_normed, L->latent_rstd, L->kv, L->k, L->v, L->attn,
                     L->lse, L->step_max_logit, L->call_max_logit, L->dattn, L->dq, L->dk, L->dv, L->dkv,
                     L->dlatent_normed, L->dlatent, L->dcompressed};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
}

void mla_layer_forward(MlaLayer *L, real *out, const real *x, const unsigned char *doc_start, int B, int T) {
  const int N = B * T, H = L->H, Dn = L->Dn, Dr = L->Dr, Dv = L->Dv, R = L->R, d = L->d, Dqk = Dn + Dr;
  L->B = B;
  L->T = T;
  L->x = x;
  L->doc_start = doc_start;
  matmul_forward(L->q, x, L->q_proj, N, d, H * Dqk);
  matmul_forward(L->compressed, x, L->kv_a_proj, N, d, R + Dr);
  for (int n = 0; n < N; n++) memcpy(L->latent + (size_t)n * R, L->compressed + (size_t)n * (R + Dr), R * sizeof(real));
  rmsnorm_forward(L->latent_normed, L->latent_rstd, L->latent, L->kv_a_norm, (real)L->eps, N, R);
  matmul_forward(L->kv, L->latent_normed, L->kv_b_proj, N, R, H * (Dn + Dv));
  for (int n = 0; n < N; n++) {
    const real *k_pe = L->compressed + (size_t)n * (R + Dr) + R;
    for (int h = 0; h < H; h++) {
      const real *kv = L->kv + ((size_t)n * H + h) * (Dn + Dv);
      real *k = L->k + ((size_t)n * H + h) * Dqk;
      memcpy(k, kv, Dn * sizeof(real));
      memcpy(k + Dn, k_pe, Dr * sizeof(real));
      memcpy(L->v + ((size_t)n * H + h) * Dv, kv + Dn, Dv * sizeof(real));
    }
  }
  real scale = (real)(1.0 / sqrt((double)Dqk));
  attention_forward(L->attn, L->lse, L->call_max_logit, L->q, L->k, L->v, doc_start, scale, B, T, H, Dqk, Dv);
  for (int h = 0; h < H; h++)
    if (L->call_max_logit[h] > L->step_max_logit[h]) L->step_max_logit[h] = L->call_max_logit[h];
  matmul_forward(out, L->attn, L->o_proj, N, H * Dv, d);
}

void mla_layer_backward(MlaLayer *L, real *dx, const real *dout) {
  const int B = L->B, T = L->T, N = B * T, H = L->H, Dn = L->Dn, Dr = L->Dr, Dv = L->Dv, R = L->R, d = L->d;
  const int Dqk = Dn + Dr;
  memset(L->dattn, 0, (size_t)N * H * Dv * sizeof(real));
  matmul_backward(L->dattn, L->do_proj, dout, L->attn, L->o_proj, N, H * Dv, d);
  memset(L->dq, 0, (size_t)N * H * Dqk * sizeof(real));
  memset(L->dk, 0, (size_t)N * H * Dqk * sizeof(real));
  memset(L->dv, 0, (size_t)N * H * Dv * sizeof(real));
  real scale = (real)(1.0 / sqrt((double)Dqk));
  attention_backward(L->dq, L->dk, L->dv, L->dattn, L->q, L->k, L->v, L->attn, L->lse, L->doc_start, scale, B, T, H,
                     Dqk, Dv);
  // Scatter k and v gradients back to kv_b's output and the shared k_pe (summed over heads).
  memset(L->dcompressed, 0, (size_t)N * (R + Dr) * sizeof(real));
  for (int n = 0; n < N; n++) {
    real *dk_pe = L->dcompressed + (size_t)n * (R + Dr) + R;
    for (int h = 0; h < H; h++) {
      real *dkv = L->dkv + ((size_t)n * H + h) * (Dn + Dv);
      const real *dk = L->dk + ((size_t)n * H + h) * Dqk;
      memcpy(dkv, dk, Dn * sizeof(real));
      memcpy(dkv + Dn, L->dv + ((size_t)n * H + h) * Dv, Dv * sizeof(real));
      for (int i = 0; i < Dr; i++) dk_pe[i] += dk[Dn + i];
    }
  }
  memset(L->dlatent_normed, 0, (size_t)N * R * sizeof(real));
  matmul_backward(L->dlatent_normed, L->dkv_b_proj, L->dkv, L->latent_normed, L->kv_b_proj, N, R, H * (Dn + Dv));
  real *dlatent = L->dlatent;
  memset(dlatent, 0, (size_t)N * R * sizeof(real));
  rmsnorm_backward(dlatent, L->dkv_a_norm, L->dlatent_normed, L->latent, L->kv_a_norm, L->latent_rstd, N, R);
  for (int n = 0; n < N; n++) memcpy(L->dcompressed + (size_t)n * (R + Dr), dlatent + (size_t)n * R, R * sizeof(real));
  matmul_backward(dx, L->dkv_a_proj, L->dcompressed, L->x, L->kv_a_proj, N, d, R + Dr);
  matmul_backward(dx, L->dq_proj, L->dq, L->x, L->q_proj, N, d, H * Dqk);
}
