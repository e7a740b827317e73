// The CUDA chunkwise KDA, with its L2 norms, against the CPU chunkwise reference in fp64 (itself checked against
// the recurrence) composed with the CPU norms: head dims 128, 64, 32 (and V != K), decays near 0, strong, steep
// and the model's softplus gate, documents starting inside chunks, at chunk boundaries and at t = 0, T not a
// multiple of 64, initial state and dfinal_state.
#include <math.h>
#include <string.h>

#include "kernels/kda.h"
#include "kernels/norm.h"
#include "tests/gpu/gpu_testing.h"

enum { NO_DOCS, DOCS };
// UNIFORM: g ~ U(g_lo, g_hi) everywhere; SOFTPLUS: the model's gate at initialization, g = -A_h softplus(z),
// z ~ N(0, 1), A_h spread over [g_lo, g_hi] by head (A up to 16: some chunks steep, some mild, channels mixed).
enum GateFill { UNIFORM, SOFTPLUS };

static void check_gates(int B, int T, int H, int K, int V, enum GateFill fill, double g_lo, double g_hi, bool states,
                        int docs, uint64_t seed) {
  uint64_t rng = seed;
  const size_t nk = (size_t)B * T * H * K, nv = (size_t)B * T * H * V, nb = (size_t)B * T * H, ns = (size_t)B * H * K * V;
  real *q = test_alloc(nk), *k = test_alloc(nk), *v = test_alloc(nv), *g = test_alloc(nk), *beta = test_alloc(nb);
  real *dout = test_alloc(nv), *s0 = test_alloc(ns), *dsT = test_alloc(ns);
  real *q_raw = test_alloc(nk), *k_raw = test_alloc(nk), *q_inv = test_alloc(nb), *k_inv = test_alloc(nb);
  // The op L2-normalizes q and k itself: raw rows of norms spread over [0.2, 20] in, the reference normalizes
  // them in fp64 and rounds to bf16 as the op does.
  test_fill_normal(q_raw, nk, 1, &rng), test_fill_normal(k_raw, nk, 1, &rng);
  for (size_t r = 0; r < nb; r++) {
    const double mq = exp(log(0.2 / sqrt((double)K)) + log(100.0) * (double)((r * 7919) % 101) / 100);
    const double mk = exp(log(0.2 / sqrt((double)K)) + log(100.0) * (double)((r * 104729) % 103) / 102);
    for (int c = 0; c < K; c++) q_raw[r * K + c] *= mq, k_raw[r * K + c] *= mk;
  }
  gpu_round_bf16(q_raw, nk), gpu_round_bf16(k_raw, nk);
  l2norm_forward(q, q_inv, q_raw, KDA_L2NORM_EPS, B * T * H, K);
  l2norm_forward(k, k_inv, k_raw, KDA_L2NORM_EPS, B * T * H, K);
  test_fill_normal(v, nv, 1, &rng), test_fill_normal(dout, nv, 1, &rng);
  if (fill == UNIFORM) test_fill_uniform(g, nk, g_lo, g_hi, &rng);
  else {
    test_fill_normal(g, nk, 1, &rng);
    for (size_t e = 0; e < nk; e++) {
      const int h = (int)(e / K % H);
      const double A = g_lo + (g_hi - g_lo) * (H > 1 ? (double)h / (H - 1) : 1.0), z = g[e];
      g[e] = -A * (z > 30 ? z : log1p(exp(z)));
    }
  }
  test_fill_uniform(beta, nb, 0.05, 0.95, &rng);
  test_fill_normal(s0, ns, 0.5, &rng), test_fill_normal(dsT, ns, 0.5, &rng);
  gpu_round_bf16(q, nk), gpu_round_bf16(k, nk), gpu_round_bf16(v, nv), gpu_round_bf16(dout, nv);
  unsigned char *doc = NULL;
  if (docs) {
    doc = calloc((size_t)B * T, 1);
    // Row 0: starts inside a chunk (37), at chunk boundaries (64, 128); row 1: inside (100, 150), boundary 192.
    const int starts[2][3] = {{37, 64, 128}, {100, 150, 192}};
    for (int b = 0; b < B; b++) {
      doc[(size_t)b * T] = 1;
      for (int i = 0; i < 3; i++)
        if (starts[b % 2][i] < T) doc[(size_t)b * T + starts[b % 2][i]] = 1;
    }
  }
  const real scale = 1 / sqrt((double)K);
  real *out = test_alloc(nv), *sT = test_alloc(ns), *dq = test_alloc(nk), *dk = test_alloc(nk), *dv = test_alloc(nv);
  real *dg = test_alloc(nk), *dbeta = test_alloc(nb), *ds0 = test_alloc(ns);
  kda_chunk_forward(out, sT, q, k, v, g, beta, states ? s0 : NULL, doc, scale, B, T, H, K, V, 64);
  kda_chunk_backward(dq, dk, dv, dg, dbeta, ds0, dout, states ? dsT : NULL, q, k, v, g, beta, states ? s0 : NULL, doc,
                     scale, B, T, H, K, V, 64);
  real *dq_raw = test_alloc(nk), *dk_raw = test_alloc(nk);  // through the norms
  l2norm_backward(dq_raw, dq, q_raw, q_inv, B * T * H, K);
  l2norm_backward(dk_raw, dk, k_raw, k_inv, B * T * H, K);

  bf16 *g_q = gpu_upload_bf16(q_raw, nk), *g_k = gpu_upload_bf16(k_raw, nk), *g_v = gpu_upload_bf16(v, nv);
  bf16 *g_dout = gpu_upload_bf16(dout, nv), *g_out = device_alloc(nv * 2);
  bf16 *g_dq = device_alloc(nk * 2), *g_dk = device_alloc(nk * 2), *g_dv = device_alloc(nv * 2);
  float *g_g = gpu_upload_float(g, nk), *g_beta = gpu_upload_float(beta, nb), *g_s0 = gpu_upload_float(s0, ns);
  float *g_dsT = gpu_upload_float(dsT, ns), *g_sT = device_alloc(ns * 4), *g_ds0 = device_alloc(ns * 4);
  float *g_dg = device_alloc(nk * 4), *g_dbeta = device_alloc(nb * 4);
  unsigned char *g_doc = NULL;
  if (doc) {
    g_doc = device_alloc((size_t)B * T);
    device_upload(g_doc, doc, (size_t)B * T);
  }
  // Gradients are overwritten: fill them with garbage first.
  device_copy(g_dg, g_g, nk * 4), device_copy(g_dq, g_q, nk * 2), device_copy(g_dv, g_v, nv * 2);
  // The backward from the forward's saved per-chunk results, and again recomputing them: bitwise the same.
  float *g_saved = device_alloc(kda_chunk_saved_floats(B, T, H, K, V) * 4);
  kda_chunk_forward_cuda(g_out, g_sT, g_q, g_k, g_v, g_g, g_beta, states ? g_s0 : NULL, g_doc, (float)scale, B, T, H,
                         K, V, g_saved);
  kda_chunk_backward_cuda(g_dq, g_dk, g_dv, g_dg, g_dbeta, g_ds0, g_dout, states ? g_dsT : NULL, g_q, g_k, g_v, g_g,
                          g_beta, states ? g_s0 : NULL, g_doc, (float)scale, B, T, H, K, V, NULL);
  real *recomputed_dg = gpu_download_float(g_dg, nk), *recomputed_ds0 = gpu_download_float(g_ds0, ns);
  real *recomputed_dq = gpu_download_bf16(g_dq, nk);
  device_copy(g_dg, g_g, nk * 4), device_copy(g_dq, g_q, nk * 2), device_copy(g_dv, g_v, nv * 2);
  kda_chunk_backward_cuda(g_dq, g_dk, g_dv, g_dg, g_dbeta, g_ds0, g_dout, states ? g_dsT : NULL, g_q, g_k, g_v, g_g,
                          g_beta, states ? g_s0 : NULL, g_doc, (float)scale, B, T, H, K, V, g_saved);
  real *saved_dg = gpu_download_float(g_dg, nk), *saved_ds0 = gpu_download_float(g_ds0, ns);
  real *saved_dq = gpu_download_bf16(g_dq, nk);
  cr_expect(memcmp(saved_dg, recomputed_dg, nk * sizeof(real)) == 0, "dg from the saved forward differs from the recomputed");
  cr_expect(memcmp(saved_ds0, recomputed_ds0, ns * sizeof(real)) == 0, "dinitial state from the saved forward differs");
  cr_expect(memcmp(saved_dq, recomputed_dq, nk * sizeof(real)) == 0, "dq from the saved forward differs");
  free(recomputed_dg), free(recomputed_ds0), free(recomputed_dq), free(saved_dg), free(saved_ds0), free(saved_dq);
  device_free(g_saved);
  cr_log_info("KDA B %d T %d H %d K %d V %d %s [%g, %g] states %d documents %d", B, T, H, K, V,
              fill == UNIFORM ? "g in" : "g = -A softplus(N(0, 1)), A by head in", g_lo, g_hi, states, docs);
  gpu_expect_close("out", gpu_download_bf16(g_out, nv), out, nv, GPU_TOLERANCE);
  gpu_expect_close("final state", gpu_download_float(g_sT, ns), sT, ns, GPU_TOLERANCE);
  gpu_expect_close("dq", gpu_download_bf16(g_dq, nk), dq_raw, nk, GPU_TOLERANCE);
  gpu_expect_close("dk", gpu_download_bf16(g_dk, nk), dk_raw, nk, GPU_TOLERANCE);
  gpu_expect_close("dv", gpu_download_bf16(g_dv, nv), dv, nv, GPU_TOLERANCE);
  gpu_expect_close("dg", gpu_download_float(g_dg, nk), dg, nk, GPU_TOLERANCE);
  gpu_expect_close("dbeta", gpu_download_float(g_dbeta, nb), dbeta, nb, GPU_TOLERANCE);
  gpu_expect_close("dinitial state", gpu_download_float(g_ds0, ns), ds0, ns, GPU_TOLERANCE);
  device_free(g_q), device_free(g_k), device_free(g_v), device_free(g_dout), device_free(g_out), device_free(g_dq);
  device_free(g_dk), device_free(g_dv), device_free(g_g), device_free(g_beta), device_free(g_s0), device_free(g_dsT);
  device_free(g_sT), device_free(g_ds0), device_free(g_dg), device_free(g_dbeta);
  if (g_doc) device_free(g_doc);
  free(doc);
}
static void check_shape(int B, int T, int H, int K, int V, double g_lo, double g_hi, bool states, int docs,
                        uint64_t seed) {
  check_gates(B, T, H, K, V, UNIFORM, g_lo, g_hi, states, docs, seed);
}

