// The optimizer updates on the GPU against the CPU functions (fp64 test build) on random data:
// AdamW over three steps, Muon (wide, tall, and a batch of matrices at a stride with gaps between
// them), the deterministic gradient norm, QK-Clip. Also logs the time of Muon at two realistic
// shapes, and of AdamW and the gradient norm over 64M elements (cudaEvent on the op stream).
#include <math.h>
#include <string.h>

#include "optim/adamw.h"
#include "optim/grad_norm.h"
#include "optim/muon.h"
#include "optim/qk_clip.h"
#include "tests/gpu/gpu_testing.h"

// Random values that fp32 holds exactly, so CPU and GPU start from the same numbers.
static real *random_float(size_t n, double std, uint64_t *rng) {
  real *x = test_alloc(n);
  test_fill_normal(x, n, std, rng);
  for (size_t i = 0; i < n; i++) x[i] = (real)(float)x[i];
  return x;
}

// The bf16 copy an update writes is exactly the new fp32 weight rounded to bf16.
static void expect_bf16_copy(const char *what, const bf16 *d_copy, const real *weights, size_t n) {
  real *copy = gpu_download_bf16(d_copy, n), *rounded = test_copy(weights, n);
  gpu_round_bf16(rounded, n);
  size_t differ = 0;
  for (size_t i = 0; i < n; i++) differ += copy[i] != rounded[i];
  cr_expect(differ == 0, "%s: %zu of %zu bf16 weights are not the rounded fp32 weights", what, differ, n);
  free(copy), free(rounded);
}

Test(optim_cuda, adamw_three_steps) {
  const size_t n = 100003;
  const float grad_scale = 0.7f, lr = 3e-3f;
  uint64_t rng = 5;
  AdamWConfig config = adamw_config_default();
  real *w = random_float(n, 1.0, &rng), *m = test_alloc(n), *v = test_alloc(n);
  float *d_w = gpu_upload_float(w, n), *d_m = gpu_upload_float(m, n), *d_v = gpu_upload_float(v, n);
  bf16 *d_w16 = device_alloc(n * sizeof(bf16));
  for (long step = 1; step <= 3; step++) {
    real *g = random_float(n, 0.5, &rng), *scaled = test_alloc(n);
    for (size_t i = 0; i < n; i++) scaled[i] = g[i] * (real)grad_scale;
    float *d_g = gpu_upload_float(g, n);
    adamw_step(w, m, v, scaled, n, &config, lr, step);
    adamw_step_cuda(d_w, d_w16, d_m, d_v, d_g, n, &config, lr, step, grad_scale);
    device_free(d_g);
    free(g), free(scaled);
  }
  real *g_w = gpu_download_float(d_w, n), *g_m = gpu_download_float(d_m, n), *g_v = gpu_download_float(d_v, n);
  gpu_expect_close("adamw weight", g_w, w, n, 1e-5);
  expect_bf16_copy("adamw", d_w16, g_w, n);
  device_free(d_w16);
  gpu_expect_close("adamw first moment", g_m, m, n, 1e-5);
  gpu_expect_close("adamw second moment", g_v, v, n, 1e-5);
  device_free(d_w), device_free(d_m), device_free(d_v);
  free(w), free(m), free(v), free(g_w), free(g_m), free(g_v);
}

// The weight UPDATE (new - old) of the bf16 Newton-Schulz against the fp64 one: 3e-2 relative
// (about 1e-2 is typical; see muon.h and muon.cu).
#define MUON_UPDATE_TOLERANCE 3e-2

// Device array of the element offsets b * stride, b < batch, listed last first (the batch may name its
// matrices in any order).
static long long *strided_offsets(int batch, long long stride) {
  long long *host = malloc((size_t)batch * sizeof(long long));
  for (int b = 0; b < batch; b++) host[b] = (batch - 1 - b) * stride;
  long long *device = device_alloc((size_t)batch * sizeof(long long));
  device_upload(device, host, (size_t)batch * sizeof(long long));
  free(host);
  return device;
}

