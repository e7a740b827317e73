// Speed of the CUDA MoE layer pieces and of the fused lm-head cross-entropy at the small config's
// shapes (configs/models/small.ini): N = 16384 tokens, d = 1024, E = 64 experts, top-8, F = 512, and
// the lm head at C = 1024, V = 32000. The SwiGLU between the expert GEMMs is left out (its own op).
// Usage: bench_moe [N [moe]] (moe: skip the cross-entropy); KLT_MOE_GEMM=lt|grouped|loop picks the expert
// GEMM form (see kernels/moe.cu), KLT_MOE_STREAMS the side streams of the lt form.
#include <stdio.h>
#ifndef KLT_HAVE_CUDA
int main(void) {
  printf("bench_moe: built without the CUDA backend\n");
  return 0;
}
#else
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cross_entropy.h"
#include "kernels/device.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"

#define PEAK_TFLOPS 989.0  // H100 SXM dense bf16

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float uniform(void) {  // [-1, 1)
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((rng_state >> 40) * (1.0 / (1 << 24))) * 2.0f - 1.0f;
}
static bf16 *random_bf16(size_t n, float scale) {
  bf16 *h = malloc(n * sizeof(bf16));
  for (size_t i = 0; i < n; i++) h[i] = bf16_from_float(uniform() * scale);
  bf16 *d = device_alloc(n * sizeof(bf16));
  device_upload(d, h, n * sizeof(bf16));
  free(h);
  return d;
}
static float *random_float(size_t n, float scale) {
  float *h = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = uniform() * scale;
  float *d = device_alloc(n * sizeof(float));
  device_upload(d, h, n * sizeof(float));
  free(h);
  return d;
}

#define STAGES 16
static const char *stage_name[STAGES];
static double stage_ms[STAGES];
static cudaEvent_t events[STAGES + 1];
static int stage;
static void mark(const char *name) {  // ends the stage started by the previous mark
  if (name) stage_name[stage] = name;
  cudaEventRecord(events[stage], device_stream());
  stage++;
}
static void collect(int runs) {
  cudaEventSynchronize(events[stage - 1]);
  for (int s = 0; s + 1 < stage; s++) {
    float ms;
    cudaEventElapsedTime(&ms, events[s], events[s + 1]);
    stage_ms[s] += ms / runs;
  }
}

