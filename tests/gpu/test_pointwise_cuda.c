// The bandwidth-bound CUDA ops (embedding, the norms, the short convolution, the activations and the
// KDA gate) against their CPU references, at round and odd shapes, with documents starting
// mid-sequence. Gradients the CUDA op overwrites start from garbage on the GPU; those it adds to start
// from the same random values on both sides.
#include <string.h>

#include "kernels/activation.h"
#include "kernels/conv.h"
#include "kernels/embedding.h"
#include "kernels/norm.h"
#include "tests/gpu/gpu_testing.h"

// fp32 results (parameter gradients, the residual stream, saved statistics) are held to this.
#define FP32_TOLERANCE 1e-4

static real *random_bf16(size_t n, double std, uint64_t *rng) {
  real *x = test_alloc(n);
  test_fill_normal(x, n, std, rng);
  gpu_round_bf16(x, n);
  return x;
}
static real *random_float(size_t n, double std, uint64_t *rng) {
  real *x = test_alloc(n);
  test_fill_normal(x, n, std, rng);
  for (size_t i = 0; i < n; i++) x[i] = (real)(float)x[i];
  return x;
}
// A device bf16 buffer of n values filled with garbage (the op must overwrite it).
static bf16 *garbage_bf16(size_t n, uint64_t *rng) {
  real *x = random_bf16(n, 100.0, rng);
  bf16 *d = gpu_upload_bf16(x, n);
  free(x);
  return d;
}
static void expect_bf16(const char *what, const bf16 *d, const real *want, size_t n, double tol) {
  real *got = gpu_download_bf16(d, n);
  gpu_expect_close(what, got, want, n, tol);
  free(got);
}
static void expect_float(const char *what, const float *d, const real *want, size_t n, double tol) {
  real *got = gpu_download_float(d, n);
  gpu_expect_close(what, got, want, n, tol);
  free(got);
}

Test(pointwise_cuda, embedding) {
  const int shapes[][3] = {{37, 200, 50}, {1024, 1024, 300}, {5, 8, 3}, {300, 1000, 7}};  // N, C, V
  uint64_t rng = 1;
  for (int s = 0; s < 4; s++) {
    const int N = shapes[s][0], C = shapes[s][1], V = shapes[s][2];
    int *tokens = (int *)malloc(N * sizeof(int));
    for (int i = 0; i < N; i++) tokens[i] = (int)(test_rand_u64(&rng) % (uint64_t)V);
    real *table = random_bf16((size_t)V * C, 1.0, &rng), *dout = random_bf16((size_t)N * C, 1.0, &rng);
    real *dtable = random_float((size_t)V * C, 1.0, &rng), *out = test_alloc((size_t)N * C);
    bf16 *d_table = gpu_upload_bf16(table, (size_t)V * C), *d_dout = gpu_upload_bf16(dout, (size_t)N * C);
    float *d_dtable = gpu_upload_float(dtable, (size_t)V * C);
    bf16 *d_out = garbage_bf16((size_t)N * C, &rng);
    int *d_tokens = (int *)device_alloc(N * sizeof(int));
    device_upload(d_tokens, tokens, N * sizeof(int));
    embedding_forward(out, tokens, table, N, C);
    embedding_backward(dtable, dout, tokens, N, C);
    embedding_forward_cuda(d_out, d_tokens, d_table, N, C);
    embedding_backward_cuda(d_dtable, d_dout, d_tokens, N, C, V);
    expect_bf16("embedding out", d_out, out, (size_t)N * C, 0.0);
    expect_float("embedding dtable", d_dtable, dtable, (size_t)V * C, 1e-6);
    // Deterministic: a second backward from the same start gives the same bits.
    float *d_again = gpu_upload_float(dtable, (size_t)V * C), *d_again2 = gpu_upload_float(dtable, (size_t)V * C);
    embedding_backward_cuda(d_again, d_dout, d_tokens, N, C, V);
    embedding_backward_cuda(d_again2, d_dout, d_tokens, N, C, V);
    real *a = gpu_download_float(d_again, (size_t)V * C), *b = gpu_download_float(d_again2, (size_t)V * C);
    cr_expect(memcmp(a, b, (size_t)V * C * sizeof(real)) == 0, "embedding backward not deterministic");
    free(a), free(b), device_free(d_again), device_free(d_again2);
    device_free(d_table), device_free(d_dout), device_free(d_dtable), device_free(d_out), device_free(d_tokens);
    free(tokens), free(table), free(dout), free(dtable), free(out);
  }
}

