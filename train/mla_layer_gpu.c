// The MLA mixer on the GPU: the wiring of mla_layer.c on device buffers; see gpu_layers.h.
#ifdef KLT_HAVE_CUDA
#include <math.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/gemm.h"
#include "kernels/mla_layout.h"
#include "kernels/norm.h"
#include "train/gpu_layers.h"

void gpu_mla_init(GpuMla *L, const ModelConfig *m, const GpuParams *p, int l, int max_rows) {
  memset(L, 0, sizeof *L);
  L->H = m->mla_heads;
  L->Dn = m->qk_nope_dim;
  L->Dr = m->qk_pe_dim;
  L->Dv = m->v_dim;
  L->R = m->kv_lora_rank;
  L->d = m->hidden_size;
  L->eps = (float)m->rms_norm_eps;
  L->q_proj = gpu_param(p, l, "self_attn.q_proj.weight");
  L->kv_a_proj = gpu_param(p, l, "self_attn.kv_a_proj_with_mqa.weight");
  L->kv_a_norm = gpu_param(p, l, "self_attn.kv_a_layernorm.weight");
  L->kv_b_proj = gpu_param(p, l, "self_attn.kv_b_proj.weight");
  L->o_proj = gpu_param(p, l, "self_attn.o_proj.weight");
  const size_t N = (size_t)max_rows, H = L->H, Dqk = L->Dn + L->Dr;
  L->q = device_alloc(N * H * Dqk * sizeof(bf16));
  L->compressed = device_alloc(N * (L->R + L->Dr) * sizeof(bf16));
  L->latent = device_alloc(N * L->R * sizeof(bf16));
  L->latent_normed = device_alloc(N * L->R * sizeof(bf16));
  L->latent_rstd = device_alloc(N * sizeof(float));
  L->kv = device_alloc(N * H * (L->Dn + L->Dv) * sizeof(bf16));
  L->k = device_alloc(N * H * Dqk * sizeof(bf16));
  L->v = device_alloc(N * H * L->Dv * sizeof(bf16));
  L->attn = device_alloc(N * H * L->Dv * sizeof(bf16));
  L->lse = device_alloc(N * H * sizeof(float));
  L->max_logit = device_alloc(H * sizeof(float));
}

void gpu_mla_free(GpuMla *L) {
  void *buffers[] = {L->q, L->compressed, L->latent, L->latent_normed, L->latent_rstd, L->kv, L->k, L->v, L->attn,
                     L->lse, L->max_logit};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) device_free(buffers[i]);
}

void gpu_mla_forward(GpuMla *L, bf16 *out, const bf16 *x, const unsigned char *doc_start, int B, int T) {
  const int N = B * T, H = L->H, Dn = L->Dn, Dr = L->Dr, Dv = L->Dv, R = L->R, d = L->d, Dqk = Dn + Dr;
  L->B = B;
  L->T = T;
  L->x = x;
  L->doc_start = doc_start;
  matmul_forward_cuda(L->q, x, L->q_proj.w, N, d, H * Dqk);
  matmul_forward_cuda(L->compressed, x, L->kv_a_proj.w, N, d, R + Dr);
  device_copy_2d(L->latent, (size_t)R * sizeof(bf16), L->compressed, (size_t)(R + Dr) * sizeof(bf16),
                 (size_t)R * sizeof(bf16), (size_t)N);
  rmsnorm_forward_cuda(L->latent_normed, L->latent_rstd, L->latent, L->kv_a_norm.master, L->eps, N, R);
  matmul_forward_cuda(L->kv, L->latent_normed, L->kv_b_proj.w, N, R, H * (Dn + Dv));
  mla_split_kv_cuda(L->k, L->v, L->kv, L->compressed, N, H, Dn, Dr, Dv, R);
  float scale = 1.0f / sqrtf((float)Dqk);
  attention_forward_cuda(L->attn, L->lse, L->max_logit, L->q, L->k, L->v, doc_start, scale, B, T, H, Dqk, Dv);
  matmul_forward_cuda(out, L->attn, L->o_proj.w, N, H * Dv, d);
}

void gpu_mla_backward(GpuMla *L, bf16 *dx, const bf16 *dout, GpuScratch *s) {
  const int B = L->B, T = L->T, N = B * T, H = L->H, Dn = L->Dn, Dr = L->Dr, Dv = L->Dv, R = L->R, d = L->d;
  const int Dqk = Dn + Dr;
  bf16 *dattn = s->wide[0], *dq = s->wide[1], *dk = s->wide[2], *dv = s->wide[3], *dkv = s->wide[4];
  bf16 *dlatent_normed = s->narrow[0], *dlatent = s->narrow[1], *dcompressed = s->narrow[2];
  matmul_backward_cuda(dattn, L->o_proj.grad, dout, L->attn, L->o_proj.w, N, H * Dv, d, false);
  float scale = 1.0f / sqrtf((float)Dqk);
  attention_backward_cuda(dq, dk, dv, dattn, L->q, L->k, L->v, L->attn, L->lse, L->doc_start, scale, B, T, H, Dqk,
                          Dv);
  mla_merge_kv_grad_cuda(dkv, dcompressed, dk, dv, N, H, Dn, Dr, Dv, R);
  matmul_backward_cuda(dlatent_normed, L->kv_b_proj.grad, dkv, L->latent_normed, L->kv_b_proj.w, N, R,
                       H * (Dn + Dv), false);
  rmsnorm_backward_cuda(dlatent, L->kv_a_norm.grad, dlatent_normed, L->latent, L->kv_a_norm.master, L->latent_rstd,
                        N, R);
  device_copy_2d(dcompressed, (size_t)(R + Dr) * sizeof(bf16), dlatent, (size_t)R * sizeof(bf16),
                 (size_t)R * sizeof(bf16), (size_t)N);
  matmul_backward_cuda(dx, L->kv_a_proj.grad, dcompressed, L->x, L->kv_a_proj.w, N, d, R + Dr, false);
  matmul_backward_cuda(dx, L->q_proj.grad, dq, L->x, L->q_proj.w, N, d, H * Dqk, true);
}
#endif