// `batch` matrices at `stride`; the gaps between them must come back untouched.
static void check_muon_steps(int rows, int cols, int batch, long long stride, bool nesterov, int ns_steps,
                             double tolerance) {
  const size_t n = (size_t)rows * cols, span = (size_t)stride * (batch - 1) + n;
  const float grad_scale = 0.5f, lr = 0.02f;
  uint64_t rng = 1000 + (uint64_t)rows * 7 + (uint64_t)cols;
  MuonConfig config = muon_config_default();
  config.nesterov = nesterov;
  config.ns_steps = ns_steps;
  real *w = random_float(span, 1.0, &rng), *mom = random_float(span, 0.3, &rng), *g = random_float(span, 1.0, &rng);
  float *d_w = gpu_upload_float(w, span), *d_mom = gpu_upload_float(mom, span), *d_g = gpu_upload_float(g, span);
  real *w_old = test_copy(w, span), *mom_old = test_copy(mom, span), *scaled = test_alloc(n);
  real *scratch = test_alloc(muon_scratch_elements(rows, cols));
  for (int b = 0; b < batch; b++) {
    size_t at = (size_t)b * stride;
    for (size_t i = 0; i < n; i++) scaled[i] = g[at + i] * (real)grad_scale;
    muon_step(w + at, mom + at, scaled, rows, cols, &config, lr, scratch);
  }
  long long *d_offsets = strided_offsets(batch, stride);
  bf16 *d_w16 = gpu_upload_bf16(w_old, span);
  muon_step_cuda(d_w, d_w16, d_mom, d_g, d_offsets, rows, cols, batch, &config, lr, grad_scale);
  device_free(d_offsets);
  real *g_w = gpu_download_float(d_w, span), *g_mom = gpu_download_float(d_mom, span);
  real *expected16 = test_copy(w_old, span);  // the gaps keep the old weights (bf16-rounded at upload)
  for (int b = 0; b < batch; b++) memcpy(expected16 + (size_t)b * stride, g_w + (size_t)b * stride, n * sizeof(real));
  expect_bf16_copy("muon", d_w16, expected16, span);
  device_free(d_w16);
  free(expected16);

  real *want = test_alloc(n * batch), *got = test_alloc(n * batch);
  size_t gaps_changed = 0;
  for (int b = 0; b < batch; b++) {
    size_t at = (size_t)b * stride;
    for (size_t i = 0; i < n; i++) {
      want[(size_t)b * n + i] = w[at + i] - w_old[at + i];
      got[(size_t)b * n + i] = g_w[at + i] - w_old[at + i];
    }
    if (b + 1 < batch)
      for (size_t i = at + n; i < at + (size_t)stride; i++)
        gaps_changed += g_w[i] != w_old[i] || g_mom[i] != mom_old[i];
  }
  char what[128];
  snprintf(what, sizeof what, "muon (%d, %d) x %d stride %lld, %d Newton-Schulz steps%s: weight update", rows, cols,
           batch, stride, ns_steps, nesterov ? "" : " (no Nesterov)");
  gpu_expect_close(what, got, want, n * batch, tolerance);
  snprintf(what, sizeof what, "muon (%d, %d) x %d: momentum", rows, cols, batch);
  gpu_expect_close(what, g_mom, mom, span, 1e-6);
  cr_expect(gaps_changed == 0, "muon touched %zu elements between the batched matrices", gaps_changed);
  device_free(d_w), device_free(d_mom), device_free(d_g);
  free(w), free(mom), free(g), free(w_old), free(mom_old), free(scaled), free(scratch), free(g_w), free(g_mom);
  free(want), free(got);
}

static void check_muon(int rows, int cols, int batch, long long stride, bool nesterov) {
  check_muon_steps(rows, cols, batch, stride, nesterov, muon_config_default().ns_steps, MUON_UPDATE_TOLERANCE);
}

