// The normalizations on the GPU; see norm.h. One warp per row (lanes stride over the columns), fp32
// arithmetic; a backward writes each row's gain contribution into scratch (rows, C) and sums the
// columns in a fixed order, so the gain gradients are deterministic.
#include "kernels/cuda_common.cuh"
#include "kernels/norm.h"

#define WARPS_PER_BLOCK 8

static inline unsigned int row_blocks(int rows) { return ceil_div((size_t)rows, WARPS_PER_BLOCK); }
static inline __device__ float load(const float *p, size_t i) { return p[i]; }
static inline __device__ float load(const bf16_t *p, size_t i) { return __bfloat162float(p[i]); }

// residual_out = residual + delta; out = norm(residual_out). In may be float (stream) or bf16.
template <typename In>
static __global__ void rmsnorm_forward_kernel(float *residual_out, bf16_t *out, float *rstd, const In *inp,
                                              const bf16_t *delta, const float *weight, float eps, int N, int C) {
  int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  size_t base = (size_t)row * C;
  float sumsq = 0.0f;
  for (int c = lane; c < C; c += 32) {
    float x = load(inp, base + c) + (delta ? __bfloat162float(delta[base + c]) : 0.0f);
    if (residual_out) residual_out[base + c] = x;
    sumsq += x * x;
  }
  float r = rsqrtf(warp_sum(sumsq) / C + eps);
  if (lane == 0) rstd[row] = r;
  for (int c = lane; c < C; c += 32) {
    float x = residual_out ? residual_out[base + c] : load(inp, base + c);
    out[base + c] = __float2bfloat16(x * r * weight[c]);
  }
}

// dx = rstd * (dy w - x rstd^2 mean(dy w x)); dweight rows: dy x rstd. dx goes to a float (accumulated)
// or a bf16 (overwritten) destination.
template <typename In>
static __global__ void rmsnorm_backward_kernel(float *dx_float, bf16_t *dx_bf16, float *dweight_rows,
                                               const bf16_t *dout, const In *inp, const float *weight,
                                               const float *rstd, int N, int C) {
  int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  size_t base = (size_t)row * C;
  float r = rstd[row], dot = 0.0f;
  for (int c = lane; c < C; c += 32) dot += __bfloat162float(dout[base + c]) * weight[c] * load(inp, base + c);
  dot = warp_sum(dot) / C;
  for (int c = lane; c < C; c += 32) {
    float dy = __bfloat162float(dout[base + c]), x = load(inp, base + c);
    float dx = r * (dy * weight[c] - x * r * r * dot);
    if (dx_float) dx_float[base + c] += dx;
    else dx_bf16[base + c] = __float2bfloat16(dx);
    dweight_rows[base + c] = dy * x * r;
  }
}

extern "C" void residual_rmsnorm_forward_cuda(float *residual_out, bf16 *out, float *rstd, const float *residual,
                                              const bf16 *delta, const float *weight, float eps, int N, int C) {
  if (N == 0) return;
  rmsnorm_forward_kernel<float><<<row_blocks(N), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      residual_out, (bf16_t *)out, rstd, residual, (const bf16_t *)delta, weight, eps, N, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" void residual_rmsnorm_backward_cuda(float *dresidual, float *dweight, const bf16 *dout,
                                               const float *residual_out, const float *weight, const float *rstd,
                                               int N, int C) {
  if (N == 0) return;
  float *rows = (float *)device_scratch(1, (size_t)N * C * sizeof(float));
  rmsnorm_backward_kernel<float><<<row_blocks(N), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      dresidual, NULL, rows, (const bf16_t *)dout, residual_out, weight, rstd, N, C);
  CUDA_CHECK_LAUNCH();
  device_column_sum_add(dweight, rows, (size_t)N, (size_t)C);
}

extern "C" void rmsnorm_forward_cuda(bf16 *out, float *rstd, const bf16 *inp, const float *weight, float eps, int N,
                                     int C) {
  if (N == 0) return;
  rmsnorm_forward_kernel<bf16_t><<<row_blocks(N), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      NULL, (bf16_t *)out, rstd, (const bf16_t *)inp, NULL, weight, eps, N, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" void rmsnorm_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                      const float *weight, const float *rstd, int N, int C) {
  if (N == 0) return;
  float *rows = (float *)device_scratch(1, (size_t)N * C * sizeof(float));
  rmsnorm_backward_kernel<bf16_t><<<row_blocks(N), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      NULL, (bf16_t *)dinp, rows, (const bf16_t *)dout, (const bf16_t *)inp, weight, rstd, N, C);
  CUDA_CHECK_LAUNCH();
  device_column_sum_add(dweight, rows, (size_t)N, (size_t)C);
}

// Rows are (token, head) pairs of D values; the gain (D) is shared by the heads.
static __global__ void gated_rmsnorm_forward_kernel(bf16_t *out, float *rstd, const bf16_t *o, const bf16_t *gate,
                                                    const float *weight, float eps, int rows, int D) {
  int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  size_t base = (size_t)row * D;
  float sumsq = 0.0f;
  for (int c = lane; c < D; c += 32) {
    float x = __bfloat162float(o[base + c]);
    sumsq += x * x;
  }
  float r = rsqrtf(warp_sum(sumsq) / D + eps);
  if (lane == 0) rstd[row] = r;
  for (int c = lane; c < D; c += 32) {
    float z = __bfloat162float(gate[base + c]), s = 1.0f / (1.0f + __expf(-z));
    out[base + c] = __float2bfloat16(__bfloat162float(o[base + c]) * r * weight[c] * s);
  }
}

