// Token embedding on the GPU; see embedding.h.
#include <stdint.h>

#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda_common.cuh"
#include "kernels/embedding.h"

// ---- 1- or 8-wide loads and stores as float -------------------------------------------------------
template <int V>
static inline __device__ void load_v(float *v, const bf16_t *p) {
  if constexpr (V == 8) {
    uint4 u = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int k = 0; k < 4; k++) {
      float2 f = __bfloat1622float2(h[k]);
      v[2 * k] = f.x, v[2 * k + 1] = f.y;
    }
  } else {
    v[0] = __bfloat162float(p[0]);
  }
}
template <int V>
static inline __device__ void load_v(float *v, const float *p) {
  if constexpr (V == 8) {
    float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    v[0] = p[0];
  }
}
template <int V>
static inline __device__ void store_v(bf16_t *p, const float *v) {
  if constexpr (V == 8) {
    uint4 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
    for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *(uint4 *)p = u;
  } else {
    p[0] = __float2bfloat16(v[0]);
  }
}
template <int V>
static inline __device__ void store_v(float *p, const float *v) {
  if constexpr (V == 8) {
    ((float4 *)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4 *)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    p[0] = v[0];
  }
}

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Item i copies V values of row n = (i V) / C (C % V == 0).
template <int V>
static __global__ void embedding_forward_kernel(bf16_t *out, const int *tokens, const bf16_t *table, int N, int C) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * C / V) return;
  size_t e = i * V, n = e / C, c = e % C;
  const bf16_t *src = table + (size_t)tokens[n] * C + c;
  if constexpr (V == 8)
    *(uint4 *)(out + e) = *(const uint4 *)src;
  else
    out[e] = *src;
}

static __global__ void iota_kernel(int *x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = i;
}

// Block i handles sorted position i if it starts a run of equal ids: sums the run's rows in position
// order (thread: V consecutive columns) and adds the sums to the id's row of dtable.
template <int V>
static __global__ void embedding_backward_kernel(float *dtable, const bf16_t *dout, const int *sorted_ids,
                                                 const int *sorted_positions, int N, int C) {
  int start = blockIdx.x;
  int id = sorted_ids[start];
  if (start > 0 && sorted_ids[start - 1] == id) return;
  int end = start + 1;
  while (end < N && sorted_ids[end] == id) end++;
  for (int c = threadIdx.x * V; c < C; c += blockDim.x * V) {
    float sum[V], v[V];
#pragma unroll
    for (int k = 0; k < V; k++) sum[k] = 0.0f;
    for (int i = start; i < end; i++) {
      load_v<V>(v, dout + (size_t)sorted_positions[i] * C + c);
#pragma unroll
      for (int k = 0; k < V; k++) sum[k] += v[k];
    }
    float *dst = dtable + (size_t)id * C + c;
    load_v<V>(v, dst);
#pragma unroll
    for (int k = 0; k < V; k++) v[k] += sum[k];
    store_v<V>(dst, v);
  }
}

extern "C" void embedding_forward_cuda(bf16 *out, const int *tokens, const bf16 *table, int N, int C) {
  size_t n = (size_t)N * C;
  if (!n) return;
  if (C % 8 == 0 && aligned16(out) && aligned16(table))
    embedding_forward_kernel<8>
        <<<ceil_div(n / 8, 256), 256, 0, device_stream()>>>((bf16_t *)out, tokens, (const bf16_t *)table, N, C);
  else
    embedding_forward_kernel<1>
        <<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)out, tokens, (const bf16_t *)table, N, C);
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
  if (C % 8 == 0 && aligned16(dtable) && aligned16(dout))
    embedding_backward_kernel<8>
        <<<N, 128, 0, device_stream()>>>(dtable, (const bf16_t *)dout, sorted_ids, sorted_positions, N, C);
  else
    embedding_backward_kernel<1>
        <<<N, 128, 0, device_stream()>>>(dtable, (const bf16_t *)dout, sorted_ids, sorted_positions, N, C);
  CUDA_CHECK_LAUNCH();
}