// mode 0: delta given, separate output; 1: delta given, in place; 2: delta NULL.
Test(pointwise_cuda, residual_rmsnorm) {
  const int shapes[][2] = {{37, 200},  {256, 1024}, {3, 8},
                           {64, 2048}, {5, 9000},   {3, 12000}};  // 12000: no shared-memory gain sums
  uint64_t rng = 2;
  const float eps = 1e-6f;
  for (int s = 0; s < 6; s++)
    for (int mode = 0; mode < 3; mode++) {
      const int N = shapes[s][0], C = shapes[s][1];
      const size_t n = (size_t)N * C;
      real *residual = random_float(n, 1.0, &rng), *delta = random_bf16(n, 0.5, &rng);
      real *weight = random_float(C, 1.0, &rng), *dout = random_bf16(n, 1.0, &rng);
      real *dres = random_float(n, 1.0, &rng), *dweight = random_float(C, 1.0, &rng);
      real *x = test_alloc(n), *out = test_alloc(n), *rstd = test_alloc(N);
      for (size_t i = 0; i < n; i++) x[i] = (real)(float)(residual[i] + (mode == 2 ? 0 : delta[i]));
      rmsnorm_forward(out, rstd, x, weight, eps, N, C);
      real *dres_cpu = test_copy(dres, n), *dweight_cpu = test_copy(dweight, C);
      rmsnorm_backward(dres_cpu, dweight_cpu, dout, x, weight, rstd, N, C);

      float *d_res = gpu_upload_float(residual, n), *d_w = gpu_upload_float(weight, C);
      bf16 *d_delta = mode == 2 ? NULL : gpu_upload_bf16(delta, n), *d_out = garbage_bf16(n, &rng);
      float *d_res_out = mode == 1 ? d_res : (float *)device_alloc(n * sizeof(float));
      float *d_rstd = (float *)device_alloc(N * sizeof(float));
      residual_rmsnorm_forward_cuda(d_res_out, d_out, d_rstd, d_res, d_delta, d_w, eps, N, C);
      expect_float("residual_out", d_res_out, x, n, 1e-7);
      expect_bf16("rmsnorm out", d_out, out, n, GPU_TOLERANCE);
      expect_float("rstd", d_rstd, rstd, N, 1e-5);
      bf16 *d_dout = gpu_upload_bf16(dout, n);
      float *d_dres = gpu_upload_float(dres, n), *d_dw = gpu_upload_float(dweight, C);
      residual_rmsnorm_backward_cuda(d_dres, d_dw, d_dout, d_res_out, d_w, d_rstd, N, C);
      expect_float("dresidual", d_dres, dres_cpu, n, FP32_TOLERANCE);
      expect_float("dweight", d_dw, dweight_cpu, C, FP32_TOLERANCE);
      device_free(d_res), device_free(d_w), device_free(d_delta), device_free(d_out), device_free(d_rstd);
      if (mode != 1) device_free(d_res_out);
      device_free(d_dout), device_free(d_dres), device_free(d_dw);
      free(residual), free(delta), free(weight), free(dout), free(dres), free(dweight), free(x), free(out);
      free(rstd), free(dres_cpu), free(dweight_cpu);
    }
}

Test(pointwise_cuda, rmsnorm_bf16) {
  const int shapes[][2] = {{37, 200}, {256, 512}, {7, 1024}, {2, 13}};
  uint64_t rng = 3;
  const float eps = 1e-6f;
  for (int s = 0; s < 4; s++) {
    const int N = shapes[s][0], C = shapes[s][1];
    const size_t n = (size_t)N * C;
    real *inp = random_bf16(n, 2.0, &rng), *weight = random_float(C, 1.0, &rng), *dout = random_bf16(n, 1.0, &rng);
    real *dweight = random_float(C, 1.0, &rng), *out = test_alloc(n), *rstd = test_alloc(N), *dinp = test_alloc(n);
    real *dweight_cpu = test_copy(dweight, C);
    rmsnorm_forward(out, rstd, inp, weight, eps, N, C);
    rmsnorm_backward(dinp, dweight_cpu, dout, inp, weight, rstd, N, C);
    bf16 *d_inp = gpu_upload_bf16(inp, n), *d_dout = gpu_upload_bf16(dout, n);
    bf16 *d_out = garbage_bf16(n, &rng), *d_dinp = garbage_bf16(n, &rng);
    float *d_w = gpu_upload_float(weight, C), *d_dw = gpu_upload_float(dweight, C);
    float *d_rstd = (float *)device_alloc(N * sizeof(float));
    rmsnorm_forward_cuda(d_out, d_rstd, d_inp, d_w, eps, N, C);
    rmsnorm_backward_cuda(d_dinp, d_dw, d_dout, d_inp, d_w, d_rstd, N, C);
    expect_bf16("rmsnorm out", d_out, out, n, GPU_TOLERANCE);
    expect_float("rstd", d_rstd, rstd, N, 1e-5);
    expect_bf16("dinp", d_dinp, dinp, n, GPU_TOLERANCE);
    expect_float("dweight", d_dw, dweight_cpu, C, FP32_TOLERANCE);
    device_free(d_inp), device_free(d_dout), device_free(d_out), device_free(d_dinp), device_free(d_w);
    device_free(d_dw), device_free(d_rstd);
    free(inp), free(weight), free(dout), free(dweight), free(out), free(rstd), free(dinp), free(dweight_cpu);
  }
}

