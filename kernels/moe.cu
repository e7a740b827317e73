// MoE routing, the expert permutation and the grouped expert GEMMs on the GPU; see moe.h.
// Routing is one thread per token (top_k selection passes over E, the CPU's tie rule); the plan is a
// stable radix sort of assignment ids by expert; the grouped GEMM is one cuBLASLt call per non-empty
// expert (the simple form; a single grouped kernel is the next step).
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"
#include "kernels/moe.h"

#define MOE_WEIGHT_EPSILON 1e-20f
#define MAX_TOP_K 16

static __global__ void router_forward_kernel(int *expert_index, float *expert_weight, float *scores,
                                             const float *logits, const float *bias, int N, int E, int top_k,
                                             float scaling) {
  int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float *s = scores + (size_t)n * E;
  for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-logits[(size_t)n * E + e]));
  int chosen[MAX_TOP_K];
  for (int j = 0; j < top_k; j++) {
    int best = -1;
    float best_value = 0.0f;
    for (int e = 0; e < E; e++) {
      bool taken = false;
      for (int i = 0; i < j; i++) taken |= chosen[i] == e;
      if (taken) continue;
      float value = s[e] + (bias ? bias[e] : 0.0f);
      if (best < 0 || value > best_value) best = e, best_value = value;
    }
    chosen[j] = best;
  }
  float sum = 0.0f;
  for (int j = 0; j < top_k; j++) sum += s[chosen[j]];
  for (int j = 0; j < top_k; j++) {
    expert_index[(size_t)n * top_k + j] = chosen[j];
    expert_weight[(size_t)n * top_k + j] = s[chosen[j]] / (sum + MOE_WEIGHT_EPSILON) * scaling;
  }
}

static __global__ void router_backward_kernel(float *dlogits, const float *dexpert_weight, const float *scores,
                                              const int *expert_index, int N, int E, int top_k, float scaling) {
  int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float *s = scores + (size_t)n * E;
  const int *chosen = expert_index + (size_t)n * top_k;
  const float *dw = dexpert_weight + (size_t)n * top_k;
  float *d = dlogits + (size_t)n * E;
  for (int e = 0; e < E; e++) d[e] = 0.0f;
  float sum = MOE_WEIGHT_EPSILON, weighted = 0.0f;
  for (int j = 0; j < top_k; j++) sum += s[chosen[j]];
  for (int j = 0; j < top_k; j++) weighted += dw[j] * s[chosen[j]];
  for (int j = 0; j < top_k; j++) {
    int e = chosen[j];
    float dscore = scaling / sum * (dw[j] - weighted / sum);
    d[e] += dscore * s[e] * (1.0f - s[e]);
  }
}

extern "C" void moe_router_forward_cuda(int *expert_index, float *expert_weight, float *scores, const float *logits,
                                        const float *bias, int N, int E, int top_k, float routed_scaling) {
  CHECK(top_k > 0 && top_k <= MAX_TOP_K && top_k <= E, "router top_k %d of %d experts (at most %d)", top_k, E,
        MAX_TOP_K);
  if (N == 0) return;
  router_forward_kernel<<<ceil_div(N, 128), 128, 0, device_stream()>>>(expert_index, expert_weight, scores, logits,
                                                                       bias, N, E, top_k, routed_scaling);
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_router_backward_cuda(float *dlogits, const float *dexpert_weight, const float *scores,
                                         const int *expert_index, int N, int E, int top_k, float routed_scaling) {
  if (N == 0) return;
  router_backward_kernel<<<ceil_div(N, 128), 128, 0, device_stream()>>>(dlogits, dexpert_weight, scores,
                                                                        expert_index, N, E, top_k, routed_scaling);
  CUDA_CHECK_LAUNCH();
}

static __global__ void iota_kernel(int *x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = i;
}

static __global__ void count_kernel(int *counts, const int *expert_index, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&counts[expert_index[i]], 1);  // integer: the result does not depend on the order
}

static __global__ void offsets_kernel(int *offsets, const int *counts, int E) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  offsets[0] = 0;
  for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
}

static __global__ void place_kernel(int *row_of_assignment, int *token_of_row, const int *sorted_assignments,
                                    int rows, int top_k) {
  int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  int a = sorted_assignments[r];
  row_of_assignment[a] = r;
  token_of_row[r] = a / top_k;
}

extern "C" void moe_permute_plan_cuda(int *expert_counts, int *expert_offsets, int *row_of_assignment,
                                      int *token_of_row, const int *expert_index, int N, int E, int top_k) {
  const int rows = N * top_k;
  device_zero(expert_counts, (size_t)E * sizeof(int));
  if (rows > 0) {
    count_kernel<<<ceil_div(rows, 256), 256, 0, device_stream()>>>(expert_counts, expert_index, rows);
    CUDA_CHECK_LAUNCH();
  }
  offsets_kernel<<<1, 32, 0, device_stream()>>>(expert_offsets, expert_counts, E);
  CUDA_CHECK_LAUNCH();
  if (rows == 0) return;
  int bits = 1;
  while (bits < 31 && (1 << bits) < E) bits++;
  int *buffers = (int *)device_scratch(5, (size_t)3 * rows * sizeof(int));
  int *ids = buffers, *sorted_keys = buffers + rows, *sorted_ids = buffers + 2 * rows;
  iota_kernel<<<ceil_div(rows, 256), 256, 0, device_stream()>>>(ids, rows);
  CUDA_CHECK_LAUNCH();
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, expert_index, sorted_keys, ids, sorted_ids, rows, 0,
                                             bits, device_stream()));
  void *temp = device_scratch(6, temp_bytes);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, expert_index, sorted_keys, ids, sorted_ids, rows, 0,
                                             bits, device_stream()));
  place_kernel<<<ceil_div(rows, 256), 256, 0, device_stream()>>>(row_of_assignment, token_of_row, sorted_ids, rows,
                                                                 top_k);
  CUDA_CHECK_LAUNCH();
}

