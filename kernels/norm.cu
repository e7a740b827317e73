// The normalizations on the GPU; see norm.h. One warp per row, fp32 arithmetic. When every pointer is
// 16-byte aligned, each lane moves 8 values at a time (16-byte bf16 loads, two float4 for fp32) in
// rows of a multiple of 8 (at least 256), 4 in other rows of a multiple of 4 (head rows of 128: all
// 32 lanes busy); otherwise one value at a time.
// Gain gradients: each warp adds its rows' contributions into its own shared-memory row (lanes own
// distinct columns, so no atomics), a block sums its warps in order into partial[block], and
// device_column_sum_add sums the blocks in order: deterministic, and no (rows, C) scratch. Rows
// longer than fit in shared memory fall back to a (rows, C) scratch summed the same way.
#include <stdint.h>

#include "kernels/cuda_common.cuh"
#include "kernels/norm.h"

#define FWD_WARPS 8          // warps per block in the forwards
#define BWD_WARPS 4          // warps per block in the backwards
#define BWD_MAX_BLOCKS 1056  // blocks of a backward (fixed for a given row count: deterministic)
#define BWD_SMEM_LIMIT (160 * 1024)

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
  } else if constexpr (V == 4) {
    uint2 u = *(const uint2 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
    float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else {
    v[0] = __bfloat162float(p[0]);
  }
}
template <int V>
static inline __device__ void load_v(float *v, const float *p) {
  if constexpr (V == 8) {
    float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else if constexpr (V == 4) {
    float4 a = *(const float4 *)p;
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
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
  } else if constexpr (V == 4) {
    uint2 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
    h[0] = __floats2bfloat162_rn(v[0], v[1]);
    h[1] = __floats2bfloat162_rn(v[2], v[3]);
    *(uint2 *)p = u;
  } else {
    p[0] = __float2bfloat16(v[0]);
  }
}
template <int V>
static inline __device__ void store_v(float *p, const float *v) {
  if constexpr (V == 8) {
    ((float4 *)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4 *)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else if constexpr (V == 4) {
    *(float4 *)p = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    p[0] = v[0];
  }
}
static inline __device__ float sigmoid_f(float x) { return 1.0f / (1.0f + __expf(-x)); }

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Values per lane access: 8 (16-byte bf16) for long rows, 4 for rows of 128 or so (all 32 lanes busy),
// 1 when the row length or the alignment allows no wider access. `aligned` says every pointer is
// 16-byte aligned (fp32 rows of 4 need it too).
static inline int vector_width(int C, bool aligned) {
  if (!aligned) return 1;
  if (C % 8 == 0 && C >= 256) return 8;
  if (C % 4 == 0) return 4;
  return 1;
}

// ---- forward ----------------------------------------------------------------------------------------
// x = inp (+ delta); residual_out = x when given; rstd = 1/sqrt(mean(x^2) + eps);
// out = x * rstd * weight (* sigmoid(gate)). With a residual_out the second pass reads x back from it
// (this thread wrote those values; in place is allowed).
template <typename In, int V, bool GATED>
static __global__ void __launch_bounds__(FWD_WARPS * 32)
    rmsnorm_forward_kernel(float *residual_out, bf16_t *out, float *rstd, const In *inp, const bf16_t *delta,
                           const bf16_t *gate, const float *weight, float eps, int rows, int C) {
  int row = blockIdx.x * FWD_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  size_t base = (size_t)row * C;
  float sumsq = 0.0f;
  for (int c = lane * V; c < C; c += 32 * V) {
    float x[V];
    load_v<V>(x, inp + base + c);
    if (delta) {
      float d[V];
      load_v<V>(d, delta + base + c);
#pragma unroll
      for (int k = 0; k < V; k++) x[k] += d[k];
    }
    if (residual_out) store_v<V>(residual_out + base + c, x);
#pragma unroll
    for (int k = 0; k < V; k++) sumsq += x[k] * x[k];
  }
  float r = rsqrtf(warp_sum(sumsq) / C + eps);
  if (lane == 0) rstd[row] = r;
  for (int c = lane * V; c < C; c += 32 * V) {
    float x[V], w[V], y[V];
    if (residual_out)
      load_v<V>(x, residual_out + base + c);
    else
      load_v<V>(x, inp + base + c);
    load_v<V>(w, weight + c);
#pragma unroll
    for (int k = 0; k < V; k++) y[k] = x[k] * r * w[k];
    if constexpr (GATED) {
      float z[V];
      load_v<V>(z, gate + base + c);
#pragma unroll
      for (int k = 0; k < V; k++) y[k] *= sigmoid_f(z[k]);
    }
    store_v<V>(out + base + c, y);
  }
}

template <typename In, bool GATED>
static void launch_forward(float *residual_out, bf16_t *out, float *rstd, const In *inp, const bf16_t *delta,
                           const bf16_t *gate, const float *weight, float eps, int rows, int C) {
  if (rows == 0) return;
  bool aligned = aligned16(out) && aligned16(inp) && aligned16(weight) && (!residual_out || aligned16(residual_out)) &&
                 (!delta || aligned16(delta)) && (!gate || aligned16(gate));
  unsigned int blocks = ceil_div((size_t)rows, FWD_WARPS);
  switch (vector_width(C, aligned)) {
#define FORWARD(V)                                                                        \
  case V:                                                                                 \
    rmsnorm_forward_kernel<In, V, GATED><<<blocks, FWD_WARPS * 32, 0, device_stream()>>>( \
        residual_out, out, rstd, inp, delta, gate, weight, eps, rows, C);                 \
    break;
    FORWARD(8) FORWARD(4) FORWARD(1)
#undef FORWARD
  }
  CUDA_CHECK_LAUNCH();
}

// ---- backward ---------------------------------------------------------------------------------------
// With s = sigmoid(gate) (1 when not gated) and e = dy * s: dx = rstd * (e w - x rstd^2 mean(e w x));
// dweight += e x rstd; dgate = dy * x rstd w * s (1 - s). dx is added to a float destination or
// written to a bf16 one. dweight contributions go to shared memory (SHARED) or to rows scratch.
template <typename In, typename DX, int V, bool GATED, bool SHARED>
static __global__ void __launch_bounds__(BWD_WARPS * 32)
    rmsnorm_backward_kernel(DX *dx, bf16_t *dgate, float *dweight_out, const bf16_t *dout, const In *inp,
                            const bf16_t *gate, const float *weight, const float *rstd, int rows, int C) {
  extern __shared__ __align__(16) float shared_dw[];  // (BWD_WARPS, C) when SHARED
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float *my_dw = shared_dw + (size_t)warp * C;
  if constexpr (SHARED)
    for (int c = lane; c < C; c += 32) my_dw[c] = 0.0f;
  __syncwarp();
  const int warps_total = gridDim.x * BWD_WARPS;
  for (int row = blockIdx.x * BWD_WARPS + warp; row < rows; row += warps_total) {
    size_t base = (size_t)row * C;
    float r = rstd[row], dot = 0.0f;
    for (int c = lane * V; c < C; c += 32 * V) {
      float dy[V], x[V], w[V];
      load_v<V>(dy, dout + base + c);
      load_v<V>(x, inp + base + c);
      load_v<V>(w, weight + c);
      if constexpr (GATED) {
        float z[V];
        load_v<V>(z, gate + base + c);
#pragma unroll
        for (int k = 0; k < V; k++) dy[k] *= sigmoid_f(z[k]);
      }
#pragma unroll
      for (int k = 0; k < V; k++) dot += dy[k] * w[k] * x[k];
    }
    dot = warp_sum(dot) / C;
    for (int c = lane * V; c < C; c += 32 * V) {
      float dy[V], x[V], w[V], s[V], d[V], gw[V];
      load_v<V>(dy, dout + base + c);
      load_v<V>(x, inp + base + c);
      load_v<V>(w, weight + c);
      if constexpr (GATED) {
        float z[V], dg[V];
        load_v<V>(z, gate + base + c);
#pragma unroll
        for (int k = 0; k < V; k++) {
          s[k] = sigmoid_f(z[k]);
          dg[k] = dy[k] * x[k] * r * w[k] * s[k] * (1.0f - s[k]);
        }
        store_v<V>(dgate + base + c, dg);
      } else {
#pragma unroll
        for (int k = 0; k < V; k++) s[k] = 1.0f;
      }
#pragma unroll
      for (int k = 0; k < V; k++) {
        float e = dy[k] * s[k];
        d[k] = r * (e * w[k] - x[k] * r * r * dot);
        gw[k] = e * x[k] * r;
      }
      if constexpr (sizeof(DX) == 4) {  // float: accumulate
        float old[V];
        load_v<V>(old, (const float *)dx + base + c);
#pragma unroll
        for (int k = 0; k < V; k++) d[k] += old[k];
      }
      store_v<V>(dx + base + c, d);
      if constexpr (SHARED) {
        float acc[V];
        load_v<V>(acc, my_dw + c);  // float4 accesses when V == 8: fewer bank conflicts
#pragma unroll
        for (int k = 0; k < V; k++) acc[k] += gw[k];
        store_v<V>(my_dw + c, acc);
      } else {
        store_v<V>(dweight_out + base + c, gw);
      }
    }
  }
  if constexpr (SHARED) {
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      float sum = 0.0f;
      for (int w = 0; w < BWD_WARPS; w++) sum += shared_dw[(size_t)w * C + c];
      dweight_out[(size_t)blockIdx.x * C + c] = sum;
    }
  }
}

template <typename In, typename DX, int V, bool GATED, bool SHARED>
static void backward_variant(DX *dx, bf16_t *dgate, float *dweight_out, const bf16_t *dout, const In *inp,
                             const bf16_t *gate, const float *weight, const float *rstd, int rows, int C,
                             unsigned int blocks, size_t smem) {
  auto kernel = rmsnorm_backward_kernel<In, DX, V, GATED, SHARED>;
  if (SHARED && smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kernel<<<blocks, BWD_WARPS * 32, smem, device_stream()>>>(dx, dgate, dweight_out, dout, inp, gate, weight, rstd, rows,
                                                            C);
  CUDA_CHECK_LAUNCH();
}

template <typename In, typename DX, bool GATED>
static void launch_backward(DX *dx, bf16_t *dgate, float *dweight, const bf16_t *dout, const In *inp,
                            const bf16_t *gate, const float *weight, const float *rstd, int rows, int C) {
  if (rows == 0) return;
  bool aligned = aligned16(dx) && aligned16(dout) && aligned16(inp) && aligned16(weight) &&
                 (!gate || aligned16(gate)) && (!dgate || aligned16(dgate));
  const int width = vector_width(C, aligned);
  size_t smem = (size_t)BWD_WARPS * C * sizeof(float);
  const bool shared = smem <= BWD_SMEM_LIMIT;
  unsigned int blocks = ceil_div((size_t)rows, BWD_WARPS);
  if (shared && blocks > BWD_MAX_BLOCKS) blocks = BWD_MAX_BLOCKS;
  size_t partial_rows = shared ? blocks : (size_t)rows;
  float *partial = (float *)device_scratch(1, partial_rows * C * sizeof(float));
#define BACKWARD(V, SHARED) \
  backward_variant<In, DX, V, GATED, SHARED>(dx, dgate, partial, dout, inp, gate, weight, rstd, rows, C, blocks, smem)
  if (shared) {
    if (width == 8)
      BACKWARD(8, true);
    else if (width == 4)
      BACKWARD(4, true);
    else
      BACKWARD(1, true);
  } else {
    smem = 0;
    if (width == 8)
      BACKWARD(8, false);
    else if (width == 4)
      BACKWARD(4, false);
    else
      BACKWARD(1, false);
  }
#undef BACKWARD
  device_column_sum_add(dweight, partial, partial_rows, (size_t)C);
}

// ---- the ops ----------------------------------------------------------------------------------------
extern "C" void residual_rmsnorm_forward_cuda(float *residual_out, bf16 *out, float *rstd, const float *residual,
                                              const bf16 *delta, const float *weight, float eps, int N, int C) {
  launch_forward<float, false>(residual_out, (bf16_t *)out, rstd, residual, (const bf16_t *)delta, NULL, weight, eps, N,
                               C);
}

extern "C" void residual_rmsnorm_backward_cuda(float *dresidual, float *dweight, const bf16 *dout,
                                               const float *residual_out, const float *weight, const float *rstd, int N,
                                               int C) {
  launch_backward<float, float, false>(dresidual, NULL, dweight, (const bf16_t *)dout, residual_out, NULL, weight, rstd,
                                       N, C);
}

extern "C" void rmsnorm_forward_cuda(bf16 *out, float *rstd, const bf16 *inp, const float *weight, float eps, int N,
                                     int C) {
  launch_forward<bf16_t, false>(NULL, (bf16_t *)out, rstd, (const bf16_t *)inp, NULL, NULL, weight, eps, N, C);
}

extern "C" void rmsnorm_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                      const float *weight, const float *rstd, int N, int C) {
  launch_backward<bf16_t, bf16_t, false>((bf16_t *)dinp, NULL, dweight, (const bf16_t *)dout, (const bf16_t *)inp, NULL,
                                         weight, rstd, N, C);
}

// Rows are (token, head) pairs of D values; the gain (D) is shared by the heads.
extern "C" void gated_rmsnorm_forward_cuda(bf16 *out, float *rstd, const bf16 *o, const bf16 *gate, const float *weight,
                                           float eps, int N, int H, int D) {
  launch_forward<bf16_t, true>(NULL, (bf16_t *)out, rstd, (const bf16_t *)o, NULL, (const bf16_t *)gate, weight, eps,
                               N * H, D);
}

extern "C" void gated_rmsnorm_backward_cuda(bf16 *do_, bf16 *dgate, float *dweight, const bf16 *dout, const bf16 *o,
                                            const bf16 *gate, const float *weight, const float *rstd, int N, int H,
                                            int D) {
  launch_backward<bf16_t, bf16_t, true>((bf16_t *)do_, (bf16_t *)dgate, dweight, (const bf16_t *)dout,
                                        (const bf16_t *)o, (const bf16_t *)gate, weight, rstd, N * H, D);
}