// Without Newton-Schulz only the momentum, the normalization, the bf16 rounding of X and the scaled
// update remain (about 3e-4: here the decay term, exact in fp32, is most of the update). One step
// shows a single round of bf16 GEMMs (about 1.5e-3), before the iteration amplifies the error.
Test(optim_cuda, muon_normalization_only) { check_muon_steps(300, 96, 1, 0, true, 0, 1e-3); }
Test(optim_cuda, muon_one_newton_schulz_step) { check_muon_steps(64, 200, 2, 64 * 200 + 8, true, 1, 5e-3); }
Test(optim_cuda, muon_wide) { check_muon(64, 200, 1, 0, true); }
Test(optim_cuda, muon_tall) { check_muon(300, 96, 1, 0, true); }
Test(optim_cuda, muon_tall_plain_momentum) { check_muon(300, 96, 1, 0, false); }
Test(optim_cuda, muon_batch_at_stride) { check_muon(128, 64, 4, 128 * 64 + 1000, true); }

Test(optim_cuda, grad_norm_deterministic) {
  const size_t n1 = 1000003, n2 = 777;
  uint64_t rng = 9;
  real *a = random_float(n1, 1.0, &rng), *b = random_float(n2, 3.0, &rng);
  float *d_a = gpu_upload_float(a, n1), *d_b = gpu_upload_float(b, n2);
  double *d_result = (double *)device_alloc(sizeof(double));
  double want = grad_norm_squared(a, n1) + grad_norm_squared(b, n2), first = 0, again = 0;
  grad_norm_squared_cuda(d_result, d_a, n1, false);
  grad_norm_squared_cuda(d_result, d_b, n2, true);
  device_download(&first, d_result, sizeof first);
  grad_norm_squared_cuda(d_result, d_a, n1, false);
  grad_norm_squared_cuda(d_result, d_b, n2, true);
  device_download(&again, d_result, sizeof again);
  double err = fabs(first - want) / want;
  cr_log_info("grad norm squared: %.17g vs %.17g, relative error %.3e", first, want, err);
  cr_expect(err <= 1e-6, "grad norm squared relative error %.3e", err);
  cr_expect(memcmp(&first, &again, sizeof first) == 0, "grad norm not deterministic: %.17g then %.17g", first, again);
  grad_norm_squared_cuda(d_result, d_b, 0, false);  // an empty tensor gives 0
  device_download(&first, d_result, sizeof first);
  cr_expect(first == 0.0, "empty grad norm %g", first);
  device_free(d_a), device_free(d_b), device_free(d_result);
  free(a), free(b);
}

Test(optim_cuda, qk_clip) {
  const int H = 4, Dn = 16, Dr = 8, Dv = 16, C = 48, L = 32;
  const size_t nq = (size_t)H * (Dn + Dr) * C, nkv = (size_t)H * (Dn + Dv) * L;
  const real max_logit[4] = {50, 120, 99.9, 200};
  const float max_logit_float[4] = {50, 120, 99.9f, 200};
  uint64_t rng = 3;
  real *q = random_float(nq, 1.0, &rng), *kv = random_float(nkv, 1.0, &rng);
  float *d_q = gpu_upload_float(q, nq), *d_kv = gpu_upload_float(kv, nkv);
  int want = qk_clip_apply(q, kv, max_logit, 100, H, Dn, Dr, Dv, C, L);
  int got = qk_clip_apply_cuda(d_q, d_kv, max_logit_float, 100, H, Dn, Dr, Dv, C, L);
  cr_expect(got == want && got == 2, "clipped heads: GPU %d, CPU %d, expected 2", got, want);
  real *g_q = gpu_download_float(d_q, nq), *g_kv = gpu_download_float(d_kv, nkv);
  gpu_expect_close("qk-clip q_proj", g_q, q, nq, 1e-6);
  gpu_expect_close("qk-clip kv_b_proj", g_kv, kv, nkv, 1e-6);
  device_free(d_q), device_free(d_kv);
  free(q), free(kv), free(g_q), free(g_kv);
}

