// The CUDA flash attention (document mask, lse, max logit, backward) against the CPU reference.
#include <math.h>

#include "kernels/attention.h"
#include "tests/gpu/gpu_testing.h"

// documents: starts mid-sequence (a one-token document, one on a tile boundary, one near the end);
// null_doc: pass doc_start = NULL to the GPU (one document per row).
static void check_shape(int B, int T, int H, int Dqk, int Dv, bool documents, bool null_doc, uint64_t seed) {
  uint64_t rng = seed;
  const size_t nq = (size_t)B * T * H * Dqk, nv = (size_t)B * T * H * Dv, nr = (size_t)B * T * H;
  real *q = test_alloc(nq), *k = test_alloc(nq), *v = test_alloc(nv), *dout = test_alloc(nv);
  test_fill_normal(q, nq, 1.5, &rng), test_fill_normal(k, nq, 1.5, &rng);
  test_fill_normal(v, nv, 1, &rng), test_fill_normal(dout, nv, 1, &rng);
  gpu_round_bf16(q, nq), gpu_round_bf16(k, nq), gpu_round_bf16(v, nv), gpu_round_bf16(dout, nv);
  unsigned char *doc = calloc((size_t)B * T, 1);
  for (int b = 0; b < B; b++) {
    unsigned char *row = doc + (size_t)b * T;
    row[0] = 1;
    if (documents) {
      row[T / 3] = row[T / 3 + 1] = row[T - 2] = 1;
      if (T > 200) row[128] = 1;
      if (b == 1) row[T / 2 + 3] = 1;  // rows differ
    }
  }
  const real scale = 1 / sqrt((double)Dqk);
  real *out = test_alloc(nv), *lse = test_alloc(nr), *max_logit = test_alloc(H);
  real *dq = test_alloc(nq), *dk = test_alloc(nq), *dv = test_alloc(nv);
  attention_forward(out, lse, max_logit, q, k, v, doc, scale, B, T, H, Dqk, Dv);
  gpu_round_bf16(out, nv);  // the backward reads the forward's bf16 output on the GPU
  attention_backward(dq, dk, dv, dout, q, k, v, out, lse, doc, scale, B, T, H, Dqk, Dv);

  bf16 *g_q = gpu_upload_bf16(q, nq), *g_k = gpu_upload_bf16(k, nq), *g_v = gpu_upload_bf16(v, nv);
  bf16 *g_dout = gpu_upload_bf16(dout, nv), *g_out = device_alloc(nv * 2);
  // dq, dk, dv start as garbage: the backward overwrites them.
  real *junk_q = test_alloc(nq), *junk_v = test_alloc(nv);
  test_fill_normal(junk_q, nq, 3, &rng), test_fill_normal(junk_v, nv, 3, &rng);
  bf16 *g_dq = gpu_upload_bf16(junk_q, nq), *g_dk = gpu_upload_bf16(junk_q, nq), *g_dv = gpu_upload_bf16(junk_v, nv);
  float *g_lse = device_alloc(nr * 4), *g_max = device_alloc(H * 4);
  float lowest[64];
  for (int h = 0; h < H; h++) lowest[h] = -INFINITY;
  device_upload(g_max, lowest, H * 4);
  unsigned char *g_doc = device_alloc((size_t)B * T);
  device_upload(g_doc, doc, (size_t)B * T);
  unsigned char *doc_arg = null_doc ? NULL : g_doc;
  attention_forward_cuda(g_out, g_lse, g_max, g_q, g_k, g_v, doc_arg, (float)scale, B, T, H, Dqk, Dv);
  attention_backward_cuda(g_dq, g_dk, g_dv, g_dout, g_q, g_k, g_v, g_out, g_lse, doc_arg, (float)scale, B, T, H, Dqk,
                          Dv);
  device_synchronize();
  cr_log_info("attention B %d T %d H %d Dqk %d Dv %d documents %d null %d", B, T, H, Dqk, Dv, documents, null_doc);
  real *got_out = gpu_download_bf16(g_out, nv);
  gpu_expect_close("out", got_out, out, nv, GPU_TOLERANCE);
  gpu_expect_close("lse", gpu_download_float(g_lse, nr), lse, nr, 1e-5);
  gpu_expect_close("max logit", gpu_download_float(g_max, H), max_logit, H, 1e-5);
  gpu_expect_close("dq", gpu_download_bf16(g_dq, nq), dq, nq, GPU_TOLERANCE);
  gpu_expect_close("dk", gpu_download_bf16(g_dk, nq), dk, nq, GPU_TOLERANCE);
  gpu_expect_close("dv", gpu_download_bf16(g_dv, nv), dv, nv, GPU_TOLERANCE);

  // max_logit is max-accumulated: a larger previous value stays, a smaller one is replaced.
  float previous[64];
  for (int h = 0; h < H; h++) previous[h] = h % 2 ? (float)max_logit[h] + 1.0f : (float)max_logit[h] - 1.0f;
  device_upload(g_max, previous, H * 4);
  attention_forward_cuda(g_out, g_lse, g_max, g_q, g_k, g_v, doc_arg, (float)scale, B, T, H, Dqk, Dv);
  float combined[64];
  device_download(combined, g_max, H * 4);
  for (int h = 0; h < H; h++) {
    double want = h % 2 ? previous[h] : max_logit[h];
    cr_expect(fabs(combined[h] - want) <= 1e-5 * fabs(want) + 1e-6, "max logit accumulation head %d: %g vs %g", h,
              combined[h], want);
  }
  // The forward is deterministic: a second call gives the same bits.
  real *again = gpu_download_bf16(g_out, nv);
  size_t differ = 0;
  for (size_t i = 0; i < nv; i++) differ += again[i] != got_out[i];
  cr_expect(differ == 0, "out differs between two identical calls at %zu places", differ);

  device_free(g_q), device_free(g_k), device_free(g_v), device_free(g_dout), device_free(g_out);
  device_free(g_dq), device_free(g_dk), device_free(g_dv), device_free(g_lse), device_free(g_max), device_free(g_doc);
  free(doc);
}

Test(attention_cuda, mla_shapes_one_document) { check_shape(2, 100, 3, 192, 128, false, false, 1); }
Test(attention_cuda, mla_shapes_documents) { check_shape(2, 100, 3, 192, 128, true, false, 2); }
Test(attention_cuda, heads_64_one_document) { check_shape(1, 300, 2, 64, 64, false, true, 3); }
Test(attention_cuda, heads_64_documents) { check_shape(1, 300, 2, 64, 64, true, false, 4); }
Test(attention_cuda, mla_partial_tiles_one_document) { check_shape(2, 257, 2, 192, 128, false, true, 5); }
Test(attention_cuda, mla_partial_tiles_documents) { check_shape(2, 257, 2, 192, 128, true, false, 6); }
Test(attention_cuda, other_widths) {
  check_shape(2, 150, 2, 48, 32, true, false, 7);
  check_shape(1, 140, 2, 80, 112, true, false, 8);
  check_shape(1, 90, 1, 256, 256, true, false, 9);
  check_shape(1, 90, 2, 208, 16, false, false, 10);
}
Test(attention_cuda, long_rows_documents) { check_shape(2, 1000, 1, 192, 128, true, false, 11); }
Test(attention_cuda, tiny_rows) { check_shape(3, 3, 2, 192, 128, false, false, 12); }  // T = 1 has dq = dk = 0 exactly
