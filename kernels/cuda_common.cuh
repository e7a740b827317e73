// Included by .cu files only: bf16 and vector helpers, warp and block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/device.h"

typedef __nv_bfloat16 bf16_t;

// CUBLAS_CHECK(cublasLtMatmul(...)): a failed cuBLAS(Lt) call is a bug; stop naming the status. Files
// that use it include cublasLt.h or cublas_v2.h.
#define CUBLAS_CHECK(call)                                                                                \
  do {                                                                                                    \
    cublasStatus_t klt_cublas_status_ = (call);                                                           \
    CHECK(klt_cublas_status_ == CUBLAS_STATUS_SUCCESS, "cuBLAS status %d", (int)klt_cublas_status_);   \
  } while (0)  // the device view of kernels/device.h's bf16

static inline __device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
static inline __device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// shared must hold 32 floats; the call synchronizes the block.
static inline __device__ float block_sum(float v, float *shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
  return warp_sum(v);
}

static inline unsigned int ceil_div(size_t a, size_t b) { return (unsigned int)((a + b - 1) / b); }

static inline __device__ float to_float(bf16_t x) { return __bfloat162float(x); }
static inline __device__ float to_float(float x) { return x; }
