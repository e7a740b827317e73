// The CUDA MoE routing, permutation and grouped expert GEMMs against the CPU references (fp64).
#include <math.h>

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

// Router forward/backward, the plan, permute forward/backward and unpermute forward/backward.
static void check_routing(int N, int E, int top_k, int C, uint64_t seed) {
  uint64_t rng = seed;
  const size_t ne = (size_t)N * E, nk = (size_t)N * top_k, rows = nk;
  real *logits = test_alloc(ne), *bias = test_alloc(E), *dw = test_alloc(nk);
  test_fill_normal(logits, ne, 2, &rng), test_fill_uniform(bias, E, -0.1, 0.1, &rng), test_fill_normal(dw, nk, 1, &rng);
  for (size_t i = 0; i < ne; i++) logits[i] = (float)logits[i];
  for (int e = 0; e < E; e++) bias[e] = (float)bias[e];
  for (size_t i = 0; i < nk; i++) dw[i] = (float)dw[i];
  int *index = malloc(nk * sizeof(int));
  real *weight = test_alloc(nk), *scores = test_alloc(ne), *dlogits = test_alloc(ne);
  moe_router_forward(index, weight, scores, logits, bias, N, E, top_k, 2.446);
  moe_router_backward(dlogits, dw, scores, index, N, E, top_k, 2.446);
  float *g_logits = gpu_upload_float(logits, ne), *g_bias = gpu_upload_float(bias, E), *g_dw = gpu_upload_float(dw, nk);
  float *g_weight = device_alloc(nk * 4), *g_scores = device_alloc(ne * 4), *g_dlogits = device_alloc(ne * 4);
  int *g_index = device_alloc(nk * 4);
  moe_router_forward_cuda(g_index, g_weight, g_scores, g_logits, g_bias, N, E, top_k, 2.446f);
  // dlogits is overwritten: start it from garbage.
  float *garbage = malloc(ne * 4);
  for (size_t i = 0; i < ne; i++) garbage[i] = 1e3f;
  device_upload(g_dlogits, garbage, ne * 4);
  moe_router_backward_cuda(g_dlogits, g_dw, g_scores, g_index, N, E, top_k, 2.446f);
  int *got_index = download_ints(g_index, nk);
  int mismatched = 0;
  for (size_t i = 0; i < nk; i++) mismatched += got_index[i] != index[i];
  cr_expect(mismatched == 0, "router: %d of %zu choices differ", mismatched, nk);
  gpu_expect_close("router scores", gpu_download_float(g_scores, ne), scores, ne, 1e-6);
  gpu_expect_close("router weights", gpu_download_float(g_weight, nk), weight, nk, 1e-5);
  gpu_expect_close("router dlogits", gpu_download_float(g_dlogits, ne), dlogits, ne, 1e-5);

  int *counts = malloc(E * 4), *offsets = malloc((E + 1) * 4), *row_of = malloc(nk * 4), *token_of = malloc(nk * 4);
  moe_permute_plan(counts, offsets, row_of, token_of, index, N, E, top_k);
  int *g_counts = device_alloc(E * 4), *g_offsets = device_alloc((E + 1) * 4), *g_row_of = device_alloc(nk * 4);
  int *g_token_of = device_alloc(nk * 4);
  int *g_cpu_index = upload_ints(index, nk);  // the plan from the CPU's choices, whatever the router did
  moe_permute_plan_cuda(g_counts, g_offsets, g_row_of, g_token_of, g_cpu_index, N, E, top_k);
  int *a = download_ints(g_offsets, E + 1), *b = download_ints(g_row_of, nk), *c = download_ints(g_token_of, nk);
  int *d = download_ints(g_counts, E);
  cr_expect(memcmp(a, offsets, (E + 1) * 4) == 0, "plan offsets differ from the CPU's");
  cr_expect(memcmp(d, counts, E * 4) == 0, "plan counts differ from the CPU's");
  cr_expect(memcmp(b, row_of, nk * 4) == 0, "plan row_of_assignment differs from the CPU's");
  cr_expect(memcmp(c, token_of, nk * 4) == 0, "plan token_of_row differs from the CPU's");

  real *x = test_alloc((size_t)N * C), *dout = test_alloc((size_t)N * C), *shared = test_alloc((size_t)N * C);
  real *dx0 = test_alloc((size_t)N * C);
  test_fill_normal(x, (size_t)N * C, 1, &rng), test_fill_normal(dout, (size_t)N * C, 1, &rng);
  test_fill_normal(shared, (size_t)N * C, 1, &rng), test_fill_normal(dx0, (size_t)N * C, 1, &rng);
  gpu_round_bf16(x, (size_t)N * C), gpu_round_bf16(dout, (size_t)N * C), gpu_round_bf16(shared, (size_t)N * C);
  gpu_round_bf16(dx0, (size_t)N * C);
  for (size_t i = 0; i < nk; i++) weight[i] = (float)weight[i];
  real *sorted = test_alloc(rows * C), *dx = test_alloc((size_t)N * C), *dx_acc = test_copy(dx0, (size_t)N * C);
  moe_permute_forward(sorted, x, token_of, (int)rows, C);
  moe_permute_backward(dx, sorted, token_of, (int)rows, C);  // the sorted rows as their own gradient
  moe_permute_backward(dx_acc, sorted, token_of, (int)rows, C);
  real *combined = test_alloc((size_t)N * C), *dexp = test_alloc(rows * C), *dweight = test_alloc(nk);
  real *combined_plain = test_alloc((size_t)N * C);
  moe_unpermute_forward(combined, sorted, weight, row_of, N, top_k, C);
  moe_unpermute_forward(combined_plain, sorted, weight, row_of, N, top_k, C);
  for (size_t i = 0; i < (size_t)N * C; i++) combined[i] += shared[i];
  moe_unpermute_backward(dexp, dweight, dout, sorted, weight, row_of, N, top_k, C);
  bf16 *g_x = gpu_upload_bf16(x, (size_t)N * C), *g_sorted = device_alloc(rows * C * 2);
  bf16 *g_dx = gpu_upload_bf16(dx0, (size_t)N * C), *g_dx_acc = gpu_upload_bf16(dx0, (size_t)N * C);
  bf16 *g_shared = gpu_upload_bf16(shared, (size_t)N * C), *g_out = device_alloc((size_t)N * C * 2);
  bf16 *g_out_plain = device_alloc((size_t)N * C * 2);
  bf16 *g_dout = gpu_upload_bf16(dout, (size_t)N * C), *g_dexp = device_alloc(rows * C * 2);
  float *g_dweight = device_alloc(nk * 4), *g_weight_cpu = gpu_upload_float(weight, nk);
  moe_permute_forward_cuda(g_sorted, g_x, g_token_of, (int)rows, C);
  moe_permute_backward_cuda(g_dx, g_sorted, g_row_of, N, top_k, C, false);
  moe_permute_backward_cuda(g_dx_acc, g_sorted, g_row_of, N, top_k, C, true);
  moe_unpermute_forward_cuda(g_out, g_sorted, g_weight_cpu, g_row_of, g_shared, N, top_k, C);
  moe_unpermute_forward_cuda(g_out_plain, g_sorted, g_weight_cpu, g_row_of, NULL, N, top_k, C);
  moe_unpermute_backward_cuda(g_dexp, g_dweight, g_dout, g_sorted, g_weight_cpu, g_row_of, N, top_k, C);
  gpu_expect_close("permute", gpu_download_bf16(g_sorted, rows * C), sorted, rows * C, 1e-12);
  gpu_expect_close("permute backward", gpu_download_bf16(g_dx, (size_t)N * C), dx, (size_t)N * C, GPU_TOLERANCE);
  gpu_expect_close("permute backward +=", gpu_download_bf16(g_dx_acc, (size_t)N * C), dx_acc, (size_t)N * C,
                   GPU_TOLERANCE);
  gpu_expect_close("unpermute + shared", gpu_download_bf16(g_out, (size_t)N * C), combined, (size_t)N * C,
                   GPU_TOLERANCE);
  gpu_expect_close("unpermute", gpu_download_bf16(g_out_plain, (size_t)N * C), combined_plain, (size_t)N * C,
                   GPU_TOLERANCE);
  gpu_expect_close("unpermute dexpert_out", gpu_download_bf16(g_dexp, rows * C), dexp, rows * C, GPU_TOLERANCE);
  gpu_expect_close("unpermute dexpert_weight", gpu_download_float(g_dweight, nk), dweight, nk, 1e-5);
}