Test(kda_cuda, k64_documents_states) { check_shape(2, 200, 3, 64, 64, -1.0, -0.01, true, DOCS, 1); }
Test(kda_cuda, k64_strong_decays) { check_shape(2, 200, 3, 64, 64, -8, -2, true, DOCS, 2); }
Test(kda_cuda, k64_near_zero_decays) { check_shape(2, 200, 3, 64, 64, -1e-4, -1e-6, true, DOCS, 3); }
Test(kda_cuda, k128_near_zero_decays) { check_shape(1, 256, 2, 128, 128, -1e-4, -1e-6, true, DOCS, 4); }
Test(kda_cuda, k128_strong_decays) { check_shape(1, 256, 2, 128, 128, -8, -2, true, DOCS, 5); }
Test(kda_cuda, k128_no_documents) { check_shape(1, 256, 2, 128, 128, -0.5, -0.001, true, NO_DOCS, 6); }
Test(kda_cuda, k32_near_zero_decays) { check_shape(2, 130, 4, 32, 32, -1e-4, -1e-6, false, DOCS, 7); }
Test(kda_cuda, k32_strong_decays) { check_shape(2, 130, 4, 32, 32, -8, -2, true, DOCS, 8); }
Test(kda_cuda, k64_v32) { check_shape(2, 100, 2, 64, 32, -1.0, -0.01, true, DOCS, 9); }
Test(kda_cuda, k48_v80_documents) { check_shape(2, 150, 3, 48, 80, -1.0, -0.01, true, DOCS, 14); }
// K + V = 80, not a multiple of 32: the WY backward's last panel of [k | v] is 16 wide.
Test(kda_cuda, k48_v32_documents) { check_shape(2, 150, 3, 48, 32, -1.0, -0.01, true, DOCS, 20); }
// Very steep decays (-40 to -10 a token): exp(gc_i - gc_j) inside a 16-row sub-chunk no longer splits into two
// fp32 factors at an anchor row, so a kernel that factors it for milder decays must fall back here.
Test(kda_cuda, k128_steep_decays) { check_shape(1, 256, 2, 128, 128, -40, -10, true, DOCS, 15); }
Test(kda_cuda, k48_steep_decays) { check_shape(2, 150, 3, 48, 48, -40, -10, true, DOCS, 16); }
// The model's softplus gate with A from 1 to 16 across heads (as fla and Kimi Linear initialize A_log): the
// intra kernel takes its pair-by-pair path in the steep heads' chunks and the tensor cores in the others.
Test(kda_cuda, k128_softplus_gates) { check_gates(1, 256, 4, 128, 128, SOFTPLUS, 1, 16, true, DOCS, 17); }
Test(kda_cuda, k32_v128_short) { check_shape(1, 40, 2, 32, 128, -0.3, -0.01, true, NO_DOCS, 10); }
// The smallest head dims: one 16-wide channel group in the per-chunk kernels, a single 16-column slice in the WY
// backward's state products and panels, one-warp state blocks (V = 16, 48).
Test(kda_cuda, k16_v16_documents) { check_shape(2, 150, 3, 16, 16, -1.0, -0.01, true, DOCS, 21); }
Test(kda_cuda, k16_v48_strong_decays) { check_shape(2, 150, 3, 16, 48, -8, -2, true, DOCS, 22); }
// Many heads (B * H = 128, 64, 32) at K = V = 128, as in training and the benchmark.
Test(kda_cuda, k128_many_heads_documents) { check_shape(2, 130, 64, 128, 128, -1.0, -0.01, true, DOCS, 11); }
Test(kda_cuda, k128_many_heads_strong_decays) { check_shape(1, 100, 64, 128, 128, -8, -2, true, DOCS, 12); }
Test(kda_cuda, k128_16_heads_near_zero_decays) { check_shape(2, 192, 16, 128, 128, -1e-4, -1e-6, true, NO_DOCS, 13); }
// Long sequences with few (b, h): 130 and 200 chunks, the state carried over many of them (mild decays); the
// cases the segmented schedule of the passes (segments() in kernels/kda_chunk.cu: at least 64 chunks a segment)
// cuts into 2 and 3 (unequal: 66, 67, 67 chunks) segments.
Test(kda_cuda, k128_segments) { check_shape(1, 8300, 2, 128, 128, -1.0, -0.01, true, DOCS, 18); }
Test(kda_cuda, k64_v32_segments) { check_shape(1, 12750, 2, 64, 32, -0.5, -0.001, true, DOCS, 19); }
