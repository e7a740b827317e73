// The short convolution + SiLU on the GPU; see conv.h. A tap at position s feeds position t when no
// document starts in (s, t]. Backward: one kernel forms dpre = dout * silu'(pre) (pre recomputed),
// a second gives dx and per-block weight partial sums, summed in a fixed order.
#include "kernels/conv.h"
#include "kernels/cuda_common.cuh"

#define MAX_TAPS 8
#define ROWS_PER_THREAD 32

// Number of taps usable at (b, t): positions t, t-1, ... back to the document start, at most W.
static inline __device__ int usable_taps(const unsigned char *doc_start, int b, int t, int T, int W) {
  int n = 1;
  for (int s = t; n < W && s > 0; s--, n++)
    if (doc_start && doc_start[(size_t)b * T + s]) break;
  return n;
}

static inline __device__ float conv_at(const bf16_t *x, const float *weight, const unsigned char *doc_start, int b,
                                       int t, int c, int T, int C, int W) {
  int taps = usable_taps(doc_start, b, t, T, W);
  float sum = 0.0f;
  for (int i = 0; i < taps; i++)  // tap j = W-1-i reads position t-i
    sum += weight[(size_t)c * W + (W - 1 - i)] * __bfloat162float(x[((size_t)b * T + t - i) * C + c]);
  return sum;
}

static __global__ void conv_forward_kernel(bf16_t *out, const bf16_t *x, const float *weight,
                                           const unsigned char *doc_start, int B, int T, int C, int W) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)B * T * C) return;
  int c = (int)(i % C);
  size_t row = i / C;
  int b = (int)(row / T), t = (int)(row % T);
  float pre = conv_at(x, weight, doc_start, b, t, c, T, C, W);
  out[i] = __float2bfloat16(pre / (1.0f + __expf(-pre)));
}

static __global__ void conv_dpre_kernel(float *dpre, const bf16_t *dout, const bf16_t *x, const float *weight,
                                        const unsigned char *doc_start, int B, int T, int C, int W) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)B * T * C) return;
  int c = (int)(i % C);
  size_t row = i / C;
  int b = (int)(row / T), t = (int)(row % T);
  float pre = conv_at(x, weight, doc_start, b, t, c, T, C, W), s = 1.0f / (1.0f + __expf(-pre));
  dpre[i] = __bfloat162float(dout[i]) * s * (1.0f + pre * (1.0f - s));
}

// Thread (c, row block): dx[s] = sum over the positions t >= s that s feeds of weight * dpre[t]; the
// weight partials of the block's output rows go to partial[block][c * W + j].
static __global__ void conv_dx_kernel(bf16_t *dx, float *partial, const float *dpre, const bf16_t *x,
                                      const float *weight, const unsigned char *doc_start, int B, int T, int C,
                                      int W) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  size_t rows = (size_t)B * T, begin = (size_t)blockIdx.y * ROWS_PER_THREAD;
  size_t end = min(begin + ROWS_PER_THREAD, rows);
  float dw[MAX_TAPS];
  for (int j = 0; j < W; j++) dw[j] = 0.0f;
  for (size_t row = begin; row < end; row++) {
    int b = (int)(row / T), s = (int)(row % T);
    // Positions t = s + i (i < W) that read s: s must lie within t's usable taps.
    float sum = 0.0f;
    for (int i = 0; i < W && s + i < T; i++) {
      if (i > 0 && doc_start && doc_start[(size_t)b * T + s + i]) break;  // a document starts after s
      sum += weight[(size_t)c * W + (W - 1 - i)] * dpre[(row + i) * C + c];
    }
    dx[row * C + c] = __float2bfloat16(sum);
    int taps = usable_taps(doc_start, b, s, T, W);
    float g = dpre[row * C + c];
    for (int i = 0; i < taps; i++) dw[W - 1 - i] += g * __bfloat162float(x[(row - i) * C + c]);
  }
  for (int j = 0; j < W; j++) partial[(size_t)blockIdx.y * C * W + (size_t)c * W + j] = dw[j];
}

extern "C" void short_conv_silu_forward_cuda(bf16 *out, const bf16 *x, const float *weight,
                                             const unsigned char *doc_start, int B, int T, int C, int W) {
  size_t n = (size_t)B * T * C;
  if (!n) return;
  CHECK(W <= MAX_TAPS, "convolution of %d taps (at most %d)", W, MAX_TAPS);
  conv_forward_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)out, (const bf16_t *)x, weight,
                                                                     doc_start, B, T, C, W);
  CUDA_CHECK_LAUNCH();
}

extern "C" void short_conv_silu_backward_cuda(bf16 *dx, float *dweight, const bf16 *dout, const bf16 *x,
                                              const float *weight, const unsigned char *doc_start, int B, int T,
                                              int C, int W) {
  size_t n = (size_t)B * T * C, rows = (size_t)B * T;
  if (!n) return;
  CHECK(W <= MAX_TAPS, "convolution of %d taps (at most %d)", W, MAX_TAPS);
  float *dpre = (float *)device_scratch(2, n * sizeof(float));
  conv_dpre_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>(dpre, (const bf16_t *)dout, (const bf16_t *)x,
                                                                  weight, doc_start, B, T, C, W);
  CUDA_CHECK_LAUNCH();
  unsigned int blocks = ceil_div(rows, ROWS_PER_THREAD);
  float *partial = (float *)device_scratch(3, (size_t)blocks * C * W * sizeof(float));
  conv_dx_kernel<<<dim3(ceil_div(C, 128), blocks), 128, 0, device_stream()>>>(
      (bf16_t *)dx, partial, dpre, (const bf16_t *)x, weight, doc_start, B, T, C, W);
  CUDA_CHECK_LAUNCH();
  device_column_sum_add(dweight, partial, blocks, (size_t)C * W);
}
