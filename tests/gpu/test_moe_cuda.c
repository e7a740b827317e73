// The CUDA MoE routing, permutation, grouped expert GEMMs and the fused lm-head cross-entropy
// against the CPU references.
#include <math.h>

#include "kernels/cross_entropy.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "tests/gpu/gpu_testing.h"

static int *upload_ints(const int *x, size_t n) {
  int *d = device_alloc(n * sizeof(int));
  device_upload(d, x, n * sizeof(int));
  return d;
}
static int *download_ints(const int *d, size_t n) {
  int *x = malloc(n * sizeof(int));
  device_download(x, d, n * sizeof(int));
  return x;
}

static void check_routing(int N, int E, int top_k, int C, uint64_t seed) {
  uint64_t rng = seed;
  const size_t ne = (size_t)N * E, nk = (size_t)N * top_k, rows = nk;
  real *logits = test_alloc(ne), *bias = test_alloc(E), *dw = test_alloc(nk);
  test_fill_normal(logits, ne, 2, &rng), test_fill_uniform(bias, E, -0.1, 0.1, &rng), test_fill_normal(dw, nk, 1, &rng);
  for (size_t i = 0; i < ne; i++) logits[i] = (float)logits[i];
  int *index = malloc(nk * sizeof(int));
  real *weight = test_alloc(nk), *scores = test_alloc(ne), *dlogits = test_alloc(ne);
  moe_router_forward(index, weight, scores, logits, bias, N, E, top_k, 2.446);
  moe_router_backward(dlogits, dw, scores, index, N, E, top_k, 2.446);
  float *g_logits = gpu_upload_float(logits, ne), *g_bias = gpu_upload_float(bias, E), *g_dw = gpu_upload_float(dw, nk);
  float *g_weight = device_alloc(nk * 4), *g_scores = device_alloc(ne * 4), *g_dlogits = device_alloc(ne * 4);
  int *g_index = device_alloc(nk * 4);
  moe_router_forward_cuda(g_index, g_weight, g_scores, g_logits, g_bias, N, E, top_k, 2.446f);
  moe_router_backward_cuda(g_dlogits, g_dw, g_scores, g_index, N, E, top_k, 2.446f);
  int *got_index = download_ints(g_index, nk);
  int mismatched = 0;
  for (size_t i = 0; i < nk; i++) mismatched += got_index[i] != index[i];
  cr_expect(mismatched == 0, "router: %d of %zu choices differ", mismatched, nk);
  gpu_expect_close("router weights", gpu_download_float(g_weight, nk), weight, nk, 1e-5);
  gpu_expect_close("router dlogits", gpu_download_float(g_dlogits, ne), dlogits, ne, 1e-4);

  int *counts = malloc(E * 4), *offsets = malloc((E + 1) * 4), *row_of = malloc(nk * 4), *token_of = malloc(nk * 4);
  moe_permute_plan(counts, offsets, row_of, token_of, index, N, E, top_k);
  int *g_counts = device_alloc(E * 4), *g_offsets = device_alloc((E + 1) * 4), *g_row_of = device_alloc(nk * 4);
  int *g_token_of = device_alloc(nk * 4);
  moe_permute_plan_cuda(g_counts, g_offsets, g_row_of, g_token_of, g_index, N, E, top_k);
  int *a = download_ints(g_offsets, E + 1), *b = download_ints(g_row_of, nk), *c = download_ints(g_token_of, nk);
  cr_expect(memcmp(a, offsets, (E + 1) * 4) == 0 && memcmp(b, row_of, nk * 4) == 0 && memcmp(c, token_of, nk * 4) == 0,
            "permute plan differs from the CPU's");

  real *x = test_alloc((size_t)N * C), *dout = test_alloc((size_t)N * C), *shared = test_alloc((size_t)N * C);
  test_fill_normal(x, (size_t)N * C, 1, &rng), test_fill_normal(dout, (size_t)N * C, 1, &rng);
  test_fill_normal(shared, (size_t)N * C, 1, &rng);
  gpu_round_bf16(x, (size_t)N * C), gpu_round_bf16(dout, (size_t)N * C), gpu_round_bf16(shared, (size_t)N * C);
  real *sorted = test_alloc(rows * C), *dx = test_alloc((size_t)N * C);
  moe_permute_forward(sorted, x, token_of, (int)rows, C);
  moe_permute_backward(dx, sorted, token_of, (int)rows, C);  // the sorted rows as their own gradient
  real *combined = test_alloc((size_t)N * C), *dexp = test_alloc(rows * C), *dweight = test_alloc(nk);
  moe_unpermute_forward(combined, sorted, weight, row_of, N, top_k, C);
  for (size_t i = 0; i < (size_t)N * C; i++) combined[i] += shared[i];
  moe_unpermute_backward(dexp, dweight, dout, sorted, weight, row_of, N, top_k, C);
  bf16 *g_x = gpu_upload_bf16(x, (size_t)N * C), *g_sorted = device_alloc(rows * C * 2), *g_dx = device_alloc((size_t)N * C * 2);
  bf16 *g_shared = gpu_upload_bf16(shared, (size_t)N * C), *g_out = device_alloc((size_t)N * C * 2);
  bf16 *g_dout = gpu_upload_bf16(dout, (size_t)N * C), *g_dexp = device_alloc(rows * C * 2);
  float *g_dweight = device_alloc(nk * 4), *g_weight_cpu = gpu_upload_float(weight, nk);
  moe_permute_forward_cuda(g_sorted, g_x, g_token_of, (int)rows, C);
  moe_permute_backward_cuda(g_dx, g_sorted, g_row_of, N, top_k, C, false);
  moe_unpermute_forward_cuda(g_out, g_sorted, g_weight_cpu, g_row_of, g_shared, N, top_k, C);
  moe_unpermute_backward_cuda(g_dexp, g_dweight, g_dout, g_sorted, g_weight_cpu, g_row_of, N, top_k, C);
  gpu_expect_close("permute", gpu_download_bf16(g_sorted, rows * C), sorted, rows * C, 1e-6);
  gpu_expect_close("permute backward", gpu_download_bf16(g_dx, (size_t)N * C), dx, (size_t)N * C, GPU_TOLERANCE);
  gpu_expect_close("unpermute", gpu_download_bf16(g_out, (size_t)N * C), combined, (size_t)N * C, GPU_TOLERANCE);
  gpu_expect_close("unpermute dexpert_out", gpu_download_bf16(g_dexp, rows * C), dexp, rows * C, GPU_TOLERANCE);
  gpu_expect_close("unpermute dweight", gpu_download_float(g_dweight, nk), dweight, nk, 1e-4);

  // Grouped GEMM: expert e's (OC, C) matrix at stride 3 OC C (as [w1; w3; w2] blocks).
  const int OC = 2 * 24;
  const long long stride = 3LL * OC * C;
  real *w = test_alloc((size_t)E * stride), *gout = test_alloc(rows * OC), *gdout = test_alloc(rows * OC);
  test_fill_normal(w, (size_t)E * stride, 0.1, &rng), test_fill_normal(gdout, rows * OC, 1, &rng);
  gpu_round_bf16(w, (size_t)E * stride), gpu_round_bf16(gdout, rows * OC);
  real *gdin = test_alloc(rows * C), *gdw = test_alloc((size_t)E * stride);
  for (int e = 0; e < E; e++) {
    int begin = offsets[e], count = offsets[e + 1] - begin;
    if (!count) continue;
    matmul_forward(gout + (size_t)begin * OC, sorted + (size_t)begin * C, w + e * stride, count, C, OC);
    matmul_backward(gdin + (size_t)begin * C, gdw + e * stride, gdout + (size_t)begin * OC, sorted + (size_t)begin * C,
                    w + e * stride, count, C, OC);
  }
  bf16 *g_w = gpu_upload_bf16(w, (size_t)E * stride), *g_gout = device_alloc(rows * OC * 2);
  bf16 *g_gdout = gpu_upload_bf16(gdout, rows * OC), *g_gdin = device_alloc(rows * C * 2);
  float *g_gdw = device_alloc((size_t)E * stride * 4);
  moe_grouped_matmul_forward_cuda(g_gout, g_sorted, g_w, stride, offsets, E, C, OC);
  moe_grouped_matmul_backward_cuda(g_gdin, g_gdw, g_gdout, g_sorted, g_w, stride, offsets, E, C, OC);
  gpu_expect_close("grouped out", gpu_download_bf16(g_gout, rows * OC), gout, rows * OC, GPU_TOLERANCE);
  gpu_expect_close("grouped dinp", gpu_download_bf16(g_gdin, rows * C), gdin, rows * C, GPU_TOLERANCE);
  gpu_expect_close("grouped dweight", gpu_download_float(g_gdw, (size_t)E * stride), gdw, (size_t)E * stride, 1e-4);
}

