// The CUDA KDA against the CPU chunkwise reference (itself checked against the recurrence): decays
// near 0 and strong, documents inside and at chunk boundaries, initial and final states.
#include <math.h>

#include "kernels/kda.h"
#include "kernels/norm.h"
#include "tests/gpu/gpu_testing.h"

static void check_shape(int B, int T, int H, int K, double g_lo, double g_hi, bool states, uint64_t seed) {
  const int V = K;
  uint64_t rng = seed;
  const size_t nk = (size_t)B * T * H * K, nv = (size_t)B * T * H * V, nb = (size_t)B * T * H, ns = (size_t)B * H * K * V;
  real *q = test_alloc(nk), *k = test_alloc(nk), *v = test_alloc(nv), *g = test_alloc(nk), *beta = test_alloc(nb);
  real *dout = test_alloc(nv), *s0 = test_alloc(ns), *dsT = test_alloc(ns), *inv = test_alloc(nb * 1);
  test_fill_normal(q, nk, 1, &rng), test_fill_normal(k, nk, 1, &rng);
  l2norm_forward(q, inv, q, 1e-6, B * T * H, K);
  l2norm_forward(k, inv, k, 1e-6, B * T * H, K);
  test_fill_normal(v, nv, 1, &rng), test_fill_normal(dout, nv, 1, &rng);
  test_fill_uniform(g, nk, g_lo, g_hi, &rng), test_fill_uniform(beta, nb, 0.05, 0.95, &rng);
  test_fill_normal(s0, ns, 0.5, &rng), test_fill_normal(dsT, ns, 0.5, &rng);
  gpu_round_bf16(q, nk), gpu_round_bf16(k, nk), gpu_round_bf16(v, nv), gpu_round_bf16(dout, nv);
  unsigned char *doc = calloc((size_t)B * T, 1);
  for (int b = 0; b < B; b++) {
    doc[(size_t)b * T] = 1;
    if (T > 70) doc[(size_t)b * T + 37] = 1, doc[(size_t)b * T + 64] = 1;
  }
  const real scale = 1 / sqrt((double)K);
  real *out = test_alloc(nv), *sT = test_alloc(ns), *dq = test_alloc(nk), *dk = test_alloc(nk), *dv = test_alloc(nv);
  real *dg = test_alloc(nk), *dbeta = test_alloc(nb), *ds0 = test_alloc(ns);
  kda_chunk_forward(out, sT, q, k, v, g, beta, states ? s0 : NULL, doc, scale, B, T, H, K, V, 64);
  kda_chunk_backward(dq, dk, dv, dg, dbeta, ds0, dout, states ? dsT : NULL, q, k, v, g, beta, states ? s0 : NULL, doc,
                     scale, B, T, H, K, V, 64);

  bf16 *g_q = gpu_upload_bf16(q, nk), *g_k = gpu_upload_bf16(k, nk), *g_v = gpu_upload_bf16(v, nv);
  bf16 *g_dout = gpu_upload_bf16(dout, nv), *g_out = device_alloc(nv * 2);
  bf16 *g_dq = device_alloc(nk * 2), *g_dk = device_alloc(nk * 2), *g_dv = device_alloc(nv * 2);
  float *g_g = gpu_upload_float(g, nk), *g_beta = gpu_upload_float(beta, nb), *g_s0 = gpu_upload_float(s0, ns);
  float *g_dsT = gpu_upload_float(dsT, ns), *g_sT = device_alloc(ns * 4), *g_ds0 = device_alloc(ns * 4);
  float *g_dg = device_alloc(nk * 4), *g_dbeta = device_alloc(nb * 4);
  unsigned char *g_doc = device_alloc((size_t)B * T);
  device_upload(g_doc, doc, (size_t)B * T);
  kda_chunk_forward_cuda(g_out, g_sT, g_q, g_k, g_v, g_g, g_beta, states ? g_s0 : NULL, g_doc, (float)scale, B, T, H,
                         K, V);
  kda_chunk_backward_cuda(g_dq, g_dk, g_dv, g_dg, g_dbeta, g_ds0, g_dout, states ? g_dsT : NULL, g_q, g_k, g_v, g_g,
                          g_beta, states ? g_s0 : NULL, g_doc, (float)scale, B, T, H, K, V);
  cr_log_info("KDA B %d T %d H %d K %d g in [%g, %g] states %d", B, T, H, K, g_lo, g_hi, states);
  gpu_expect_close("out", gpu_download_bf16(g_out, nv), out, nv, GPU_TOLERANCE);
  gpu_expect_close("final state", gpu_download_float(g_sT, ns), sT, ns, GPU_TOLERANCE);
  gpu_expect_close("dq", gpu_download_bf16(g_dq, nk), dq, nk, GPU_TOLERANCE);
  gpu_expect_close("dk", gpu_download_bf16(g_dk, nk), dk, nk, GPU_TOLERANCE);
  gpu_expect_close("dv", gpu_download_bf16(g_dv, nv), dv, nv, GPU_TOLERANCE);
  gpu_expect_close("dg", gpu_download_float(g_dg, nk), dg, nk, GPU_TOLERANCE);
  gpu_expect_close("dbeta", gpu_download_float(g_dbeta, nb), dbeta, nb, GPU_TOLERANCE);
  gpu_expect_close("dinitial state", gpu_download_float(g_ds0, ns), ds0, ns, GPU_TOLERANCE);
}

Test(kda_cuda, documents_and_states_k64) { check_shape(2, 200, 3, 64, -1.0, -0.01, true, 1); }
Test(kda_cuda, head_dim_128) { check_shape(1, 256, 2, 128, -0.5, -0.001, true, 2); }
Test(kda_cuda, decays_near_zero) { check_shape(2, 130, 2, 32, -1e-4, -1e-6, false, 3); }
Test(kda_cuda, strong_decays) { check_shape(1, 150, 2, 64, -8, -2, true, 4); }