// Milliseconds per call of the op stream's work, averaged over `reps` calls after one warm-up.
typedef struct {
  cudaEvent_t start, stop;
} Timer;
static Timer timer_create(void) {
  Timer t;
  CUDA_CHECK(cudaEventCreate(&t.start));
  CUDA_CHECK(cudaEventCreate(&t.stop));
  return t;
}
static void timer_start(Timer *t) { CUDA_CHECK(cudaEventRecord(t->start, device_stream())); }
static double timer_stop_ms(Timer *t, int reps) {
  float ms = 0;
  CUDA_CHECK(cudaEventRecord(t->stop, device_stream()));
  CUDA_CHECK(cudaEventSynchronize(t->stop));
  CUDA_CHECK(cudaEventElapsedTime(&ms, t->start, t->stop));
  return ms / reps;
}
static void timer_free(Timer *t) {
  cudaEventDestroy(t->start);
  cudaEventDestroy(t->stop);
}

static void time_muon(int rows, int cols, int batch) {
  const size_t total = (size_t)rows * cols * batch;
  const int reps = 5;
  uint64_t rng = 77;
  real *x = random_float(total, 1.0, &rng);
  float *d_w = gpu_upload_float(x, total), *d_mom = gpu_upload_float(x, total), *d_g = gpu_upload_float(x, total);
  MuonConfig config = muon_config_default();
  Timer t = timer_create();
  long long *d_offsets = strided_offsets(batch, (long long)rows * cols);
  muon_step_cuda(d_w, NULL, d_mom, d_g, d_offsets, rows, cols, batch, &config, 1e-3f, 1.0f);
  timer_start(&t);
  for (int r = 0; r < reps; r++) muon_step_cuda(d_w, NULL, d_mom, d_g, d_offsets, rows, cols, batch, &config, 1e-3f, 1.0f);
  double ms = timer_stop_ms(&t, reps);
  // Per Newton-Schulz step, with m = min and M = max: 2 m^2 M (Gram) + 2 m^3 + 2 m^2 M.
  double m = rows < cols ? rows : cols, big = rows > cols ? rows : cols;
  double tflops = (double)batch * config.ns_steps * (4.0 * m * m * big + 2.0 * m * m * m) / (ms * 1e-3) / 1e12;
  cr_log_info("muon_step_cuda (%d, %d) x %d: %.3f ms per step, %.1f TFLOP/s (Newton-Schulz GEMM FLOPs / whole step)",
              rows, cols, batch, ms, tflops);
  cr_expect(ms > 0);
  timer_free(&t);
  device_free(d_w), device_free(d_mom), device_free(d_g), device_free(d_offsets);
  free(x);
}

Test(optim_cuda, timing) {
  time_muon(4096, 1024, 1);
  time_muon(1024, 512, 64);
  time_muon(512, 1024, 128);  // a group of the small model's w1 and w3 experts
  time_muon(1024, 1024, 36);

  const size_t n = (size_t)1 << 26;
  const int reps = 5;
  float *d_w = (float *)device_alloc(n * 4), *d_m = (float *)device_alloc(n * 4), *d_v = (float *)device_alloc(n * 4);
  float *d_g = (float *)device_alloc(n * 4);
  double *d_result = (double *)device_alloc(sizeof(double));
  AdamWConfig config = adamw_config_default();
  Timer t = timer_create();
  adamw_step_cuda(d_w, NULL, d_m, d_v, d_g, n, &config, 1e-3f, 1, 1.0f);
  timer_start(&t);
  for (int r = 0; r < reps; r++) adamw_step_cuda(d_w, NULL, d_m, d_v, d_g, n, &config, 1e-3f, r + 2, 1.0f);
  double ms = timer_stop_ms(&t, reps);
  cr_log_info("adamw_step_cuda 2^26 elements: %.3f ms, %.0f GB/s (7 fp32 accesses per element)", ms,
              7.0 * 4 * n / (ms * 1e-3) / 1e9);
  grad_norm_squared_cuda(d_result, d_g, n, false);
  timer_start(&t);
  for (int r = 0; r < reps; r++) grad_norm_squared_cuda(d_result, d_g, n, false);
  ms = timer_stop_ms(&t, reps);
  cr_log_info("grad_norm_squared_cuda 2^26 elements: %.3f ms, %.0f GB/s", ms, 4.0 * n / (ms * 1e-3) / 1e9);
  timer_free(&t);
  device_free(d_w), device_free(d_m), device_free(d_v), device_free(d_g), device_free(d_result);
}