Test(pointwise_cuda, gated_rmsnorm) {
  const int shapes[][3] = {{37, 8, 128}, {256, 8, 128}, {5, 3, 72}, {4, 2, 13}};
  uint64_t rng = 4;
  const float eps = 1e-5f;
  for (int s = 0; s < 4; s++) {
    const int N = shapes[s][0], H = shapes[s][1], D = shapes[s][2];
    const size_t n = (size_t)N * H * D, rows = (size_t)N * H;
    real *o = random_bf16(n, 1.0, &rng), *gate = random_bf16(n, 2.0, &rng), *weight = random_float(D, 1.0, &rng);
    real *dout = random_bf16(n, 1.0, &rng), *dweight = random_float(D, 1.0, &rng);
    real *out = test_alloc(n), *rstd = test_alloc(rows), *do_ = test_alloc(n), *dgate = test_alloc(n);
    real *dweight_cpu = test_copy(dweight, D);
    gated_rmsnorm_forward(out, rstd, o, gate, weight, eps, N, H, D);
    gated_rmsnorm_backward(do_, dgate, dweight_cpu, dout, o, gate, weight, rstd, N, H, D);
    bf16 *d_o = gpu_upload_bf16(o, n), *d_gate = gpu_upload_bf16(gate, n), *d_dout = gpu_upload_bf16(dout, n);
    bf16 *d_out = garbage_bf16(n, &rng), *d_do = garbage_bf16(n, &rng), *d_dgate = garbage_bf16(n, &rng);
    float *d_w = gpu_upload_float(weight, D), *d_dw = gpu_upload_float(dweight, D);
    float *d_rstd = (float *)device_alloc(rows * sizeof(float));
    gated_rmsnorm_forward_cuda(d_out, d_rstd, d_o, d_gate, d_w, eps, N, H, D);
    gated_rmsnorm_backward_cuda(d_do, d_dgate, d_dw, d_dout, d_o, d_gate, d_w, d_rstd, N, H, D);
    expect_bf16("gated out", d_out, out, n, GPU_TOLERANCE);
    expect_float("gated rstd", d_rstd, rstd, rows, 1e-5);
    expect_bf16("gated do", d_do, do_, n, GPU_TOLERANCE);
    expect_bf16("gated dgate", d_dgate, dgate, n, GPU_TOLERANCE);
    expect_float("gated dweight", d_dw, dweight_cpu, D, FP32_TOLERANCE);
    device_free(d_o), device_free(d_gate), device_free(d_dout), device_free(d_out), device_free(d_do);
    device_free(d_dgate), device_free(d_w), device_free(d_dw), device_free(d_rstd);
    free(o), free(gate), free(weight), free(dout), free(dweight), free(out), free(rstd), free(do_), free(dgate);
    free(dweight_cpu);
  }
}

