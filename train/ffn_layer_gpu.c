// The FFN layers on the GPU: a SwiGLU MLP (dense layers and the shared expert) and the MoE layer
// (router, top-k, permutation, grouped expert GEMMs, weighted combine); see gpu_layers.h and the CPU
// twins ffn_layer.c and moe_layer.c. One expert-parallel rank (ep = 1).
#ifdef KLT_HAVE_CUDA
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "kernels/activation.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "train/gpu_layers.h"

void gpu_swiglu_init(GpuSwiglu *M, GpuTensor gate_up, GpuTensor down, int d, int F, int max_rows) {
  memset(M, 0, sizeof *M);
  M->d = d;
  M->F = F;
  M->gate_up = gate_up;
  M->down = down;
  M->gate_up_out = device_alloc((size_t)max_rows * 2 * F * sizeof(bf16));
  M->act = device_alloc((size_t)max_rows * F * sizeof(bf16));
}

void gpu_swiglu_free(GpuSwiglu *M) {
  device_free(M->gate_up_out);
  device_free(M->act);
}

void gpu_swiglu_forward(GpuSwiglu *M, bf16 *out, const bf16 *x, int N) {
  M->x = x;
  M->N = N;
  matmul_forward_cuda(M->gate_up_out, x, M->gate_up.w, N, M->d, 2 * M->F);
  swiglu_forward_cuda(M->act, M->gate_up_out, N, M->F);
  matmul_forward_cuda(out, M->act, M->down.w, N, M->F, M->d);
}

void gpu_swiglu_backward(GpuSwiglu *M, bf16 *dx, const bf16 *dout, bool accumulate, GpuScratch *s) {
  const int N = M->N, d = M->d, F = M->F;
  bf16 *dact = s->moe_rows[0], *dgate_up = s->moe_rows[1];
  matmul_backward_cuda(dact, M->down.grad, dout, M->act, M->down.w, N, F, d, false);
  swiglu_backward_cuda(dgate_up, dact, M->gate_up_out, N, F);
  matmul_backward_cuda(dx, M->gate_up.grad, dgate_up, M->x, M->gate_up.w, N, d, 2 * F, accumulate);
}

// [gate; up] of a SwiGLU whose matrices were registered as gate, up, down: adjacent in the arenas, so
// the two are one (2F, d) matrix.
GpuTensor gpu_adjacent_pair(const GpuParams *p, int layer, const char *gate, const char *up, size_t gate_numel) {
  GpuTensor a = gpu_param(p, layer, gate), b = gpu_param(p, layer, up);
  CHECK(b.master - a.master == (ptrdiff_t)gate_numel, "the registry must hold %s and %s side by side", gate, up);
  return a;
}

void gpu_moe_init(GpuMoe *L, const ModelConfig *m, const GpuParams *p, int l, int max_rows) {
  memset(L, 0, sizeof *L);
  L->d = m->hidden_size;
  L->E = m->num_experts;
  L->top_k = m->experts_per_token;
  L->F = m->expert_intermediate_size;
  L->scaling = (float)m->routed_scaling_factor;
  L->router = gpu_param(p, l, "block_sparse_moe.gate.weight");
  L->bias = gpu_param(p, l, "block_sparse_moe.gate.e_score_correction_bias");
  L->experts = gpu_param(p, l, "block_sparse_moe.experts.0.w1.weight");
  GpuTensor w3 = gpu_param(p, l, "block_sparse_moe.experts.0.w3.weight");
  GpuTensor w2 = gpu_param(p, l, "block_sparse_moe.experts.0.w2.weight");
  const long long Fd = (long long)L->F * L->d;
  CHECK(w3.master - L->experts.master == Fd && w2.master - L->experts.master == 2 * Fd,
        "expert matrices must be registered as w1, w3, w2");
  L->expert_stride = 3 * Fd;
  if (L->E > 1) {
    GpuTensor next = gpu_param(p, l, "block_sparse_moe.experts.1.w1.weight");
    CHECK(next.master - L->experts.master == L->expert_stride, "experts must be registered one after another");
  }
  L->has_shared = m->num_shared_experts > 0;
  if (L->has_shared) {
    int F = L->F * m->num_shared_experts;
    GpuTensor gate = gpu_adjacent_pair(p, l, "block_sparse_moe.shared_experts.gate_proj.weight",
                                       "block_sparse_moe.shared_experts.up_proj.weight", (size_t)F * L->d);
    gpu_swiglu_init(&L->shared, gate, gpu_param(p, l, "block_sparse_moe.shared_experts.down_proj.weight"), L->d, F,
                    max_rows);
    L->shared_out = device_alloc((size_t)max_rows * L->d * sizeof(bf16));
  }
  const size_t N = (size_t)max_rows, E = L->E, k = L->top_k, rows = N * k;
  L->logits = device_alloc(N * E * sizeof(float));
  L->scores = device_alloc(N * E * sizeof(float));
  L->expert_index = device_alloc(N * k * sizeof(int));
  L->expert_weight = device_alloc(N * k * sizeof(float));
  L->counts = device_alloc(E * sizeof(int));
  L->offsets = device_alloc((E + 1) * sizeof(int));
  L->offsets_host = klt_calloc(E + 1, sizeof(int));
  L->row_of_assignment = device_alloc(rows * sizeof(int));
  L->token_of_row = device_alloc(rows * sizeof(int));
  L->sorted = device_alloc(rows * L->d * sizeof(bf16));
  L->gate_up_out = device_alloc(rows * 2 * L->F * sizeof(bf16));
  L->act = device_alloc(rows * L->F * sizeof(bf16));
  L->expert_out = device_alloc(rows * L->d * sizeof(bf16));
  L->load = klt_calloc(E, sizeof(double));
}