Test(moe_cuda, routing_64_experts) { check_routing(300, 64, 8, 96, 1); }
Test(moe_cuda, routing_8_experts_some_empty) { check_routing(5, 8, 2, 40, 2); }

static void check_cross_entropy(int N, int C, int V, uint64_t seed) {
  uint64_t rng = seed;
  real *x = test_alloc((size_t)N * C), *w = test_alloc((size_t)V * C);
  test_fill_normal(x, (size_t)N * C, 1, &rng), test_fill_normal(w, (size_t)V * C, 0.3, &rng);
  gpu_round_bf16(x, (size_t)N * C), gpu_round_bf16(w, (size_t)V * C);
  int *targets = malloc(N * sizeof(int)), *argmax = malloc(N * sizeof(int));
  for (int n = 0; n < N; n++) targets[n] = n % 11 == 3 ? -1 : (int)(test_rand_u64(&rng) % V);
  real *losses = test_alloc(N), *lse = test_alloc(N), *dlosses = test_alloc(N), *dx = test_alloc((size_t)N * C);
  real *dw = test_alloc((size_t)V * C);
  const double weight = 1.0 / N;
  lm_head_cross_entropy_forward(losses, lse, argmax, x, w, targets, N, C, V, 4096);
  for (int n = 0; n < N; n++) dlosses[n] = targets[n] >= 0 ? weight : 0;
  lm_head_cross_entropy_backward(dx, dw, dlosses, x, w, targets, lse, N, C, V, 4096);
  bf16 *g_x = gpu_upload_bf16(x, (size_t)N * C), *g_w = gpu_upload_bf16(w, (size_t)V * C);
  bf16 *g_dx = device_alloc((size_t)N * C * 2);
  float *g_losses = device_alloc(N * 4), *g_dw = device_alloc((size_t)V * C * 4);
  int *g_targets = upload_ints(targets, N), *g_argmax = device_alloc(N * 4);
  lm_head_cross_entropy_cuda(g_losses, g_argmax, g_dx, g_dw, g_x, g_w, g_targets, (float)weight, N, C, V);
  gpu_expect_close("losses", gpu_download_float(g_losses, N), losses, N, 1e-4);
  gpu_expect_close("dx", gpu_download_bf16(g_dx, (size_t)N * C), dx, (size_t)N * C, GPU_TOLERANCE);
  gpu_expect_close("dweight", gpu_download_float(g_dw, (size_t)V * C), dw, (size_t)V * C, GPU_TOLERANCE);
  int *got = download_ints(g_argmax, N), differ = 0;
  for (int n = 0; n < N; n++) differ += got[n] != argmax[n];
  cr_expect(differ <= N / 100, "argmax differs in %d of %d rows", differ, N);  // near-ties may round apart
}

Test(moe_cuda, cross_entropy_small_vocab) { check_cross_entropy(300, 96, 1000, 3); }
Test(moe_cuda, cross_entropy_32k_vocab_several_row_blocks) { check_cross_entropy(2100, 64, 32000, 4); }