Test(moe_cuda, routing_64_experts_top8) { check_routing(300, 64, 8, 96, 1); }
Test(moe_cuda, routing_8_experts_top2) { check_routing(300, 8, 2, 40, 2); }
Test(moe_cuda, routing_odd_width) { check_routing(77, 8, 2, 13, 5); }           // the scalar (unvectorized) path
Test(moe_cuda, routing_many_experts) { check_routing(50, 300, 6, 16, 6); }     // the thread-per-token router

// Grouped GEMMs over uneven expert counts with empty experts: the w13 product (OC = 2F, expert e's
// block at stride 3 F d) and the w2 product (C = F, OC = d, at offset 2 F d in the same blocks).
static void check_grouped(const int *counts, int E, int d, int F, uint64_t seed) {
  uint64_t rng = seed;
  int offsets[65];
  offsets[0] = 0;
  for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
  const size_t rows = (size_t)offsets[E];
  const long long stride = 3LL * F * d;
  real *w = test_alloc((size_t)E * stride), *dw0 = test_alloc((size_t)E * stride);
  test_fill_normal(w, (size_t)E * stride, 0.1, &rng), test_fill_normal(dw0, (size_t)E * stride, 1, &rng);
  gpu_round_bf16(w, (size_t)E * stride);
  for (size_t i = 0; i < (size_t)E * stride; i++) dw0[i] = (float)dw0[i];
  bf16 *g_w = gpu_upload_bf16(w, (size_t)E * stride);
  float *g_dw = gpu_upload_float(dw0, (size_t)E * stride);
  real *dw = test_copy(dw0, (size_t)E * stride);
  for (int pass = 0; pass < 2; pass++) {
    const int C = pass == 0 ? d : F, OC = pass == 0 ? 2 * F : d;
    const long long at = pass == 0 ? 0 : 2LL * F * d;
    real *inp = test_alloc(rows * C), *dout = test_alloc(rows * OC), *out = test_alloc(rows * OC);
    real *dinp = test_alloc(rows * C), *dinp0 = test_alloc(rows * C);
    test_fill_normal(inp, rows * C, 1, &rng), test_fill_normal(dout, rows * OC, 1, &rng);
    test_fill_normal(dinp0, rows * C, 1, &rng);
    gpu_round_bf16(inp, rows * C), gpu_round_bf16(dout, rows * OC);
    for (int e = 0; e < E; e++) {
      int begin = offsets[e], count = counts[e];
      if (!count) continue;
      matmul_forward(out + (size_t)begin * OC, inp + (size_t)begin * C, w + e * stride + at, count, C, OC);
      matmul_backward(dinp + (size_t)begin * C, dw + e * stride + at, dout + (size_t)begin * OC,
                      inp + (size_t)begin * C, w + e * stride + at, count, C, OC);
    }
    bf16 *g_inp = gpu_upload_bf16(inp, rows * C), *g_dout = gpu_upload_bf16(dout, rows * OC);
    bf16 *g_out = device_alloc(rows * OC * 2), *g_dinp = gpu_upload_bf16(dinp0, rows * C);  // dinp overwritten
    moe_grouped_matmul_forward_cuda(g_out, g_inp, g_w + at, stride, offsets, E, C, OC);
    moe_grouped_matmul_backward_cuda(g_dinp, g_dw + at, g_dout, g_inp, g_w + at, stride, offsets, E, C, OC);
    gpu_expect_close(pass ? "grouped w2 out" : "grouped w13 out", gpu_download_bf16(g_out, rows * OC), out,
                     rows * OC, GPU_TOLERANCE);
    gpu_expect_close(pass ? "grouped w2 dinp" : "grouped w13 dinp", gpu_download_bf16(g_dinp, rows * C), dinp,
                     rows * C, GPU_TOLERANCE);
    device_free(g_inp), device_free(g_dout), device_free(g_out), device_free(g_dinp);
  }
  // Both products added into the same blocks; untouched experts keep their gradient exactly.
  real *got = gpu_download_float(g_dw, (size_t)E * stride);
  gpu_expect_close("grouped dweight (+=)", got, dw, (size_t)E * stride, 1e-5);
  for (int e = 0; e < E; e++)
    if (!counts[e])
      cr_expect(test_max_abs_diff(got + e * stride, dw0 + e * stride, stride) == 0, "empty expert %d touched", e);
}

Test(moe_cuda, grouped_gemm_uneven_and_empty_experts) {
  const int counts[8] = {37, 0, 5, 0, 120, 1, 0, 77};
  check_grouped(counts, 8, 64, 48, 11);
}
Test(moe_cuda, grouped_gemm_odd_shapes) {
  const int counts[8] = {0, 3, 130, 0, 0, 17, 2, 0};
  check_grouped(counts, 8, 40, 24, 12);
}
Test(moe_cuda, grouped_gemm_all_empty_but_one) {
  const int counts[8] = {0, 0, 0, 0, 0, 0, 0, 9};
  check_grouped(counts, 8, 32, 16, 13);
}
