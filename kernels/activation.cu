// Elementwise activations on the GPU; see activation.h. One thread per element.
#include "kernels/activation.h"
#include "kernels/cuda_common.cuh"

static inline __device__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }
static inline __device__ float softplusf(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }
#define GRID(n) ceil_div((n), 256), 256, 0, device_stream()

static __global__ void sigmoid_forward_kernel(float *out, const bf16_t *x, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) out[i] = sigmoidf(__bfloat162float(x[i]));
}
static __global__ void sigmoid_backward_kernel(bf16_t *dx, const float *dout, const float *out, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) dx[i] = __float2bfloat16(dout[i] * out[i] * (1.0f - out[i]));
}
extern "C" void sigmoid_forward_cuda(float *out, const bf16 *x, size_t n) {
  if (!n) return;
  sigmoid_forward_kernel<<<GRID(n)>>>(out, (const bf16_t *)x, n);
  CUDA_CHECK_LAUNCH();
}
extern "C" void sigmoid_backward_cuda(bf16 *dx, const float *dout, const float *out, size_t n) {
  if (!n) return;
  sigmoid_backward_kernel<<<GRID(n)>>>((bf16_t *)dx, dout, out, n);
  CUDA_CHECK_LAUNCH();
}

static __global__ void swiglu_forward_kernel(bf16_t *out, const bf16_t *gate_up, int N, int F) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * F) return;
  size_t n = i / F, j = i % F;
  float g = __bfloat162float(gate_up[n * 2 * F + j]), u = __bfloat162float(gate_up[n * 2 * F + F + j]);
  out[i] = __float2bfloat16(g * sigmoidf(g) * u);
}
static __global__ void swiglu_backward_kernel(bf16_t *dgate_up, const bf16_t *dout, const bf16_t *gate_up, int N,
                                              int F) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * F) return;
  size_t n = i / F, j = i % F;
  float g = __bfloat162float(gate_up[n * 2 * F + j]), u = __bfloat162float(gate_up[n * 2 * F + F + j]);
  float dy = __bfloat162float(dout[i]), s = sigmoidf(g);
  dgate_up[n * 2 * F + j] = __float2bfloat16(dy * u * s * (1.0f + g * (1.0f - s)));
  dgate_up[n * 2 * F + F + j] = __float2bfloat16(dy * g * s);
}
extern "C" void swiglu_forward_cuda(bf16 *out, const bf16 *gate_up, int N, int F) {
  size_t n = (size_t)N * F;
  if (!n) return;
  swiglu_forward_kernel<<<GRID(n)>>>((bf16_t *)out, (const bf16_t *)gate_up, N, F);
  CUDA_CHECK_LAUNCH();
}
extern "C" void swiglu_backward_cuda(bf16 *dgate_up, const bf16 *dout, const bf16 *gate_up, int N, int F) {
  size_t n = (size_t)N * F;
  if (!n) return;
  swiglu_backward_kernel<<<GRID(n)>>>((bf16_t *)dgate_up, (const bf16_t *)dout, (const bf16_t *)gate_up, N, F);
  CUDA_CHECK_LAUNCH();
}

static __global__ void kda_gate_forward_kernel(float *g, const bf16_t *f, const float *A_log, const float *dt_bias,
                                               bool bounded, float lower_bound, int N, int H, int K) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * H * K) return;
  int hk = (int)(i % ((size_t)H * K)), h = hk / K;
  float a = __expf(A_log[h]), u = __bfloat162float(f[i]) + dt_bias[hk];
  g[i] = bounded ? lower_bound * sigmoidf(a * u) : -a * softplusf(u);
}
// Writes df and the per-element contributions to dA_log (before the sum over K and rows) to scratch.
static __global__ void kda_gate_backward_kernel(bf16_t *df, float *du_rows, float *da_rows, const float *dg,
                                                const bf16_t *f, const float *A_log, const float *dt_bias,
                                                bool bounded, float lower_bound, int N, int H, int K) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * H * K) return;
  int hk = (int)(i % ((size_t)H * K)), h = hk / K;
  float a = __expf(A_log[h]), u = __bfloat162float(f[i]) + dt_bias[hk];
  float du, da;
  if (!bounded) {
    du = -a * sigmoidf(u);
    da = -a * softplusf(u);
  } else {
    float s = sigmoidf(a * u), dz = lower_bound * s * (1.0f - s);
    du = dz * a;
    da = dz * a * u;
  }
  df[i] = __float2bfloat16(dg[i] * du);
  du_rows[i] = dg[i] * du;
  da_rows[i] = dg[i] * da;
}
static __global__ void sum_heads_kernel(float *dA_log, const float *per_channel, int H, int K) {
  int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h >= H) return;
  float sum = 0.0f;
  for (int k = 0; k < K; k++) sum += per_channel[h * K + k];
  dA_log[h] += sum;
}

extern "C" void kda_gate_forward_cuda(float *g, const bf16 *f, const float *A_log, const float *dt_bias,
                                      KdaGateForm form, float lower_bound, int N, int H, int K) {
  size_t n = (size_t)N * H * K;
  if (!n) return;
  kda_gate_forward_kernel<<<GRID(n)>>>(g, (const bf16_t *)f, A_log, dt_bias, form == KDA_GATE_BOUNDED, lower_bound,
                                       N, H, K);
  CUDA_CHECK_LAUNCH();
}

extern "C" void kda_gate_backward_cuda(bf16 *df, float *dA_log, float *ddt_bias, const float *dg, const bf16 *f,
                                       const float *A_log, const float *dt_bias, KdaGateForm form, float lower_bound,
                                       int N, int H, int K) {
  size_t n = (size_t)N * H * K, HK = (size_t)H * K;
  if (!n) return;
  float *du_rows = (float *)device_scratch(2, n * sizeof(float));
  float *da_rows = (float *)device_scratch(3, n * sizeof(float));
  kda_gate_backward_kernel<<<GRID(n)>>>((bf16_t *)df, du_rows, da_rows, dg, (const bf16_t *)f, A_log, dt_bias,
                                        form == KDA_GATE_BOUNDED, lower_bound, N, H, K);
  CUDA_CHECK_LAUNCH();
  device_column_sum_add(ddt_bias, du_rows, (size_t)N, HK);
  float *per_channel = (float *)device_scratch(4, HK * sizeof(float));
  device_zero(per_channel, HK * sizeof(float));
  device_column_sum_add(per_channel, da_rows, (size_t)N, HK);
  sum_heads_kernel<<<ceil_div(H, 64), 64, 0, device_stream()>>>(dA_log, per_channel, H, K);
  CUDA_CHECK_LAUNCH();
}