static __global__ void permute_forward_kernel(bf16_t *sorted, const bf16_t *x, const int *token_of_row, int rows,
                                              int C) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)rows * C) return;
  size_t r = i / C;
  sorted[i] = x[(size_t)token_of_row[r] * C + i % C];
}

static __global__ void permute_backward_kernel(bf16_t *dx, const bf16_t *dsorted, const int *row_of_assignment,
                                               int N, int top_k, int C, bool accumulate) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * C) return;
  size_t n = i / C, c = i % C;
  float sum = accumulate ? __bfloat162float(dx[i]) : 0.0f;
  for (int j = 0; j < top_k; j++) sum += __bfloat162float(dsorted[(size_t)row_of_assignment[n * top_k + j] * C + c]);
  dx[i] = __float2bfloat16(sum);
}

static __global__ void unpermute_forward_kernel(bf16_t *out, const bf16_t *expert_out, const float *expert_weight,
                                                const int *row_of_assignment, const bf16_t *shared_out, int N,
                                                int top_k, int C) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * C) return;
  size_t n = i / C, c = i % C;
  float sum = shared_out ? __bfloat162float(shared_out[i]) : 0.0f;
  for (int j = 0; j < top_k; j++)
    sum += expert_weight[n * top_k + j] * __bfloat162float(expert_out[(size_t)row_of_assignment[n * top_k + j] * C + c]);
  out[i] = __float2bfloat16(sum);
}

// One warp per assignment (n, j): the weighted copy of dout and the dot product for the weight.
static __global__ void unpermute_backward_kernel(bf16_t *dexpert_out, float *dexpert_weight, const bf16_t *dout,
                                                 const bf16_t *expert_out, const float *expert_weight,
                                                 const int *row_of_assignment, int N, int top_k, int C) {
  size_t a = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (a >= (size_t)N * top_k) return;
  size_t n = a / top_k, r = (size_t)row_of_assignment[a];
  float w = expert_weight[a], dot = 0.0f;
  for (int c = lane; c < C; c += 32) {
    float dy = __bfloat162float(dout[n * C + c]);
    dexpert_out[r * C + c] = __float2bfloat16(w * dy);
    dot += dy * __bfloat162float(expert_out[r * C + c]);
  }
  dot = warp_sum(dot);
  if (lane == 0) dexpert_weight[a] = dot;
}

extern "C" void moe_permute_forward_cuda(bf16 *sorted, const bf16 *x, const int *token_of_row, int rows, int C) {
  size_t n = (size_t)rows * C;
  if (!n) return;
  permute_forward_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)sorted, (const bf16_t *)x,
                                                                        token_of_row, rows, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_permute_backward_cuda(bf16 *dx, const bf16 *dsorted, const int *row_of_assignment, int N,
                                          int top_k, int C, bool accumulate) {
  size_t n = (size_t)N * C;
  if (!n) return;
  permute_backward_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>(
      (bf16_t *)dx, (const bf16_t *)dsorted, row_of_assignment, N, top_k, C, accumulate);
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_unpermute_forward_cuda(bf16 *out, const bf16 *expert_out, const float *expert_weight,
                                           const int *row_of_assignment, const bf16 *shared_out, int N, int top_k,
                                           int C) {
  size_t n = (size_t)N * C;
  if (!n) return;
  unpermute_forward_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>(
      (bf16_t *)out, (const bf16_t *)expert_out, expert_weight, row_of_assignment, (const bf16_t *)shared_out, N,
      top_k, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_unpermute_backward_cuda(bf16 *dexpert_out, float *dexpert_weight, const bf16 *dout,
                                            const bf16 *expert_out, const float *expert_weight,
                                            const int *row_of_assignment, int N, int top_k, int C) {
  size_t warps = (size_t)N * top_k;
  if (!warps) return;
  unpermute_backward_kernel<<<ceil_div(warps * 32, 256), 256, 0, device_stream()>>>(
      (bf16_t *)dexpert_out, dexpert_weight, (const bf16_t *)dout, (const bf16_t *)expert_out, expert_weight,
      row_of_assignment, N, top_k, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_grouped_matmul_forward_cuda(bf16 *out, const bf16 *inp, const bf16 *weight,
                                                long long weight_stride, const int *offsets_host, int E, int C,
                                                int OC) {
  for (int e = 0; e < E; e++) {
    int begin = offsets_host[e], rows = offsets_host[e + 1] - begin;
    if (rows > 0)
      matmul_forward_cuda(out + (size_t)begin * OC, inp + (size_t)begin * C, weight + e * weight_stride, rows, C, OC);
  }
}

extern "C" void moe_grouped_matmul_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                                 const bf16 *weight, long long weight_stride, const int *offsets_host,
                                                 int E, int C, int OC) {
  for (int e = 0; e < E; e++) {
    int begin = offsets_host[e], rows = offsets_host[e + 1] - begin;
    if (rows > 0)
      matmul_backward_cuda(dinp + (size_t)begin * C, dweight + e * weight_stride, dout + (size_t)begin * OC,
                           inp + (size_t)begin * C, weight + e * weight_stride, rows, C, OC, false);
  }
}
