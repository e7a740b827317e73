// The CUDA optimizer updates against the CPU ones: AdamW, Muon (one matrix, tall and wide, and a
// strided batch), the gradient norm and QK-Clip.
#include <math.h>

#include "optim/adamw.h"
#include "optim/grad_norm.h"
#include "optim/muon.h"
#include "optim/qk_clip.h"
#include "tests/gpu/gpu_testing.h"

Test(optim_cuda, adamw_three_steps) {
  const size_t n = 10007;
  uint64_t rng = 1;
  real *w = test_alloc(n), *m = test_alloc(n), *v = test_alloc(n), *g = test_alloc(n);
  test_fill_normal(w, n, 1, &rng);
  float *dw = gpu_upload_float(w, n), *dm = device_alloc(n * 4), *dv = device_alloc(n * 4), *dg = device_alloc(n * 4);
  AdamWConfig c = adamw_config_default();
  for (long step = 1; step <= 3; step++) {
    test_fill_normal(g, n, 1, &rng);
    real *scaled = test_copy(g, n);
    for (size_t i = 0; i < n; i++) scaled[i] *= 0.5;
    adamw_step(w, m, v, scaled, n, &c, 1e-2, step);
    float *staging = malloc(n * 4);
    for (size_t i = 0; i < n; i++) staging[i] = (float)g[i];
    device_upload(dg, staging, n * 4);
    adamw_step_cuda(dw, dm, dv, dg, n, &c, 1e-2f, step, 0.5f);
  }
  gpu_expect_close("adamw weights", gpu_download_float(dw, n), w, n, 1e-5);
  gpu_expect_close("adamw second moment", gpu_download_float(dv, n), v, n, 1e-5);
}

static void check_muon(int rows, int cols, int batch, long long stride, uint64_t seed) {
  uint64_t rng = seed;
  const size_t span = (size_t)stride * (batch - 1) + (size_t)rows * cols;
  real *w = test_alloc(span), *mom = test_alloc(span), *g = test_alloc(span);
  test_fill_normal(w, span, 0.1, &rng), test_fill_normal(mom, span, 0.01, &rng), test_fill_normal(g, span, 0.01, &rng);
  real *w0 = test_copy(w, span);
  float *dw = gpu_upload_float(w, span), *dm = gpu_upload_float(mom, span), *dg = gpu_upload_float(g, span);
  MuonConfig c = muon_config_default();
  real *scratch = test_alloc(muon_scratch_elements(rows, cols));
  for (int b = 0; b < batch; b++)
    muon_step(w + b * stride, mom + b * stride, g + b * stride, rows, cols, &c, 0.02, scratch);
  muon_step_cuda(dw, dm, dg, rows, cols, stride, batch, &c, 0.02f, 1.0f);
  real *got = gpu_download_float(dw, span);
  // Compare the updates (w - w0): bf16 Newton-Schulz against the fp64 one.
  real *want_update = test_alloc(span), *got_update = test_alloc(span);
  for (size_t i = 0; i < span; i++) want_update[i] = w[i] - w0[i], got_update[i] = got[i] - w0[i];
  cr_log_info("Muon (%d, %d) x %d", rows, cols, batch);
  gpu_expect_close("muon update", got_update, want_update, span, 3e-2);
  gpu_expect_close("muon momentum", gpu_download_float(dm, span), mom, span, 1e-5);
}

Test(optim_cuda, muon_wide) { check_muon(64, 200, 1, 0, 1); }
Test(optim_cuda, muon_tall) { check_muon(300, 96, 1, 0, 2); }
Test(optim_cuda, muon_strided_batch) { check_muon(128, 64, 4, 3 * 128 * 64, 3); }

Test(optim_cuda, grad_norm_and_qk_clip) {
  const size_t n = 1000003;
  uint64_t rng = 4;
  real *g = test_alloc(n);
  test_fill_normal(g, n, 1, &rng);
  for (size_t i = 0; i < n; i++) g[i] = (float)g[i];
  float *dg = gpu_upload_float(g, n);
  double *result = device_alloc(sizeof(double)), got = 0;
  grad_norm_squared_cuda(result, dg, n, false);
  grad_norm_squared_cuda(result, dg, n, true);
  device_download(&got, result, sizeof got);
  double want = 2 * grad_norm_squared(g, n);
  cr_expect(fabs(got - want) <= 1e-9 * want, "grad norm squared %.12g vs %.12g", got, want);

  const int H = 3, Dn = 8, Dr = 4, Dv = 6, C = 20, L = 10;
  size_t nq = (size_t)H * (Dn + Dr) * C, nkv = (size_t)H * (Dn + Dv) * L;
  real *q = test_alloc(nq), *kv = test_alloc(nkv), max_logit[3] = {150, 80, 400};
  test_fill_normal(q, nq, 1, &rng), test_fill_normal(kv, nkv, 1, &rng);
  float *dq = gpu_upload_float(q, nq), *dkv = gpu_upload_float(kv, nkv), host_max[3] = {150, 80, 400};
  int clipped = qk_clip_apply(q, kv, max_logit, 100, H, Dn, Dr, Dv, C, L);
  int clipped_gpu = qk_clip_apply_cuda(dq, dkv, host_max, 100, H, Dn, Dr, Dv, C, L);
  cr_expect_eq(clipped, clipped_gpu);
  gpu_expect_close("qk-clip q_proj", gpu_download_float(dq, nq), q, nq, 1e-6);
  gpu_expect_close("qk-clip kv_b_proj", gpu_download_float(dkv, nkv), kv, nkv, 1e-6);
}
