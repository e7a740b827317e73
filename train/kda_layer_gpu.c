// The KDA mixer on the GPU: the wiring of kda_layer.c on device buffers; see gpu_layers.h.
#ifdef KLT_HAVE_CUDA
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/activation.h"
#include "kernels/conv.h"
#include "kernels/gemm.h"
#include "kernels/kda.h"
#include "kernels/norm.h"
#include "train/gpu_layers.h"

GpuTensor gpu_param(const GpuParams *p, int layer, const char *suffix) {
  char name[160];
  if (layer >= 0) snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
  else snprintf(name, sizeof name, "%s", suffix);
  int i = params_find(p->registry, name);
  CHECK(i >= 0, "parameter %s is not registered", name);
  size_t offset = p->registry->params[i].offset;
  GpuTensor t = {p->weights + offset, p->master + offset, p->grads + offset};
  return t;
}

static void *alloc_bf16(size_t n) { return device_alloc(n * sizeof(bf16)); }
static void *alloc_float(size_t n) { return device_alloc(n * sizeof(float)); }

void gpu_kda_init(GpuKda *L, const ModelConfig *m, const GpuParams *p, int l, int max_rows) {
  memset(L, 0, sizeof *L);
  L->H = m->kda_heads;
  L->K = m->kda_head_dim;
  L->d = m->hidden_size;
  L->W = m->conv_size;
  L->gate_bounded = m->gate_bounded;
  L->gate_lower_bound = (float)m->gate_lower_bound;
  L->eps = (float)m->rms_norm_eps;
  L->q_proj = gpu_param(p, l, "self_attn.q_proj.weight");
  L->k_proj = gpu_param(p, l, "self_attn.k_proj.weight");
  L->v_proj = gpu_param(p, l, "self_attn.v_proj.weight");
  L->q_conv = gpu_param(p, l, "self_attn.q_conv1d.weight");
  L->k_conv = gpu_param(p, l, "self_attn.k_conv1d.weight");
  L->v_conv = gpu_param(p, l, "self_attn.v_conv1d.weight");
  L->A_log = gpu_param(p, l, "self_attn.A_log");
  L->f_a = gpu_param(p, l, "self_attn.f_a_proj.weight");
  L->f_b = gpu_param(p, l, "self_attn.f_b_proj.weight");
  L->dt_bias = gpu_param(p, l, "self_attn.dt_bias");
  L->b_proj = gpu_param(p, l, "self_attn.b_proj.weight");
  L->g_a = gpu_param(p, l, "self_attn.g_a_proj.weight");
  L->g_b = gpu_param(p, l, "self_attn.g_b_proj.weight");
  L->o_norm = gpu_param(p, l, "self_attn.o_norm.weight");
  L->o_proj = gpu_param(p, l, "self_attn.o_proj.weight");
  const size_t N = (size_t)max_rows, HK = (size_t)L->H * L->K, H = L->H, K = L->K;
  bf16 **wide[] = {&L->qp, &L->kp, &L->vp, &L->q_act, &L->k_act, &L->v, &L->f, &L->o, &L->gate, &L->y};
  for (size_t i = 0; i < sizeof wide / sizeof wide[0]; i++) *wide[i] = alloc_bf16(N * HK);
  L->g = alloc_float(N * HK);
  L->beta = alloc_float(N * H);
  L->o_rstd = alloc_float(N * H);
  L->b_logit = alloc_bf16(N * H);
  L->f_low = alloc_bf16(N * K);
  L->g_low = alloc_bf16(N * K);
}

void gpu_kda_free(GpuKda *L) {
  void *buffers[] = {L->qp, L->kp, L->vp, L->q_act, L->k_act, L->v, L->f, L->o, L->gate, L->y, L->g, L->beta,
                     L->o_rstd, L->b_logit, L->f_low, L->g_low, L->kda_saved};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) device_free(buffers[i]);
}

static KdaGateForm gate_form(const GpuKda *L) { return L->gate_bounded ? KDA_GATE_BOUNDED : KDA_GATE_SOFTPLUS; }

