// Token embedding on the GPU; see embedding.h.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda_common.cuh"
#include "kernels/embedding.h"

static __global__ void embedding_forward_kernel(bf16_t *out, const int *tokens, const bf16_t *table, int N, int C) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * C) return;
  size_t n = i / C;
  out[i] = table[(size_t)tokens[n] * C + i % C];
}

static __global__ void iota_kernel(int *x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = i;
}

// Block i handles sorted position i if it starts a run of equal ids: sums the run's rows in order.
static __global__ void embedding_backward_kernel(float *dtable, const bf16_t *dout, const int *sorted_ids,
                                                 const int *sorted_positions, int N, int C) {
  int start = blockIdx.x;
  int id = sorted_ids[start];
  if (start > 0 && sorted_ids[start - 1] == id) return;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float sum = 0.0f;
    for (int i = start; i < N && sorted_ids[i] == id; i++) sum += __bfloat162float(dout[(size_t)sorted_positions[i] * C + c]);
    dtable[(size_t)id * C + c] += sum;
  }
}

extern "C" void embedding_forward_cuda(bf16 *out, const int *tokens, const bf16 *table, int N, int C) {
  size_t n = (size_t)N * C;
  if (!n) return;
  embedding_forward_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)out, tokens,
                                                                          (const bf16_t *)table, N, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" void embedding_backward_cuda(float *dtable, const bf16 *dout, const int *tokens, int N, int C, int V) {
  if (N == 0) return;
  int bits = 1;
  while (bits < 31 && (1 << bits) < V) bits++;
  int *buffers = (int *)device_scratch(5, (size_t)3 * N * sizeof(int));
  int *positions = buffers, *sorted_ids = buffers + N, *sorted_positions = buffers + 2 * N;
  iota_kernel<<<ceil_div(N, 256), 256, 0, device_stream()>>>(positions, N);
  CUDA_CHECK_LAUNCH();
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, tokens, sorted_ids, positions, sorted_positions, N, 0,
                                             bits, device_stream()));
  void *temp = device_scratch(6, temp_bytes);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens, sorted_ids, positions, sorted_positions, N, 0,
                                             bits, device_stream()));
  embedding_backward_kernel<<<N, 128, 0, device_stream()>>>(dtable, (const bf16_t *)dout, sorted_ids,
                                                            sorted_positions, N, C);
  CUDA_CHECK_LAUNCH();
}