void gpu_moe_free(GpuMoe *L) {
  if (L->has_shared) {
    gpu_swiglu_free(&L->shared);
    device_free(L->shared_out);
  }
  void *buffers[] = {L->logits, L->scores, L->expert_index, L->expert_weight, L->counts, L->offsets,
                     L->row_of_assignment, L->token_of_row, L->sorted, L->gate_up_out, L->act, L->expert_out};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) device_free(buffers[i]);
  free(L->offsets_host);
  free(L->load);
}

void gpu_moe_forward(GpuMoe *L, bf16 *out, const bf16 *x, int N) {
  const int d = L->d, E = L->E, k = L->top_k, F = L->F;
  L->x = x;
  L->N = N;
  gemm_cuda(false, true, N, E, d, 1.0f, x, d, 0, L->router.w, d, 0, 0.0f, L->logits, E, 0, true, 1);
  moe_router_forward_cuda(L->expert_index, L->expert_weight, L->scores, L->logits, L->bias.master, N, E, k,
                          L->scaling);
  moe_permute_plan_cuda(L->counts, L->offsets, L->row_of_assignment, L->token_of_row, L->expert_index, N, E, k);
  // The grouped GEMMs need each expert's row range on the host: one small copy per layer.
  device_download(L->offsets_host, L->offsets, (size_t)(E + 1) * sizeof(int));
  for (int e = 0; e < E; e++) L->load[e] += L->offsets_host[e + 1] - L->offsets_host[e];
  const int rows = N * k;
  moe_permute_forward_cuda(L->sorted, x, L->token_of_row, rows, d);
  moe_grouped_matmul_forward_cuda(L->gate_up_out, L->sorted, L->experts.w, L->expert_stride, L->offsets_host, E, d,
                                  2 * F);
  swiglu_forward_cuda(L->act, L->gate_up_out, rows, F);
  moe_grouped_matmul_forward_cuda(L->expert_out, L->act, L->experts.w + 2LL * F * d, L->expert_stride,
                                  L->offsets_host, E, F, d);
  if (L->has_shared) gpu_swiglu_forward(&L->shared, L->shared_out, x, N);
  moe_unpermute_forward_cuda(out, L->expert_out, L->expert_weight, L->row_of_assignment,
                             L->has_shared ? L->shared_out : NULL, N, k, d);
}

void gpu_moe_backward(GpuMoe *L, bf16 *dx, const bf16 *dout, GpuScratch *s) {
  const int N = L->N, d = L->d, E = L->E, k = L->top_k, F = L->F, rows = N * k;
  if (L->has_shared) gpu_swiglu_backward(&L->shared, dx, dout, false, s);
  else device_zero(dx, (size_t)N * d * sizeof(bf16));
  bf16 *dexpert_out = s->moe_rows[0], *dact = s->moe_rows[1], *dgate_up = s->moe_rows[2];
  moe_unpermute_backward_cuda(dexpert_out, s->dexpert_weight, dout, L->expert_out, L->expert_weight,
                              L->row_of_assignment, N, k, d);
  moe_grouped_matmul_backward_cuda(dact, L->experts.grad + 2LL * F * d, dexpert_out, L->act,
                                   L->experts.w + 2LL * F * d, L->expert_stride, L->offsets_host, E, F, d);
  swiglu_backward_cuda(dgate_up, dact, L->gate_up_out, rows, F);
  bf16 *dsorted = dexpert_out;  // consumed above
  moe_grouped_matmul_backward_cuda(dsorted, L->experts.grad, dgate_up, L->sorted, L->experts.w, L->expert_stride,
                                   L->offsets_host, E, d, 2 * F);
  moe_permute_backward_cuda(dx, dsorted, L->row_of_assignment, N, k, d, true);
  float *dlogits = s->h_float[0];
  moe_router_backward_cuda(dlogits, s->dexpert_weight, L->scores, L->expert_index, N, E, k, L->scaling);
  device_float_to_bf16(s->h_bf16, dlogits, (size_t)N * E);
  matmul_backward_cuda(dx, L->router.grad, s->h_bf16, L->x, L->router.w, N, d, E, true);
}
#endif