void gpu_kda_forward(GpuKda *L, bf16 *out, const bf16 *x, const unsigned char *doc_start, int B, int T) {
  const int N = B * T, H = L->H, K = L->K, HK = H * K, d = L->d;
  L->B = B;
  L->T = T;
  L->x = x;
  L->doc_start = doc_start;
  matmul_forward_cuda(L->qp, x, L->q_proj.w, N, d, HK);
  matmul_forward_cuda(L->kp, x, L->k_proj.w, N, d, HK);
  matmul_forward_cuda(L->vp, x, L->v_proj.w, N, d, HK);
  short_conv_silu_forward_cuda(L->q_act, L->qp, L->q_conv.master, doc_start, B, T, HK, L->W);
  short_conv_silu_forward_cuda(L->k_act, L->kp, L->k_conv.master, doc_start, B, T, HK, L->W);
  short_conv_silu_forward_cuda(L->v, L->vp, L->v_conv.master, doc_start, B, T, HK, L->W);
  matmul_forward_cuda(L->f_low, x, L->f_a.w, N, d, K);
  matmul_forward_cuda(L->f, L->f_low, L->f_b.w, N, K, HK);
  kda_gate_forward_cuda(L->g, L->f, L->A_log.master, L->dt_bias.master, gate_form(L), L->gate_lower_bound, N, H, K);
  matmul_forward_cuda(L->b_logit, x, L->b_proj.w, N, d, H);
  sigmoid_forward_cuda(L->beta, L->b_logit, (size_t)N * H);
  float scale = 1.0f / sqrtf((float)K);
  const size_t saved = kda_chunk_saved_floats(B, T, H, K, K);
  if (saved > L->kda_saved_floats) {  // once, at the first forward (its size depends on B and T, not only B * T)
    device_free(L->kda_saved);
    L->kda_saved = alloc_float(saved);
    L->kda_saved_floats = saved;
  }
  // q and k enter raw: the op L2-normalizes them.
  kda_chunk_forward_cuda(L->o, NULL, L->q_act, L->k_act, L->v, L->g, L->beta, NULL, doc_start, scale, B, T, H, K,
                         K, L->kda_saved);
  matmul_forward_cuda(L->g_low, x, L->g_a.w, N, d, K);
  matmul_forward_cuda(L->gate, L->g_low, L->g_b.w, N, K, HK);
  gated_rmsnorm_forward_cuda(L->y, L->o_rstd, L->o, L->gate, L->o_norm.master, L->eps, N, H, K);
  matmul_forward_cuda(out, L->y, L->o_proj.w, N, HK, d);
}

void gpu_kda_backward(GpuKda *L, bf16 *dx, const bf16 *dout, GpuScratch *s) {
  const int B = L->B, T = L->T, N = B * T, H = L->H, K = L->K, HK = H * K, d = L->d;
  bf16 *dy = s->wide[0], *do_ = s->wide[1], *dgate = s->wide[2], *dq = s->wide[3], *dk = s->wide[4],
       *dv = s->wide[5], *dproj = s->wide[6];
  bf16 *dlow = s->narrow[0];
  float *dg = s->g_wide, *dbeta = s->h_float[0];
  matmul_backward_cuda(dy, L->o_proj.grad, dout, L->y, L->o_proj.w, N, HK, d, false);
  gated_rmsnorm_backward_cuda(do_, dgate, L->o_norm.grad, dy, L->o, L->gate, L->o_norm.master, L->o_rstd, N, H, K);
  matmul_backward_cuda(dlow, L->g_b.grad, dgate, L->g_low, L->g_b.w, N, K, HK, false);
  matmul_backward_cuda(dx, L->g_a.grad, dlow, L->x, L->g_a.w, N, d, K, false);

  float scale = 1.0f / sqrtf((float)K);
  kda_chunk_backward_cuda(dq, dk, dv, dg, dbeta, NULL, do_, NULL, L->q_act, L->k_act, L->v, L->g, L->beta, NULL,
                          L->doc_start, scale, B, T, H, K, K, L->kda_saved);

  sigmoid_backward_cuda(s->h_bf16, dbeta, L->beta, (size_t)N * H);
  matmul_backward_cuda(dx, L->b_proj.grad, s->h_bf16, L->x, L->b_proj.w, N, d, H, true);

  bf16 *df = dgate;  // dgate is consumed
  kda_gate_backward_cuda(df, L->A_log.grad, L->dt_bias.grad, dg, L->f, L->A_log.master, L->dt_bias.master,
                         gate_form(L), L->gate_lower_bound, N, H, K);
  matmul_backward_cuda(dlow, L->f_b.grad, df, L->f_low, L->f_b.w, N, K, HK, false);
  matmul_backward_cuda(dx, L->f_a.grad, dlow, L->x, L->f_a.w, N, d, K, true);

  short_conv_silu_backward_cuda(dproj, L->q_conv.grad, dq, L->qp, L->q_conv.master, L->doc_start, B, T, HK, L->W);
  matmul_backward_cuda(dx, L->q_proj.grad, dproj, L->x, L->q_proj.w, N, d, HK, true);
  short_conv_silu_backward_cuda(dproj, L->k_conv.grad, dk, L->kp, L->k_conv.master, L->doc_start, B, T, HK, L->W);
  matmul_backward_cuda(dx, L->k_proj.grad, dproj, L->x, L->k_proj.w, N, d, HK, true);
  short_conv_silu_backward_cuda(dproj, L->v_conv.grad, dv, L->vp, L->v_conv.master, L->doc_start, B, T, HK, L->W);
  matmul_backward_cuda(dx, L->v_proj.grad, dproj, L->x, L->v_proj.w, N, d, HK, true);
}
#endif
