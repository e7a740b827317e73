/* Helpers for the GPU tests: move `real` arrays (double in the test build) to the device as bf16 or
 * fp32 and back, and the bf16 tolerance every CUDA op is held to against its CPU reference.
 * Inputs are rounded to bf16 before the CPU reference sees them, so the comparison measures the
 * kernel's error, not the input rounding. */
#pragma once
#include <criterion/criterion.h>

#include "kernels/device.h"
#include "tests/testing.h"

// Relative Frobenius error a CUDA op in bf16 must reach against the fp64 reference.
#define GPU_TOLERANCE 1e-2

// Rounds x to bf16 values in place (so CPU and GPU start from the same numbers).
static inline void gpu_round_bf16(real *x, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] = (real)bf16_to_float(bf16_from_float((float)x[i]));
}
static inline bf16 *gpu_upload_bf16(const real *x, size_t n) {
  bf16 *h = (bf16 *)malloc((n ? n : 1) * sizeof(bf16));
  for (size_t i = 0; i < n; i++) h[i] = bf16_from_float((float)x[i]);
  bf16 *d = (bf16 *)device_alloc(n * sizeof(bf16));
  device_upload(d, h, n * sizeof(bf16));
  free(h);
  return d;
}
static inline float *gpu_upload_float(const real *x, size_t n) {
  float *h = (float *)malloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = (float)x[i];
  float *d = (float *)device_alloc(n * sizeof(float));
  device_upload(d, h, n * sizeof(float));
  free(h);
  return d;
}
static inline real *gpu_download_bf16(const bf16 *d, size_t n) {
  bf16 *h = (bf16 *)malloc((n ? n : 1) * sizeof(bf16));
  device_download(h, d, n * sizeof(bf16));
  real *x = test_alloc(n);
  for (size_t i = 0; i < n; i++) x[i] = (real)bf16_to_float(h[i]);
  free(h);
  return x;
}
static inline real *gpu_download_float(const float *d, size_t n) {
  float *h = (float *)malloc((n ? n : 1) * sizeof(float));
  device_download(h, d, n * sizeof(float));
  real *x = test_alloc(n);
  for (size_t i = 0; i < n; i++) x[i] = (real)h[i];
  free(h);
  return x;
}
static inline int gpu_count_nonfinite(const real *x, size_t n) {
  int bad = 0;
  for (size_t i = 0; i < n; i++) bad += !isfinite((double)x[i]);
  return bad;
}
// Asserts no NaN/Inf in got and ||got - want|| / ||want|| <= tolerance; prints the error either way.
static inline void gpu_expect_close(const char *what, const real *got, const real *want, size_t n, double tolerance) {
  int bad = gpu_count_nonfinite(got, n);
  double err = test_rel_error(got, want, n);
  cr_log_info("%s: relative error %.3e (%d non-finite)", what, err, bad);
  cr_expect(bad == 0, "%s: %d non-finite values", what, bad);
  cr_expect(err <= tolerance, "%s: relative error %.3e > %.1e", what, err, tolerance);
}