Test(pointwise_cuda, short_conv_silu) {
  const int shapes[][4] = {{2, 70, 200, 4}, {2, 256, 1024, 4}, {3, 37, 9, 3}, {1, 5, 16, 4}};  // B, T, C, W
  uint64_t rng = 6;
  for (int s = 0; s < 4; s++)
    for (int docs = 0; docs < 2; docs++) {
      const int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2], W = shapes[s][3];
      const size_t n = (size_t)B * T * C;
      unsigned char *doc_start = NULL;
      if (docs) {  // starts mid-sequence, some closer together than the window
        doc_start = (unsigned char *)calloc((size_t)B * T, 1);
        for (int b = 0; b < B; b++) {
          doc_start[(size_t)b * T] = 1;
          for (int t = 1; t < T; t++) doc_start[(size_t)b * T + t] = test_rand_u64(&rng) % 9 == 0;
        }
        if (T > 3) doc_start[2] = 1, doc_start[3] = 1;
      }
      real *x = random_bf16(n, 1.0, &rng), *weight = random_float((size_t)C * W, 0.5, &rng);
      real *dout = random_bf16(n, 1.0, &rng), *dweight = random_float((size_t)C * W, 1.0, &rng);
      real *out = test_alloc(n), *pre = test_alloc(n), *dx = test_alloc(n),
           *dweight_cpu = test_copy(dweight, (size_t)C * W);
      short_conv_silu_forward(out, pre, x, weight, doc_start, B, T, C, W);
      short_conv_silu_backward(dx, dweight_cpu, dout, x, weight, pre, doc_start, B, T, C, W);
      bf16 *d_x = gpu_upload_bf16(x, n), *d_dout = gpu_upload_bf16(dout, n);
      bf16 *d_out = garbage_bf16(n, &rng), *d_dx = garbage_bf16(n, &rng);
      float *d_w = gpu_upload_float(weight, (size_t)C * W), *d_dw = gpu_upload_float(dweight, (size_t)C * W);
      unsigned char *d_doc = NULL;
      if (docs) {
        d_doc = (unsigned char *)device_alloc((size_t)B * T);
        device_upload(d_doc, doc_start, (size_t)B * T);
      }
      short_conv_silu_forward_cuda(d_out, d_x, d_w, d_doc, B, T, C, W);
      short_conv_silu_backward_cuda(d_dx, d_dw, d_dout, d_x, d_w, d_doc, B, T, C, W);
      expect_bf16("conv out", d_out, out, n, GPU_TOLERANCE);
      expect_bf16("conv dx", d_dx, dx, n, GPU_TOLERANCE);
      expect_float("conv dweight", d_dw, dweight_cpu, (size_t)C * W, FP32_TOLERANCE);
      device_free(d_x), device_free(d_dout), device_free(d_out), device_free(d_dx), device_free(d_w);
      device_free(d_dw), device_free(d_doc);
      free(doc_start), free(x), free(weight), free(dout), free(dweight), free(out), free(pre), free(dx);
      free(dweight_cpu);
    }
}

Test(pointwise_cuda, sigmoid) {
  const size_t sizes[] = {1001, 1 << 16, 3};
  uint64_t rng = 7;
  for (int s = 0; s < 3; s++) {
    const size_t n = sizes[s];
    real *x = random_bf16(n, 3.0, &rng), *dout = random_float(n, 1.0, &rng);
    real *out = test_alloc(n), *dx = test_alloc(n);
    sigmoid_forward(out, x, n);
    for (size_t i = 0; i < n; i++) out[i] = (real)(float)out[i];  // the GPU backward reads the fp32 out
    sigmoid_backward(dx, dout, out, n);
    bf16 *d_x = gpu_upload_bf16(x, n), *d_dx = garbage_bf16(n, &rng);
    float *d_out = (float *)device_alloc(n * sizeof(float)), *d_dout = gpu_upload_float(dout, n);
    sigmoid_forward_cuda(d_out, d_x, n);
    sigmoid_backward_cuda(d_dx, d_dout, d_out, n);
    expect_float("sigmoid out", d_out, out, n, 1e-6);
    expect_bf16("sigmoid dx", d_dx, dx, n, GPU_TOLERANCE);
    device_free(d_x), device_free(d_dx), device_free(d_out), device_free(d_dout);
    free(x), free(dout), free(out), free(dx);
  }
}

