// cuBLASLt GEMMs against the CPU GEMM: linear forward/backward and the general batched form,
// at shapes not divisible by any tile size.
#include "kernels/gemm.h"
#include "tests/gpu/gpu_testing.h"

static real *random_bf16(size_t n, uint64_t *rng) {
  real *x = test_alloc(n);
  test_fill_normal(x, n, 1.0, rng);
  gpu_round_bf16(x, n);
  return x;
}

Test(gemm_cuda, linear_forward_backward) {
  const int shapes[][3] = {{37, 65, 129}, {256, 1024, 512}, {1, 7, 3}};
  uint64_t rng = 7;
  for (int s = 0; s < 3; s++) {
    const int N = shapes[s][0], C = shapes[s][1], OC = shapes[s][2];
    real *inp = random_bf16((size_t)N * C, &rng), *w = random_bf16((size_t)OC * C, &rng);
    real *dout = random_bf16((size_t)N * OC, &rng), *dinp0 = random_bf16((size_t)N * C, &rng);
    real *out = test_alloc((size_t)N * OC), *dinp = test_copy(dinp0, (size_t)N * C);
    real *dw = test_alloc((size_t)OC * C);
    test_fill_normal(dw, (size_t)OC * C, 1.0, &rng);
    real *dw0 = test_copy(dw, (size_t)OC * C);
    matmul_forward(out, inp, w, N, C, OC);
    matmul_backward(dinp, dw, dout, inp, w, N, C, OC);

    bf16 *d_inp = gpu_upload_bf16(inp, (size_t)N * C), *d_w = gpu_upload_bf16(w, (size_t)OC * C);
    bf16 *d_dout = gpu_upload_bf16(dout, (size_t)N * OC), *d_dinp = gpu_upload_bf16(dinp0, (size_t)N * C);
    bf16 *d_out = (bf16 *)device_alloc((size_t)N * OC * sizeof(bf16));
    float *d_dw = gpu_upload_float(dw0, (size_t)OC * C);
    matmul_forward_cuda(d_out, d_inp, d_w, N, C, OC);
    matmul_backward_cuda(d_dinp, d_dw, d_dout, d_inp, d_w, N, C, OC, true);
    real *g_out = gpu_download_bf16(d_out, (size_t)N * OC), *g_dinp = gpu_download_bf16(d_dinp, (size_t)N * C);
    real *g_dw = gpu_download_float(d_dw, (size_t)OC * C);
    gpu_expect_close("out", g_out, out, (size_t)N * OC, GPU_TOLERANCE);
    gpu_expect_close("dinp", g_dinp, dinp, (size_t)N * C, GPU_TOLERANCE);
    gpu_expect_close("dweight (fp32)", g_dw, dw, (size_t)OC * C, 1e-4);
    device_free(d_inp), device_free(d_w), device_free(d_dout), device_free(d_dinp), device_free(d_out), device_free(d_dw);
    free(inp), free(w), free(dout), free(dinp0), free(out), free(dinp), free(dw), free(dw0);
    free(g_out), free(g_dinp), free(g_dw);
  }
}

Test(gemm_cuda, batched_transposes) {
  const int M = 33, N = 70, K = 45, batch = 3;
  uint64_t rng = 11;
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      real *A = random_bf16((size_t)batch * M * K, &rng), *B = random_bf16((size_t)batch * K * N, &rng);
      real *C = test_alloc((size_t)batch * M * N);
      int lda = ta ? M : K, ldb = tb ? K : N;
      for (int i = 0; i < batch; i++)
        gemm(ta, tb, M, N, K, 0.5, A + (size_t)i * M * K, lda, B + (size_t)i * K * N, ldb, 0.0, C + (size_t)i * M * N, N);
      bf16 *dA = gpu_upload_bf16(A, (size_t)batch * M * K), *dB = gpu_upload_bf16(B, (size_t)batch * K * N);
      float *dC = (float *)device_alloc((size_t)batch * M * N * sizeof(float));
      gemm_cuda(ta, tb, M, N, K, 0.5f, dA, lda, (long long)M * K, dB, ldb, (long long)K * N, 0.0f, dC, N,
                (long long)M * N, true, batch);
      real *got = gpu_download_float(dC, (size_t)batch * M * N);
      gpu_expect_close(ta ? (tb ? "A^T B^T" : "A^T B") : (tb ? "A B^T" : "A B"), got, C, (size_t)batch * M * N, 1e-5);
      device_free(dA), device_free(dB), device_free(dC);
      free(A), free(B), free(C), free(got);
    }
}