static __global__ void gated_rmsnorm_backward_kernel(bf16_t *do_, bf16_t *dgate, float *dweight_rows,
                                                     const bf16_t *dout, const bf16_t *o, const bf16_t *gate,
                                                     const float *weight, const float *rstd, int rows, int D) {
  int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  size_t base = (size_t)row * D;
  float r = rstd[row], dot = 0.0f;
  for (int c = lane; c < D; c += 32) {
    float z = __bfloat162float(gate[base + c]), s = 1.0f / (1.0f + __expf(-z));
    dot += __bfloat162float(dout[base + c]) * s * weight[c] * __bfloat162float(o[base + c]);
  }
  dot = warp_sum(dot) / D;
  for (int c = lane; c < D; c += 32) {
    float z = __bfloat162float(gate[base + c]), s = 1.0f / (1.0f + __expf(-z));
    float dy = __bfloat162float(dout[base + c]), x = __bfloat162float(o[base + c]);
    float normed = x * r * weight[c];
    dgate[base + c] = __float2bfloat16(dy * normed * s * (1.0f - s));
    do_[base + c] = __float2bfloat16(r * (dy * s * weight[c] - x * r * r * dot));
    dweight_rows[base + c] = dy * s * x * r;
  }
}

extern "C" void gated_rmsnorm_forward_cuda(bf16 *out, float *rstd, const bf16 *o, const bf16 *gate,
                                           const float *weight, float eps, int N, int H, int D) {
  int rows = N * H;
  if (rows == 0) return;
  gated_rmsnorm_forward_kernel<<<row_blocks(rows), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      (bf16_t *)out, rstd, (const bf16_t *)o, (const bf16_t *)gate, weight, eps, rows, D);
  CUDA_CHECK_LAUNCH();
}

extern "C" void gated_rmsnorm_backward_cuda(bf16 *do_, bf16 *dgate, float *dweight, const bf16 *dout, const bf16 *o,
                                            const bf16 *gate, const float *weight, const float *rstd, int N, int H,
                                            int D) {
  int rows = N * H;
  if (rows == 0) return;
  float *partial = (float *)device_scratch(1, (size_t)rows * D * sizeof(float));
  gated_rmsnorm_backward_kernel<<<row_blocks(rows), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      (bf16_t *)do_, (bf16_t *)dgate, partial, (const bf16_t *)dout, (const bf16_t *)o, (const bf16_t *)gate, weight,
      rstd, rows, D);
  CUDA_CHECK_LAUNCH();
  device_column_sum_add(dweight, partial, (size_t)rows, (size_t)D);
}

static __global__ void l2norm_forward_kernel(bf16_t *out, float *inv_norm, const bf16_t *inp, float eps, int rows,
                                             int D) {
  int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  size_t base = (size_t)row * D;
  float sumsq = 0.0f;
  for (int c = lane; c < D; c += 32) {
    float x = __bfloat162float(inp[base + c]);
    sumsq += x * x;
  }
  float inv = rsqrtf(warp_sum(sumsq) + eps);
  if (lane == 0) inv_norm[row] = inv;
  for (int c = lane; c < D; c += 32) out[base + c] = __float2bfloat16(__bfloat162float(inp[base + c]) * inv);
}

// dx = inv dy - x inv^3 (x . dy)
static __global__ void l2norm_backward_kernel(bf16_t *dinp, const bf16_t *dout, const bf16_t *inp,
                                              const float *inv_norm, int rows, int D) {
  int row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  size_t base = (size_t)row * D;
  float inv = inv_norm[row], dot = 0.0f;
  for (int c = lane; c < D; c += 32) dot += __bfloat162float(inp[base + c]) * __bfloat162float(dout[base + c]);
  dot = warp_sum(dot);
  for (int c = lane; c < D; c += 32) {
    float x = __bfloat162float(inp[base + c]), dy = __bfloat162float(dout[base + c]);
    dinp[base + c] = __float2bfloat16(inv * dy - x * inv * inv * inv * dot);
  }
}

extern "C" void l2norm_forward_cuda(bf16 *out, float *inv_norm, const bf16 *inp, float eps, int rows, int D) {
  if (rows == 0) return;
  l2norm_forward_kernel<<<row_blocks(rows), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      (bf16_t *)out, inv_norm, (const bf16_t *)inp, eps, rows, D);
  CUDA_CHECK_LAUNCH();
}

extern "C" void l2norm_backward_cuda(bf16 *dinp, const bf16 *dout, const bf16 *inp, const float *inv_norm, int rows,
                                     int D) {
  if (rows == 0) return;
  l2norm_backward_kernel<<<row_blocks(rows), WARPS_PER_BLOCK * 32, 0, device_stream()>>>(
      (bf16_t *)dinp, (const bf16_t *)dout, (const bf16_t *)inp, inv_norm, rows, D);
  CUDA_CHECK_LAUNCH();
}