int main(int argc, char **argv) {
  const int N = argc > 1 ? atoi(argv[1]) : 16384, d = 1024, E = 64, k = 8, F = 512;
  const int rows = N * k;
  const long long stride = 3LL * F * d;
  const char *mode = getenv("KLT_MOE_GEMM") ? getenv("KLT_MOE_GEMM") : "lt";
  struct cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("device %s; MoE N=%d d=%d E=%d top-%d F=%d; expert GEMMs: %s (streams %s)\n", prop.name, N, d, E, k, F, mode,
         getenv("KLT_MOE_STREAMS") ? getenv("KLT_MOE_STREAMS") : "default");
  for (int s = 0; s <= STAGES; s++) cudaEventCreate(&events[s]);

  bf16 *x = random_bf16((size_t)N * d, 1.0f), *router_w = random_bf16((size_t)E * d, 0.05f);
  float *bias = random_float(E, 0.01f);
  bf16 *experts = random_bf16((size_t)E * stride, 0.03f);
  float *dexperts = device_alloc((size_t)E * stride * sizeof(float));
  float *logits = device_alloc((size_t)N * E * 4), *scores = device_alloc((size_t)N * E * 4);
  float *weight = device_alloc((size_t)N * k * 4), *dweight = device_alloc((size_t)N * k * 4);
  int *index = device_alloc((size_t)N * k * 4), *counts = device_alloc(E * 4), *offsets = device_alloc((E + 1) * 4);
  int *row_of = device_alloc((size_t)rows * 4), *token_of = device_alloc((size_t)rows * 4);
  int *offsets_host = malloc((E + 1) * sizeof(int));
  bf16 *sorted = device_alloc((size_t)rows * d * 2), *gate_up = device_alloc((size_t)rows * 2 * F * 2);
  bf16 *act = random_bf16((size_t)rows * F, 1.0f), *expert_out = device_alloc((size_t)rows * d * 2);
  bf16 *out = device_alloc((size_t)N * d * 2), *dout = random_bf16((size_t)N * d, 1.0f);
  bf16 *dexpert_out = device_alloc((size_t)rows * d * 2), *dact = device_alloc((size_t)rows * F * 2);
  bf16 *dgate_up = random_bf16((size_t)rows * 2 * F, 1.0f), *dx = device_alloc((size_t)N * d * 2);
  const double gemm_fwd = 2.0 * rows * d * 2 * F + 2.0 * rows * F * d, gemm_bwd = 2 * gemm_fwd;

  const int warmup = 3, runs = 10;
  for (int it = 0; it < warmup + runs; it++) {
    stage = 0;
    mark("router gemm");
    gemm_cuda(false, true, N, E, d, 1.0f, x, d, 0, router_w, d, 0, 0.0f, logits, E, 0, true, 1);
    mark("router top-k");
    moe_router_forward_cuda(index, weight, scores, logits, bias, N, E, k, 2.446f);
    mark("plan + counts to host");
    moe_permute_plan_cuda(counts, offsets, row_of, token_of, index, N, E, k);
    device_download(offsets_host, offsets, (E + 1) * sizeof(int));
    mark("permute");
    moe_permute_forward_cuda(sorted, x, token_of, rows, d);
    mark("grouped w13 fwd");
    moe_grouped_matmul_forward_cuda(gate_up, sorted, experts, stride, offsets_host, E, d, 2 * F);
    mark("grouped w2 fwd");
    moe_grouped_matmul_forward_cuda(expert_out, act, experts + 2LL * F * d, stride, offsets_host, E, F, d);
    mark("unpermute fwd");
    moe_unpermute_forward_cuda(out, expert_out, weight, row_of, NULL, N, k, d);
    mark("unpermute bwd");
    moe_unpermute_backward_cuda(dexpert_out, dweight, dout, expert_out, weight, row_of, N, k, d);
    mark("grouped w2 bwd");
    moe_grouped_matmul_backward_cuda(dact, dexperts + 2LL * F * d, dexpert_out, act, experts + 2LL * F * d, stride,
                                     offsets_host, E, F, d);
    mark("grouped w13 bwd");
    moe_grouped_matmul_backward_cuda(dexpert_out, dexperts, dgate_up, sorted, experts, stride, offsets_host, E, d,
                                     2 * F);
    mark("permute bwd");
    moe_permute_backward_cuda(dx, dexpert_out, row_of, N, k, d, true);
    mark("router bwd");
    moe_router_backward_cuda(logits, dweight, scores, index, N, E, k, 2.446f);
    mark("w13 bwd dinp only");
    moe_grouped_matmul_backward_cuda(dexpert_out, NULL, dgate_up, sorted, experts, stride, offsets_host, E, d, 2 * F);
    mark("w13 bwd dweight only");
    moe_grouped_matmul_backward_cuda(NULL, dexperts, dgate_up, sorted, experts, stride, offsets_host, E, d, 2 * F);
    mark(NULL);
    if (it == warmup - 1) {
      device_synchronize();
      for (int s = 0; s < STAGES; s++) stage_ms[s] = 0;
    } else if (it >= warmup) {
      collect(runs);
    }
  }
  int max_count = 0;
  for (int e = 0; e < E; e++)
    if (offsets_host[e + 1] - offsets_host[e] > max_count) max_count = offsets_host[e + 1] - offsets_host[e];
  printf("expert rows: mean %.0f, max %d\n", (double)rows / E, max_count);
  double fwd = 0, bwd = 0;
  for (int s = 0; s + 1 < stage; s++) {
    double flops = 0;
    if (!strcmp(stage_name[s], "grouped w13 fwd")) flops = 2.0 * rows * d * 2 * F;
    if (!strcmp(stage_name[s], "grouped w2 fwd")) flops = 2.0 * rows * F * d;
    if (!strcmp(stage_name[s], "grouped w13 bwd")) flops = 4.0 * rows * d * 2 * F;
    if (!strcmp(stage_name[s], "grouped w2 bwd")) flops = 4.0 * rows * F * d;
    if (strstr(stage_name[s], "only")) flops = 2.0 * rows * d * 2 * F;
    if (flops > 0)
      printf("  %-22s %8.3f ms  %6.1f TFLOP/s (%4.1f%% of %.0f)\n", stage_name[s], stage_ms[s],
             flops / stage_ms[s] * 1e-9, flops / stage_ms[s] * 1e-9 / PEAK_TFLOPS * 100, PEAK_TFLOPS);
    else
      printf("  %-22s %8.3f ms\n", stage_name[s], stage_ms[s]);
    if (s <= 6) fwd += stage_ms[s];
    else if (s <= 11) bwd += stage_ms[s];
  }
  double gemm_ms_fwd = stage_ms[4] + stage_ms[5], gemm_ms_bwd = stage_ms[8] + stage_ms[9];
  printf("MoE forward %.3f ms, backward %.3f ms (routed experts only, no SwiGLU, no shared expert)\n", fwd, bwd);
  printf("grouped GEMMs: forward %.1f TFLOP/s, backward %.1f TFLOP/s, together %.1f TFLOP/s = %.1f%% of %.0f peak\n",
         gemm_fwd / gemm_ms_fwd * 1e-9, gemm_bwd / gemm_ms_bwd * 1e-9,
         (gemm_fwd + gemm_bwd) / (gemm_ms_fwd + gemm_ms_bwd) * 1e-9,
         (gemm_fwd + gemm_bwd) / (gemm_ms_fwd + gemm_ms_bwd) * 1e-9 / PEAK_TFLOPS * 100, PEAK_TFLOPS);
  device_free(sorted), device_free(gate_up), device_free(act), device_free(expert_out), device_free(dexpert_out);
  device_free(dact), device_free(dgate_up), device_free(experts), device_free(dexperts);

  if (argc > 2 && !strcmp(argv[2], "moe")) return 0;
  // Fused lm head + cross-entropy.
  const int C = 1024, V = 32000;
  bf16 *h = random_bf16((size_t)N * C, 1.0f), *lm = random_bf16((size_t)V * C, 0.02f);
  bf16 *dh = device_alloc((size_t)N * C * 2);
  float *dlm = device_alloc((size_t)V * C * 4), *losses = device_alloc((size_t)N * 4);
  int *targets_host = malloc(N * sizeof(int)), *targets = device_alloc(N * 4), *argmax = device_alloc(N * 4);
  for (int n = 0; n < N; n++) targets_host[n] = (int)((uniform() + 1.0f) * 0.5f * V) % V;
  device_upload(targets, targets_host, N * sizeof(int));
  const int ce_rows = 4096;  // cross_entropy.cu's row block at V = 32000
  float *ce_logits = device_alloc((size_t)ce_rows * V * 4);
  bf16 *ce_dlogits = random_bf16((size_t)ce_rows * V, 1e-4f);
  for (int s = 0; s < STAGES; s++) stage_ms[s] = 0;
  for (int it = 0; it < warmup + runs; it++) {
    stage = 0;
    mark("CE fwd+bwd");
    lm_head_cross_entropy_cuda(losses, argmax, dh, dlm, h, lm, targets, 1.0f / N, N, C, V);
    mark("CE fwd only");
    lm_head_cross_entropy_cuda(losses, argmax, NULL, NULL, h, lm, targets, 1.0f / N, N, C, V);
    mark("the three GEMMs alone");  // same shapes and row blocks, without the softmax
    for (int r = 0; r < N; r += ce_rows) {
      const int m = N - r < ce_rows ? N - r : ce_rows;
      gemm_cuda(false, true, m, V, C, 1.0f, h + (size_t)r * C, C, 0, lm, C, 0, 0.0f, ce_logits, V, 0, true, 1);
      gemm_cuda(false, false, m, C, V, 1.0f, ce_dlogits, V, 0, lm, C, 0, 0.0f, dh + (size_t)r * C, C, 0, false, 1);
      gemm_cuda(true, false, V, C, m, 1.0f, ce_dlogits, V, 0, h + (size_t)r * C, C, 0, 1.0f, dlm, C, 0, true, 1);
    }
    mark(NULL);
    if (it >= warmup) collect(runs);
  }
  const double ce_flops = 6.0 * N * C * V;
  printf("lm head + CE N=%d C=%d V=%d: fwd+bwd %.3f ms, %.1f TFLOP/s (%.1f%% of %.0f); fwd only %.3f ms, %.1f TFLOP/s\n",
         N, C, V, stage_ms[0], ce_flops / stage_ms[0] * 1e-9, ce_flops / stage_ms[0] * 1e-9 / PEAK_TFLOPS * 100,
         PEAK_TFLOPS, stage_ms[1], ce_flops / 3 / stage_ms[1] * 1e-9);
  printf("  the same three GEMMs alone %.3f ms, %.1f TFLOP/s\n", stage_ms[2], ce_flops / stage_ms[2] * 1e-9);
  return 0;
}
#endif  // KLT_HAVE_CUDA
