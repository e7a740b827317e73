// Speed of the cuBLASLt GEMMs behind every linear layer (kernels/gemm.h) at the small config's shapes
// (16384 tokens of width 1024): forward and both backward products of each projection, median of 20
// after 3 warm-ups, TFLOP/s and the fraction of the 989 TFLOP/s dense bf16 peak (H100 SXM).
#include <stdio.h>

#ifndef KLT_HAVE_CUDA
int main(void) {
  printf("built without the CUDA backend: nothing to measure\n");
  return 0;
}
#else
#include <stdlib.h>

#include "kernels/device.h"
#include "kernels/gemm.h"

#define PEAK 989e12

static int compare(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void bench(const char *name, int N, int C, int OC) {
  bf16 *inp = device_alloc((size_t)N * C * 2), *w = device_alloc((size_t)OC * C * 2);
  bf16 *out = device_alloc((size_t)N * OC * 2), *dinp = device_alloc((size_t)N * C * 2);
  float *dw = device_alloc((size_t)OC * C * 4);
  double fwd[20], bwd[20];
  for (int r = 0; r < 23; r++) {
    device_synchronize();
    double start = klt_now_seconds();
    matmul_forward_cuda(out, inp, w, N, C, OC);
    device_synchronize();
    double mid = klt_now_seconds();
    matmul_backward_cuda(dinp, dw, out, inp, w, N, C, OC, false);
    device_synchronize();
    if (r >= 3) fwd[r - 3] = mid - start, bwd[r - 3] = klt_now_seconds() - mid;
  }
  qsort(fwd, 20, sizeof(double), compare);
  qsort(bwd, 20, sizeof(double), compare);
  double flops = 2.0 * N * C * OC;
  printf("%-28s %6d x %5d -> %5d | fwd %7.3f ms %6.1f TFLOP/s (%4.1f%%) | bwd %7.3f ms %6.1f TFLOP/s (%4.1f%%)\n", name,
         N, C, OC, fwd[10] * 1e3, flops / fwd[10] / 1e12, 100 * flops / fwd[10] / PEAK, bwd[10] * 1e3,
         2 * flops / bwd[10] / 1e12, 200 * flops / bwd[10] / PEAK);
  device_free(inp), device_free(w), device_free(out), device_free(dinp), device_free(dw);
}

int main(void) {
  const int N = 16384;
  bench("KDA q/k/v/o projection", N, 1024, 1024);
  bench("KDA f_a / g_a (low rank)", N, 1024, 128);
  bench("KDA f_b / g_b", N, 128, 1024);
  bench("MLA q projection", N, 1024, 1536);
  bench("MLA kv_a (latent + k_pe)", N, 1024, 576);
  bench("MLA kv_b", N, 512, 2048);
  bench("dense gate+up (fused)", N, 1024, 8192);
  bench("dense down", N, 4096, 1024);
  bench("lm head (V = 32000)", N, 1024, 32000);
  return 0;
}
#endif
