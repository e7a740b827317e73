// Sum of squares of a gradient on the GPU, deterministic: a fixed grid (set by n alone) of
// grid-stride partial sums in double, then one block that adds them in a fixed tree order.
#include "kernels/cuda_common.cuh"
#include "optim/grad_norm.h"

#define NORM_THREADS 256
#define NORM_MAX_BLOCKS 1024  // a power of two: the final tree assumes it

static __global__ void squares_partial_kernel(double *partial, const float *g, size_t n) {
  __shared__ double shared[NORM_THREADS];
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  double sum = 0.0;
  // Four independent loads in flight per thread keep HBM busy.
  for (; i + 3 * stride < n; i += 4 * stride) {
    double a = g[i], b = g[i + stride], c = g[i + 2 * stride], d = g[i + 3 * stride];
    sum += a * a + b * b + c * c + d * d;
  }
  for (; i < n; i += stride) sum += (double)g[i] * (double)g[i];
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int s = NORM_THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
}

// One block of NORM_MAX_BLOCKS threads; partials past `blocks` count as zero.
static __global__ void squares_final_kernel(double *result, const double *partial, int blocks, bool accumulate) {
  __shared__ double shared[NORM_MAX_BLOCKS];
  shared[threadIdx.x] = (int)threadIdx.x < blocks ? partial[threadIdx.x] : 0.0;
  __syncthreads();
  for (int s = NORM_MAX_BLOCKS / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *result = accumulate ? *result + shared[0] : shared[0];
}

extern "C" void grad_norm_squared_cuda(double *result, const float *g, size_t n, bool accumulate) {
  // Allocated once; calls on the one stream run in order, so one buffer serves them all.
  static double *partial;
  if (!partial) partial = (double *)device_alloc(NORM_MAX_BLOCKS * sizeof(double));
  size_t blocks = (n + 4 * NORM_THREADS - 1) / (4 * NORM_THREADS);
  if (blocks < 1) blocks = 1;
  if (blocks > NORM_MAX_BLOCKS) blocks = NORM_MAX_BLOCKS;
  squares_partial_kernel<<<(unsigned)blocks, NORM_THREADS, 0, device_stream()>>>(partial, g, n);
  CUDA_CHECK_LAUNCH();
  squares_final_kernel<<<1, NORM_MAX_BLOCKS, 0, device_stream()>>>(result, partial, (int)blocks, accumulate);
  CUDA_CHECK_LAUNCH();
}
