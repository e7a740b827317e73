// The fused lm head + cross-entropy on the GPU; see cross_entropy.h. The GEMMs go through cuBLASLt;
// one block per row reduces its logits (max, sum of exponentials, argmax) and writes the row's
// gradient, so no (N, V) matrix is ever whole in memory.
#include <float.h>

#include "kernels/cross_entropy.h"
#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"

#define CE_ROWS 2048
#define CE_THREADS 256

static __global__ void softmax_loss_kernel(float *losses, int *argmax, bf16_t *dlogits, const float *logits,
                                           const int *targets, float loss_weight, int V) {
  __shared__ float shared_max[32], shared_sum[32];
  __shared__ int shared_arg[32];
  const float *row = logits + (size_t)blockIdx.x * V;
  float best = -FLT_MAX;
  int best_index = 0;
  for (int v = threadIdx.x; v < V; v += blockDim.x)
    if (row[v] > best) best = row[v], best_index = v;  // increasing v: the first of equal values stays
  // Block argmax (ties to the lower index), which is also the row max.
  for (int o = 16; o > 0; o >>= 1) {
    float other = __shfl_xor_sync(0xffffffffu, best, o);
    int other_index = __shfl_xor_sync(0xffffffffu, best_index, o);
    if (other > best || (other == best && other_index < best_index)) best = other, best_index = other_index;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) shared_max[warp] = best, shared_arg[warp] = best_index;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < warps; w++)
      if (shared_max[w] > shared_max[0] || (shared_max[w] == shared_max[0] && shared_arg[w] < shared_arg[0]))
        shared_max[0] = shared_max[w], shared_arg[0] = shared_arg[w];
  }
  __syncthreads();
  const float max = shared_max[0];
  float sum = 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) sum += __expf(row[v] - max);
  sum = block_sum(sum, shared_sum);
  const float lse = max + logf(sum);
  const int target = targets[blockIdx.x];
  if (threadIdx.x == 0) {
    losses[blockIdx.x] = target >= 0 ? lse - row[target] : 0.0f;
    if (argmax) argmax[blockIdx.x] = shared_arg[0];
  }
  if (!dlogits) return;
  bf16_t *drow = dlogits + (size_t)blockIdx.x * V;
  const float scale = target >= 0 ? loss_weight : 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x)
    drow[v] = __float2bfloat16((__expf(row[v] - lse) - (v == target ? 1.0f : 0.0f)) * scale);
}

extern "C" void lm_head_cross_entropy_cuda(float *losses, int *argmax, bf16 *dx, float *dweight, const bf16 *x,
                                           const bf16 *weight, const int *targets, float loss_weight, int N, int C,
                                           int V) {
  if (N == 0) return;
  const int rows_max = N < CE_ROWS ? N : CE_ROWS;
  float *logits = (float *)device_scratch(7, (size_t)rows_max * V * sizeof(float));
  bf16 *dlogits = dx ? (bf16 *)device_scratch(6, (size_t)rows_max * V * sizeof(bf16)) : NULL;
  for (int r = 0; r < N; r += CE_ROWS) {
    int rows = N - r < CE_ROWS ? N - r : CE_ROWS;
    const bf16 *xb = x + (size_t)r * C;
    gemm_cuda(false, true, rows, V, C, 1.0f, xb, C, 0, weight, C, 0, 0.0f, logits, V, 0, true, 1);
    softmax_loss_kernel<<<rows, CE_THREADS, 0, device_stream()>>>(losses + r, argmax ? argmax + r : NULL,
                                                                   (bf16_t *)dlogits, logits, targets + r,
                                                                   loss_weight, V);
    CUDA_CHECK_LAUNCH();
    if (!dx) continue;
    gemm_cuda(false, false, rows, C, V, 1.0f, dlogits, V, 0, weight, C, 0, 0.0f, dx + (size_t)r * C, C, 0, false, 1);
    if (dweight) gemm_cuda(true, false, V, C, rows, 1.0f, dlogits, V, 0, xb, C, 0, 1.0f, dweight, C, 0, true, 1);
  }
}
