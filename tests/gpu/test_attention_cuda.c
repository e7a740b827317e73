// The CUDA attention (query blocks, document mask, max logit) against the CPU reference.
#include <math.h>

#include "kernels/attention.h"
#include "tests/gpu/gpu_testing.h"

static void check_shape(int B, int T, int H, int Dqk, int Dv, bool documents, uint64_t seed) {
  uint64_t rng = seed;
  const size_t nq = (size_t)B * T * H * Dqk, nv = (size_t)B * T * H * Dv, nr = (size_t)B * T * H;
  real *q = test_alloc(nq), *k = test_alloc(nq), *v = test_alloc(nv), *dout = test_alloc(nv);
  test_fill_normal(q, nq, 1.5, &rng), test_fill_normal(k, nq, 1.5, &rng);
  test_fill_normal(v, nv, 1, &rng), test_fill_normal(dout, nv, 1, &rng);
  gpu_round_bf16(q, nq), gpu_round_bf16(k, nq), gpu_round_bf16(v, nv), gpu_round_bf16(dout, nv);
  unsigned char *doc = calloc((size_t)B * T, 1);
  for (int b = 0; b < B; b++) {
    doc[(size_t)b * T] = 1;
    if (documents) doc[(size_t)b * T + T / 3] = 1, doc[(size_t)b * T + T / 3 + 1] = 1, doc[(size_t)b * T + T - 2] = 1;
  }
  const real scale = 1 / sqrt((double)Dqk);
  real *out = test_alloc(nv), *lse = test_alloc(nr), *max_logit = test_alloc(H);
  real *dq = test_alloc(nq), *dk = test_alloc(nq), *dv = test_alloc(nv);
  attention_forward(out, lse, max_logit, q, k, v, doc, scale, B, T, H, Dqk, Dv);
  gpu_round_bf16(out, nv);  // the backward reads the forward's bf16 output on the GPU
  attention_backward(dq, dk, dv, dout, q, k, v, out, lse, doc, scale, B, T, H, Dqk, Dv);

  bf16 *g_q = gpu_upload_bf16(q, nq), *g_k = gpu_upload_bf16(k, nq), *g_v = gpu_upload_bf16(v, nv);
  bf16 *g_dout = gpu_upload_bf16(dout, nv), *g_out = device_alloc(nv * 2);
  bf16 *g_dq = device_alloc(nq * 2), *g_dk = device_alloc(nq * 2), *g_dv = device_alloc(nv * 2);
  float *g_lse = device_alloc(nr * 4), *g_max = device_alloc(H * 4);
  float lowest[64];
  for (int h = 0; h < H; h++) lowest[h] = -INFINITY;
  device_upload(g_max, lowest, H * 4);
  unsigned char *g_doc = device_alloc((size_t)B * T);
  device_upload(g_doc, doc, (size_t)B * T);
  attention_forward_cuda(g_out, g_lse, g_max, g_q, g_k, g_v, g_doc, (float)scale, B, T, H, Dqk, Dv);
  attention_backward_cuda(g_dq, g_dk, g_dv, g_dout, g_q, g_k, g_v, g_out, g_lse, g_doc, (float)scale, B, T, H, Dqk, Dv);
  cr_log_info("attention B %d T %d H %d Dqk %d Dv %d documents %d", B, T, H, Dqk, Dv, documents);
  gpu_expect_close("out", gpu_download_bf16(g_out, nv), out, nv, GPU_TOLERANCE);
  gpu_expect_close("lse", gpu_download_float(g_lse, nr), lse, nr, 1e-4);
  gpu_expect_close("max logit", gpu_download_float(g_max, H), max_logit, H, 1e-4);
  gpu_expect_close("dq", gpu_download_bf16(g_dq, nq), dq, nq, GPU_TOLERANCE);
  gpu_expect_close("dk", gpu_download_bf16(g_dk, nq), dk, nq, GPU_TOLERANCE);
  gpu_expect_close("dv", gpu_download_bf16(g_dv, nv), dv, nv, GPU_TOLERANCE);
}

Test(attention_cuda, mla_shapes) { check_shape(2, 100, 3, 192, 128, true, 1); }
Test(attention_cuda, beyond_one_query_block) { check_shape(2, 700, 2, 192, 128, true, 2); }
Test(attention_cuda, small_heads_one_document) { check_shape(1, 300, 2, 48, 32, false, 3); }
