// The fused CUDA lm head + cross-entropy against the CPU reference (fp64, chunked).
#include <math.h>

#include "kernels/cross_entropy.h"
#include "tests/gpu/gpu_testing.h"

static void check_cross_entropy(int N, int C, int V, bool with_gradient, uint64_t seed) {
  uint64_t rng = seed;
  real *x = test_alloc((size_t)N * C), *w = test_alloc((size_t)V * C);
  test_fill_normal(x, (size_t)N * C, 1, &rng), test_fill_normal(w, (size_t)V * C, 0.3, &rng);
  gpu_round_bf16(x, (size_t)N * C), gpu_round_bf16(w, (size_t)V * C);
  int *targets = malloc(N * sizeof(int)), *argmax = malloc(N * sizeof(int));
  for (int n = 0; n < N; n++) targets[n] = n % 11 == 3 ? -1 : (int)(test_rand_u64(&rng) % V);
  targets[0] = V - 1;
  real *losses = test_alloc(N), *lse = test_alloc(N), *dlosses = test_alloc(N), *dx = test_alloc((size_t)N * C);
  real *dw0 = test_alloc((size_t)V * C);
  test_fill_normal(dw0, (size_t)V * C, 0.01, &rng);
  for (size_t i = 0; i < (size_t)V * C; i++) dw0[i] = (float)dw0[i];
  real *dw = test_copy(dw0, (size_t)V * C);
  const double weight = 1.0 / N;
  lm_head_cross_entropy_forward(losses, lse, argmax, x, w, targets, N, C, V, 4096);
  for (int n = 0; n < N; n++) dlosses[n] = targets[n] >= 0 ? (float)weight : 0;
  lm_head_cross_entropy_backward(dx, dw, dlosses, x, w, targets, lse, N, C, V, 4096);
  for (size_t i = 0; i < (size_t)V * C; i++) dw[i] -= dw0[i];  // the gradient alone, for a fair error

  bf16 *g_x = gpu_upload_bf16(x, (size_t)N * C), *g_w = gpu_upload_bf16(w, (size_t)V * C);
  real *garbage = test_alloc((size_t)N * C);
  test_fill_normal(garbage, (size_t)N * C, 5, &rng);
  bf16 *g_dx = gpu_upload_bf16(garbage, (size_t)N * C);  // dx is overwritten
  float *g_losses = device_alloc(N * 4), *g_dw = gpu_upload_float(dw0, (size_t)V * C);
  int *g_targets = device_alloc(N * 4), *g_argmax = device_alloc(N * 4);
  device_upload(g_targets, targets, N * sizeof(int));
  lm_head_cross_entropy_cuda(g_losses, g_argmax, with_gradient ? g_dx : NULL, with_gradient ? g_dw : NULL, g_x, g_w,
                             g_targets, (float)weight, N, C, V);
  gpu_expect_close("losses", gpu_download_float(g_losses, N), losses, N, 1e-4);
  int *got = malloc(N * sizeof(int)), differ = 0;
  device_download(got, g_argmax, N * sizeof(int));
  for (int n = 0; n < N; n++) differ += got[n] != argmax[n];
  cr_expect(differ <= N / 100, "argmax differs in %d of %d rows", differ, N);  // near-ties may round apart
  cr_log_info("argmax differs in %d of %d rows", differ, N);
  real *got_dw = gpu_download_float(g_dw, (size_t)V * C);
  for (size_t i = 0; i < (size_t)V * C; i++) got_dw[i] -= dw0[i];
  if (with_gradient) {
    gpu_expect_close("dx", gpu_download_bf16(g_dx, (size_t)N * C), dx, (size_t)N * C, GPU_TOLERANCE);
    gpu_expect_close("dweight (+=)", got_dw, dw, (size_t)V * C, GPU_TOLERANCE);
  } else {
    cr_expect(test_max_abs_diff(got_dw, test_alloc((size_t)V * C), (size_t)V * C) == 0, "dweight touched");
  }
  // The forward alone, without argmax.
  float *g_losses2 = device_alloc(N * 4);
  lm_head_cross_entropy_cuda(g_losses2, NULL, NULL, NULL, g_x, g_w, g_targets, (float)weight, N, C, V);
  gpu_expect_close("losses (forward only)", gpu_download_float(g_losses2, N), losses, N, 1e-4);
  device_free(g_x), device_free(g_w), device_free(g_dx), device_free(g_losses), device_free(g_dw);
  device_free(g_targets), device_free(g_argmax), device_free(g_losses2);
}

Test(cross_entropy_cuda, vocab_1000) { check_cross_entropy(300, 96, 1000, true, 3); }
Test(cross_entropy_cuda, vocab_32000) { check_cross_entropy(300, 96, 32000, true, 4); }
Test(cross_entropy_cuda, vocab_odd_forward_only) { check_cross_entropy(300, 96, 1001, false, 5); }
Test(cross_entropy_cuda, vocab_odd_with_gradient) { check_cross_entropy(300, 96, 1003, true, 8); }
Test(cross_entropy_cuda, several_row_blocks) { check_cross_entropy(4500, 64, 1000, true, 6); }
