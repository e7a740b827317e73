// The short convolution + SiLU on the GPU; see conv.h. A thread owns V channels (8 with 16-byte loads
// when C % 8 == 0 and the pointers are aligned, else 1) over a run of R consecutive positions of one
// sequence, and streams through them with the last W inputs in registers: each input is read about
// once. A document start zeroes the history (the window never reaches across it).
// Backward: the same stream recomputes pre and dpre = dout * silu'(pre) for positions t0 .. t1+W-2,
// scatters dpre * weight into the dx of the positions in the window (kept in registers, written
// once complete), and sums dpre * x into per-thread weight partials; the partials of the runs are
// summed in a fixed order (device_column_sum_add): deterministic.
#include <stdint.h>

#include "kernels/conv.h"
#include "kernels/cuda_common.cuh"

#define MAX_TAPS 8
#define THREADS 128
#define FORWARD_RUN 32  // positions per thread (longer runs measured faster on an H100)
#define BACKWARD_RUN 64

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
static inline __device__ float sigmoid_f(float x) { return 1.0f / (1.0f + __expf(-x)); }

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// The V x W weights of channels c0 .. c0+V-1 are V*W consecutive floats: float4 loads when V == 8
// (the launcher checks the alignment).
template <int V, int W>
static inline __device__ void load_weights(float (&w)[W][V], const float *weight, int c0) {
  float flat[V * W];
  if constexpr (V == 8) {
#pragma unroll
    for (int i = 0; i < V * W / 4; i++) {
      float4 q = ((const float4 *)(weight + (size_t)c0 * W))[i];
      flat[4 * i] = q.x, flat[4 * i + 1] = q.y, flat[4 * i + 2] = q.z, flat[4 * i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V * W; i++) flat[i] = weight[(size_t)c0 * W + i];
  }
#pragma unroll
  for (int k = 0; k < V; k++)
#pragma unroll
    for (int j = 0; j < W; j++) w[j][k] = flat[k * W + j];
}

// V raw bf16 values (one 16-byte load when V == 8), for loading a step ahead of their use.
template <int V>
struct alignas(V * 2) RawV {
  bf16_t h[V];
};
template <int V>
static inline __device__ RawV<V> load_raw(const bf16_t *p) {
  return *(const RawV<V> *)p;
}
template <int V>
static inline __device__ void unpack(float *v, const RawV<V> &r) {
#pragma unroll
  for (int k = 0; k < V; k++) v[k] = __bfloat162float(r.h[k]);
}

// Block -> (channel group, sequence b, run start t0). Blocks are flattened: channel blocks fastest.
struct RunIndex {
  int c0, b, t0, t1, run;
};
template <int V>
static inline __device__ RunIndex run_index(int T, int C, int R) {
  int channel_blocks = (C + THREADS * V - 1) / (THREADS * V), runs = (T + R - 1) / R;
  RunIndex r;
  r.run = blockIdx.x / channel_blocks;
  r.c0 = ((blockIdx.x % channel_blocks) * THREADS + threadIdx.x) * V;
  r.b = r.run / runs;
  r.t0 = (r.run % runs) * R;
  r.t1 = min(r.t0 + R, T);
  return r;
}

template <int V, int W>
static __global__ void __launch_bounds__(THREADS)
    conv_forward_kernel(bf16_t *out, const bf16_t *x, const float *weight, const unsigned char *doc_start, int T, int C,
                        int R) {
  RunIndex ri = run_index<V>(T, C, R);
  if (ri.c0 >= C) return;
  float w[W][V], win[W][V];
  load_weights<V, W>(w, weight, ri.c0);
#pragma unroll
  for (int j = 0; j < W; j++)
#pragma unroll
    for (int k = 0; k < V; k++) win[j][k] = 0.0f;
  const size_t seq = (size_t)ri.b * T;
  const int p_begin = max(ri.t0 - (W - 1), 0);
  RawV<V> next_x = load_raw<V>(x + (seq + p_begin) * C + ri.c0);
  for (int p = p_begin; p < ri.t1; p++) {
    RawV<V> cur_x = next_x;
    if (p + 1 < ri.t1) next_x = load_raw<V>(x + (seq + p + 1) * C + ri.c0);
    bool start = p == 0 || (doc_start && doc_start[seq + p]);
#pragma unroll
    for (int j = 0; j < W - 1; j++)
#pragma unroll
      for (int k = 0; k < V; k++) win[j][k] = start ? 0.0f : win[j + 1][k];
    unpack<V>(win[W - 1], cur_x);
    if (p >= ri.t0) {
      float y[V];
#pragma unroll
      for (int k = 0; k < V; k++) {
        float pre = 0.0f;
#pragma unroll
        for (int j = 0; j < W; j++) pre += w[j][k] * win[j][k];
        y[k] = pre * sigmoid_f(pre);
      }
      store_v<V>(out + (seq + p) * C + ri.c0, y);
    }
  }
}

template <int V, int W>
static __global__ void __launch_bounds__(THREADS)
    conv_backward_kernel(bf16_t *dx, float *partial, const bf16_t *dout, const bf16_t *x, const float *weight,
                         const unsigned char *doc_start, int T, int C, int R) {
  RunIndex ri = run_index<V>(T, C, R);
  if (ri.c0 >= C) return;
  // win[j]: x at position p - (W-1) + j (0 before a document start); acc[j]: dx of that position.
  float w[W][V], win[W][V], acc[W][V], dw[W][V];
  load_weights<V, W>(w, weight, ri.c0);
#pragma unroll
  for (int j = 0; j < W; j++)
#pragma unroll
    for (int k = 0; k < V; k++) win[j][k] = 0.0f, acc[j][k] = 0.0f, dw[j][k] = 0.0f;
  const size_t seq = (size_t)ri.b * T;
  const int p_end = min(ri.t1 + W - 1, T);
  int valid = 0;  // window slots j >= W - valid hold positions of the current document
  const int p_begin = max(ri.t0 - (W - 1), 0);
  RawV<V> next_x = load_raw<V>(x + (seq + p_begin) * C + ri.c0), next_dy = {};
  if (p_begin >= ri.t0) next_dy = load_raw<V>(dout + (seq + p_begin) * C + ri.c0);
  for (int p = p_begin; p < p_end; p++) {
    RawV<V> cur_x = next_x, cur_dy = next_dy;
    if (p + 1 < p_end) {
      next_x = load_raw<V>(x + (seq + p + 1) * C + ri.c0);
      if (p + 1 >= ri.t0) next_dy = load_raw<V>(dout + (seq + p + 1) * C + ri.c0);
    }
    int leaving = p - W;  // acc[0] is complete
    if (leaving >= ri.t0 && leaving < ri.t1) store_v<V>(dx + (seq + leaving) * C + ri.c0, acc[0]);
    bool start = p == 0 || (doc_start && doc_start[seq + p]);
#pragma unroll
    for (int j = 0; j < W - 1; j++)
#pragma unroll
      for (int k = 0; k < V; k++) win[j][k] = start ? 0.0f : win[j + 1][k], acc[j][k] = acc[j + 1][k];
#pragma unroll
    for (int k = 0; k < V; k++) acc[W - 1][k] = 0.0f;
    unpack<V>(win[W - 1], cur_x);
    valid = start ? 1 : min(valid + 1, W);
    if (p < ri.t0) continue;
    float dy[V], dpre[V];
    unpack<V>(dy, cur_dy);
#pragma unroll
    for (int k = 0; k < V; k++) {
      float pre = 0.0f;
#pragma unroll
      for (int j = 0; j < W; j++) pre += w[j][k] * win[j][k];
      float s = sigmoid_f(pre);
      dpre[k] = dy[k] * s * (1.0f + pre * (1.0f - s));
    }
#pragma unroll
    for (int j = 0; j < W; j++)
      if (j >= W - valid)
#pragma unroll
        for (int k = 0; k < V; k++) acc[j][k] += w[j][k] * dpre[k];
    if (p < ri.t1)
#pragma unroll
      for (int j = 0; j < W; j++)
#pragma unroll
        for (int k = 0; k < V; k++) dw[j][k] += dpre[k] * win[j][k];
  }
  // acc[j] holds position p_end - W + j.
#pragma unroll
  for (int j = 0; j < W; j++) {
    int s = p_end - W + j;
    if (s >= ri.t0 && s < ri.t1) store_v<V>(dx + (seq + s) * C + ri.c0, acc[j]);
  }
  float flat[V * W];
#pragma unroll
  for (int k = 0; k < V; k++)
#pragma unroll
    for (int j = 0; j < W; j++) flat[k * W + j] = dw[j][k];
  float *dst = partial + (size_t)ri.run * C * W + (size_t)ri.c0 * W;  // V*W consecutive floats
  if constexpr (V == 8) {
#pragma unroll
    for (int i = 0; i < V * W / 4; i++)
      ((float4 *)dst)[i] = make_float4(flat[4 * i], flat[4 * i + 1], flat[4 * i + 2], flat[4 * i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < V * W; i++) dst[i] = flat[i];
  }
}

template <int V, int W>
static void launch(bool backward, bf16_t *y, float *partial, const bf16_t *dout, const bf16_t *x, const float *weight,
                   const unsigned char *doc_start, int B, int T, int C) {
  int R = backward ? BACKWARD_RUN : FORWARD_RUN;
  size_t channel_blocks = ceil_div((size_t)C, (size_t)THREADS * V), runs = (size_t)B * ceil_div((size_t)T, R);
  CHECK(channel_blocks * runs < (1u << 31), "convolution of %d x %d x %d: grid too large", B, T, C);
  unsigned int blocks = (unsigned int)(channel_blocks * runs);
  if (backward)
    conv_backward_kernel<V, W>
        <<<blocks, THREADS, 0, device_stream()>>>(y, partial, dout, x, weight, doc_start, T, C, R);
  else
    conv_forward_kernel<V, W><<<blocks, THREADS, 0, device_stream()>>>(y, x, weight, doc_start, T, C, R);
  CUDA_CHECK_LAUNCH();
}

template <int V>
static void dispatch_taps(bool backward, bf16_t *y, float *partial, const bf16_t *dout, const bf16_t *x,
                          const float *weight, const unsigned char *doc_start, int B, int T, int C, int W) {
  switch (W) {
#define TAPS(n)                                                              \
  case n:                                                                    \
    launch<V, n>(backward, y, partial, dout, x, weight, doc_start, B, T, C); \
    break;
    TAPS(1)
    TAPS(2)
    TAPS(3) TAPS(4) TAPS(5) TAPS(6) TAPS(7) TAPS(8)
#undef TAPS
        default : CHECK(false, "convolution of %d taps (1 to %d)", W, MAX_TAPS);
  }
}

extern "C" void short_conv_silu_forward_cuda(bf16 *out, const bf16 *x, const float *weight,
                                             const unsigned char *doc_start, int B, int T, int C, int W) {
  if ((size_t)B * T * C == 0) return;
  CHECK(W >= 1 && W <= MAX_TAPS, "convolution of %d taps (1 to %d)", W, MAX_TAPS);
  if (C % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(weight))
    dispatch_taps<8>(false, (bf16_t *)out, NULL, NULL, (const bf16_t *)x, weight, doc_start, B, T, C, W);
  else
    dispatch_taps<1>(false, (bf16_t *)out, NULL, NULL, (const bf16_t *)x, weight, doc_start, B, T, C, W);
}

extern "C" void short_conv_silu_backward_cuda(bf16 *dx, float *dweight, const bf16 *dout, const bf16 *x,
                                              const float *weight, const unsigned char *doc_start, int B, int T, int C,
                                              int W) {
  if ((size_t)B * T * C == 0) return;
  CHECK(W >= 1 && W <= MAX_TAPS, "convolution of %d taps (1 to %d)", W, MAX_TAPS);
  size_t runs = (size_t)B * ceil_div((size_t)T, BACKWARD_RUN);
  float *partial = (float *)device_scratch(2, runs * C * W * sizeof(float));
  if (C % 8 == 0 && aligned16(dx) && aligned16(dout) && aligned16(x) && aligned16(weight))
    dispatch_taps<8>(true, (bf16_t *)dx, partial, (const bf16_t *)dout, (const bf16_t *)x, weight, doc_start, B, T, C,
                     W);
  else
    dispatch_taps<1>(true, (bf16_t *)dx, partial, (const bf16_t *)dout, (const bf16_t *)x, weight, doc_start, B, T, C,
                     W);
  device_column_sum_add(dweight, partial, runs, (size_t)C * W);
}