Test(pointwise_cuda, swiglu) {
  const int shapes[][2] = {{37, 200}, {256, 1024}, {3, 13}, {64, 1408}};  // N, F
  uint64_t rng = 8;
  for (int s = 0; s < 4; s++) {
    const int N = shapes[s][0], F = shapes[s][1];
    const size_t n = (size_t)N * F;
    real *gu = random_bf16(2 * n, 2.0, &rng), *dout = random_bf16(n, 1.0, &rng);
    real *gate = test_alloc(n), *up = test_alloc(n), *out = test_alloc(n), *dgate = test_alloc(n), *dup = test_alloc(n);
    for (int r = 0; r < N; r++)
      for (int i = 0; i < F; i++) {
        gate[(size_t)r * F + i] = gu[(size_t)r * 2 * F + i];
        up[(size_t)r * F + i] = gu[(size_t)r * 2 * F + F + i];
      }
    swiglu_forward(out, gate, up, n);
    swiglu_backward(dgate, dup, dout, gate, up, n);
    real *dgu = test_alloc(2 * n);
    for (int r = 0; r < N; r++)
      for (int i = 0; i < F; i++) {
        dgu[(size_t)r * 2 * F + i] = dgate[(size_t)r * F + i];
        dgu[(size_t)r * 2 * F + F + i] = dup[(size_t)r * F + i];
      }
    bf16 *d_gu = gpu_upload_bf16(gu, 2 * n), *d_dout = gpu_upload_bf16(dout, n);
    bf16 *d_out = garbage_bf16(n, &rng), *d_dgu = garbage_bf16(2 * n, &rng);
    swiglu_forward_cuda(d_out, d_gu, N, F);
    swiglu_backward_cuda(d_dgu, d_dout, d_gu, N, F);
    expect_bf16("swiglu out", d_out, out, n, GPU_TOLERANCE);
    expect_bf16("swiglu dgate_up", d_dgu, dgu, 2 * n, GPU_TOLERANCE);
    device_free(d_gu), device_free(d_dout), device_free(d_out), device_free(d_dgu);
    free(gu), free(dout), free(gate), free(up), free(out), free(dgate), free(dup), free(dgu);
  }
}

Test(pointwise_cuda, kda_gate) {
  const int shapes[][3] = {{37, 4, 128}, {300, 8, 128}, {5, 3, 7}};  // N, H, K
  uint64_t rng = 9;
  for (int s = 0; s < 3; s++)
    for (int form = 0; form < 2; form++) {
      const int N = shapes[s][0], H = shapes[s][1], K = shapes[s][2];
      const size_t n = (size_t)N * H * K;
      const float lower_bound = -5.0f;
      KdaGateForm gate_form = form ? KDA_GATE_BOUNDED : KDA_GATE_SOFTPLUS;
      real *f = random_bf16(n, 2.0, &rng), *A_log = random_float(H, 1.0, &rng);
      real *dt_bias = random_float((size_t)H * K, 1.0, &rng), *dg = random_float(n, 1.0, &rng);
      real *dA = random_float(H, 1.0, &rng), *ddt = random_float((size_t)H * K, 1.0, &rng);
      real *g = test_alloc(n), *df = test_alloc(n), *dA_cpu = test_copy(dA, H),
           *ddt_cpu = test_copy(ddt, (size_t)H * K);
      kda_gate_forward(g, f, A_log, dt_bias, gate_form, lower_bound, N, H, K);
      kda_gate_backward(df, dA_cpu, ddt_cpu, dg, f, A_log, dt_bias, gate_form, lower_bound, N, H, K);
      bf16 *d_f = gpu_upload_bf16(f, n), *d_df = garbage_bf16(n, &rng);
      float *d_A = gpu_upload_float(A_log, H), *d_dt = gpu_upload_float(dt_bias, (size_t)H * K);
      float *d_dg = gpu_upload_float(dg, n), *d_dA = gpu_upload_float(dA, H),
            *d_ddt = gpu_upload_float(ddt, (size_t)H * K);
      float *d_g = (float *)device_alloc(n * sizeof(float));
      kda_gate_forward_cuda(d_g, d_f, d_A, d_dt, gate_form, lower_bound, N, H, K);
      kda_gate_backward_cuda(d_df, d_dA, d_ddt, d_dg, d_f, d_A, d_dt, gate_form, lower_bound, N, H, K);
      expect_float(form ? "g (bounded)" : "g (softplus)", d_g, g, n, 1e-5);
      expect_bf16("df", d_df, df, n, GPU_TOLERANCE);
      expect_float("dA_log", d_dA, dA_cpu, H, FP32_TOLERANCE);
      expect_float("ddt_bias", d_ddt, ddt_cpu, (size_t)H * K, FP32_TOLERANCE);
      device_free(d_f), device_free(d_df), device_free(d_A), device_free(d_dt), device_free(d_dg);
      device_free(d_dA), device_free(d_ddt), device_free(d_g);
      free(f), free(A_log), free(dt_bias), free(dg), free(dA), free(ddt), free(g), free(df), free(dA_cpu);
      free(ddt_cpu);
    }
}
