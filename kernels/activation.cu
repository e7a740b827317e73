// Elementwise activations and the KDA gate on the GPU; see activation.h. Grid-stride loops; when the
// sizes allow and the pointers are 16-byte aligned, each thread moves 8 values at a time (16-byte bf16
// loads and stores). The gate's parameter gradients are summed over rows per block of rows, then over
// the blocks in a fixed order (deterministic).
#include <stdint.h>

#include "kernels/activation.h"
#include "kernels/cuda_common.cuh"

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

// The softplus gate's softplus(x) = log(1 + exp(x)) and its slope sigmoid(x), the gate's forward and backward
// both through softplus_f. Both come from one e = exp(-|x|) in (0, 1], which cannot overflow:
//   softplus(x) = max(x, 0) + log1p(e),  log1p(e) = e + e^2 R(e)
//   sigmoid(x)  = (x < 0 ? e : 1) / (1 + e), an approximate division (__fdividef: 1 + e in [1, 2] is far from
//                 the huge denominators for which it returns 0)
// R (degree 7, Horner) is the minimax fit on [0, 1] of the relative error of log1p(e) with log1p(e)'s leading
// term held exact, float coefficients: 3.3e-8 in exact arithmetic, 1.3e-7 evaluated in float. __logf(1 + e) would
// not do: its absolute error near 1 (2^-21.41) is a large relative error of log1p(e) for small e, the usual case
// (dt_bias starts the gate near f + dt_bias = -7 .. -2, e = 1e-3 .. 0.1). Emulated on the host against double over
// every float x in [-30, 30], softplus and sigmoid are within 1.8e-6 relative (2.1e-6 with MUFU.EX2 and RCP off by
// their 2 and 1 ulp), as the previous log1pf / IEEE-division versions were: __expf's 2 + 1.17 |x| ulp dominates
// (|x| < 1: 1.9e-7, was 1.4e-7). The forward needs only .value; the compiler drops the division.
struct Softplus {
  float value, slope;  // softplus(x), sigmoid(x)
};
static inline __device__ Softplus softplus_f(float x) {
  const float e = __expf(-fabsf(x));
  float r = 5.365422461e-03f;
  r = fmaf(r, e, -3.006830066e-02f);
  r = fmaf(r, e, 7.920882851e-02f);
  r = fmaf(r, e, -1.375418752e-01f);
  r = fmaf(r, e, 1.915384829e-01f);
  r = fmaf(r, e, -2.485721707e-01f);
  r = fmaf(r, e, 3.332132995e-01f);
  r = fmaf(r, e, -4.999964833e-01f);
  const float log1p_e = fmaf(e * r, e, e);
  return {fmaxf(x, 0.0f) + log1p_e, __fdividef(x < 0.0f ? e : 1.0f, 1.0f + e)};
}

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Blocks for a grid-stride loop over `items` items of 256 threads.
static inline unsigned int grid_for(size_t items) {
  size_t blocks = (items + 255) / 256;
  return (unsigned int)(blocks < 132 * 16 ? (blocks ? blocks : 1) : 132 * 16);
}
#define GRID_STRIDE(i, items) \
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (items); i += (size_t)gridDim.x * blockDim.x)

// ---- sigmoid ----------------------------------------------------------------------------------------
template <int V>
static __global__ void sigmoid_forward_kernel(float *out, const bf16_t *x, size_t n) {
  GRID_STRIDE(i, n / V) {
    float v[V];
    load_v<V>(v, x + i * V);
#pragma unroll
    for (int k = 0; k < V; k++) v[k] = sigmoid_f(v[k]);
    store_v<V>(out + i * V, v);
  }
}
template <int V>
static __global__ void sigmoid_backward_kernel(bf16_t *dx, const float *dout, const float *out, size_t n) {
  GRID_STRIDE(i, n / V) {
    float d[V], y[V];
    load_v<V>(d, dout + i * V);
    load_v<V>(y, out + i * V);
#pragma unroll
    for (int k = 0; k < V; k++) d[k] *= y[k] * (1.0f - y[k]);
    store_v<V>(dx + i * V, d);
  }
}
extern "C" void sigmoid_forward_cuda(float *out, const bf16 *x, size_t n) {
  if (!n) return;
  if (n % 8 == 0 && aligned16(out) && aligned16(x))
    sigmoid_forward_kernel<8><<<grid_for(n / 8), 256, 0, device_stream()>>>(out, (const bf16_t *)x, n);
  else
    sigmoid_forward_kernel<1><<<grid_for(n), 256, 0, device_stream()>>>(out, (const bf16_t *)x, n);
  CUDA_CHECK_LAUNCH();
}
extern "C" void sigmoid_backward_cuda(bf16 *dx, const float *dout, const float *out, size_t n) {
  if (!n) return;
  if (n % 8 == 0 && aligned16(dx) && aligned16(dout) && aligned16(out))
    sigmoid_backward_kernel<8><<<grid_for(n / 8), 256, 0, device_stream()>>>((bf16_t *)dx, dout, out, n);
  else
    sigmoid_backward_kernel<1><<<grid_for(n), 256, 0, device_stream()>>>((bf16_t *)dx, dout, out, n);
  CUDA_CHECK_LAUNCH();
}

// ---- SwiGLU on [gate | up] rows -----------------------------------------------------------------------
// Item i covers V outputs: row n = (i V) / F, column j = (i V) % F (F % V == 0).
template <int V>
static __global__ void swiglu_forward_kernel(bf16_t *out, const bf16_t *gate_up, int N, int F) {
  GRID_STRIDE(i, (size_t)N * F / V) {
    size_t e = i * V, n = e / F, j = e % F;
    float g[V], u[V];
    load_v<V>(g, gate_up + n * 2 * F + j);
    load_v<V>(u, gate_up + n * 2 * F + F + j);
#pragma unroll
    for (int k = 0; k < V; k++) g[k] = g[k] * sigmoid_f(g[k]) * u[k];
    store_v<V>(out + e, g);
  }
}
template <int V>
static __global__ void swiglu_backward_kernel(bf16_t *dgate_up, const bf16_t *dout, const bf16_t *gate_up, int N,
                                              int F) {
  GRID_STRIDE(i, (size_t)N * F / V) {
    size_t e = i * V, n = e / F, j = e % F;
    float g[V], u[V], dy[V], dg[V], du[V];
    load_v<V>(g, gate_up + n * 2 * F + j);
    load_v<V>(u, gate_up + n * 2 * F + F + j);
    load_v<V>(dy, dout + e);
#pragma unroll
    for (int k = 0; k < V; k++) {
      float s = sigmoid_f(g[k]);
      dg[k] = dy[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
      du[k] = dy[k] * g[k] * s;
    }
    store_v<V>(dgate_up + n * 2 * F + j, dg);
    store_v<V>(dgate_up + n * 2 * F + F + j, du);
  }
}
extern "C" void swiglu_forward_cuda(bf16 *out, const bf16 *gate_up, int N, int F) {
  size_t n = (size_t)N * F;
  if (!n) return;
  if (F % 8 == 0 && aligned16(out) && aligned16(gate_up))
    swiglu_forward_kernel<8>
        <<<grid_for(n / 8), 256, 0, device_stream()>>>((bf16_t *)out, (const bf16_t *)gate_up, N, F);
  else
    swiglu_forward_kernel<1><<<grid_for(n), 256, 0, device_stream()>>>((bf16_t *)out, (const bf16_t *)gate_up, N, F);
  CUDA_CHECK_LAUNCH();
}
extern "C" void swiglu_backward_cuda(bf16 *dgate_up, const bf16 *dout, const bf16 *gate_up, int N, int F) {
  size_t n = (size_t)N * F;
  if (!n) return;
  if (F % 8 == 0 && aligned16(dgate_up) && aligned16(dout) && aligned16(gate_up))
    swiglu_backward_kernel<8><<<grid_for(n / 8), 256, 0, device_stream()>>>((bf16_t *)dgate_up, (const bf16_t *)dout,
                                                                            (const bf16_t *)gate_up, N, F);
  else
    swiglu_backward_kernel<1><<<grid_for(n), 256, 0, device_stream()>>>((bf16_t *)dgate_up, (const bf16_t *)dout,
                                                                        (const bf16_t *)gate_up, N, F);
  CUDA_CHECK_LAUNCH();
}

// ---- KDA gate ---------------------------------------------------------------------------------------
// Item i covers V channels of one head: flat element e = i V, channel hk = e % (H K) (K % V == 0).
template <int V>
static __global__ void kda_gate_forward_kernel(float *g, const bf16_t *f, const float *A_log, const float *dt_bias,
                                               bool bounded, float lower_bound, int N, int H, int K) {
  const size_t HK = (size_t)H * K;
  GRID_STRIDE(i, (size_t)N * HK / V) {
    size_t e = i * V;
    int hk = (int)(e % HK), h = hk / K;
    float a = __expf(A_log[h]), u[V], b[V];
    load_v<V>(u, f + e);
    load_v<V>(b, dt_bias + hk);
#pragma unroll
    for (int k = 0; k < V; k++) {
      float x = u[k] + b[k];
      u[k] = bounded ? lower_bound * sigmoid_f(a * x) : -a * softplus_f(x).value;
    }
    store_v<V>(g + e, u);
  }
}

// Thread (channel hk, block of rows): writes df for its rows and the rows' sums of dg * dg/du and
// dg * dg/dA_log into partial_du / partial_da [row block][hk]. The rows are read GATE_BATCH at a time before any
// is used (restrict: df cannot alias f or dg), so that each thread has that many loads in flight. One at a time,
// the kernel waited out a memory latency a row: H100, 8 x 4096 x 16 x 128, bounded 0.28 -> 0.20 ms (2.7 TB/s);
// softplus 0.23 -> 0.24 ms, bound by its log1p and division instead. The sums keep the rows' order.
// The softplus form now takes softplus and sigmoid from one exp through softplus_f (a polynomial log1p, an approximate
// division): per row 2 MUFU.EX2, libdevice's log1pf and an IEEE division with its slow-path branch (about 66 SASS
// instructions) became 1 MUFU.EX2, 1 MUFU.RCP and 8 FFMA, branch-free (about 32; bounded about 35), same errors to
// within an ulp (see softplus_f): 0.234 -> 0.192 ms, as bounded's (0.195; H100, session 24). dg/dA_log = -a softplus(u)
// is the forward's g, but reading g (4 more bytes an element on top of 8) would cost more than recomputing it.
#define GATE_ROWS 64
#define GATE_BATCH 8
static __global__ void kda_gate_backward_kernel(bf16_t *__restrict__ df, float *__restrict__ partial_du,
                                                float *__restrict__ partial_da, const float *__restrict__ dg,
                                                const bf16_t *__restrict__ f, const float *__restrict__ A_log,
                                                const float *__restrict__ dt_bias, bool bounded, float lower_bound,
                                                int N, int H, int K) {
  const int HK = H * K;
  int hk = blockIdx.x * blockDim.x + threadIdx.x;
  if (hk >= HK) return;
  int h = hk / K, begin = blockIdx.y * GATE_ROWS, end = min(begin + GATE_ROWS, N);
  float a = __expf(A_log[h]), bias = dt_bias[hk], sum_du = 0.0f, sum_da = 0.0f;
  for (int n0 = begin; n0 < end; n0 += GATE_BATCH) {
    float u[GATE_BATCH], d[GATE_BATCH];
#pragma unroll
    for (int r = 0; r < GATE_BATCH; r++) {
      const size_t i = (size_t)(n0 + r) * HK + hk;
      u[r] = n0 + r < end ? __bfloat162float(f[i]) + bias : 0.0f;
      d[r] = n0 + r < end ? dg[i] : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < GATE_BATCH; r++) {
      if (n0 + r >= end) break;
      float du, da;
      if (!bounded) {
        Softplus sp = softplus_f(u[r]);
        du = -a * sp.slope;
        da = -a * sp.value;
      } else {
        float s = sigmoid_f(a * u[r]), dz = lower_bound * s * (1.0f - s);
        du = dz * a;
        da = dz * a * u[r];
      }
      df[(size_t)(n0 + r) * HK + hk] = __float2bfloat16(d[r] * du);
      sum_du += d[r] * du;
      sum_da += d[r] * da;
    }
  }
  partial_du[(size_t)blockIdx.y * HK + hk] = sum_du;
  partial_da[(size_t)blockIdx.y * HK + hk] = sum_da;
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
  bool bounded = form == KDA_GATE_BOUNDED;
  if (K % 8 == 0 && aligned16(g) && aligned16(f) && aligned16(dt_bias))
    kda_gate_forward_kernel<8><<<grid_for(n / 8), 256, 0, device_stream()>>>(g, (const bf16_t *)f, A_log, dt_bias,
                                                                             bounded, lower_bound, N, H, K);
  else
    kda_gate_forward_kernel<1>
        <<<grid_for(n), 256, 0, device_stream()>>>(g, (const bf16_t *)f, A_log, dt_bias, bounded, lower_bound, N, H, K);
  CUDA_CHECK_LAUNCH();
}

extern "C" void kda_gate_backward_cuda(bf16 *df, float *dA_log, float *ddt_bias, const float *dg, const bf16 *f,
                                       const float *A_log, const float *dt_bias, KdaGateForm form, float lower_bound,
                                       int N, int H, int K) {
  size_t HK = (size_t)H * K;
  if (!N || !HK) return;
  unsigned int row_blocks = ceil_div((size_t)N, GATE_ROWS);
  float *partial = (float *)device_scratch(2, (2 * (size_t)row_blocks + 1) * HK * sizeof(float));
  float *partial_du = partial, *partial_da = partial + row_blocks * HK, *per_channel = partial + 2 * row_blocks * HK;
  kda_gate_backward_kernel<<<dim3(ceil_div(HK, 128), row_blocks), 128, 0, device_stream()>>>(
      (bf16_t *)df, partial_du, partial_da, dg, (const bf16_t *)f, A_log, dt_bias, form == KDA_GATE_BOUNDED,
      lower_bound, N, H, K);
  CUDA_CHECK_LAUNCH();
  device_column_sum_add(ddt_bias, partial_du, row_blocks, HK);
  device_zero(per_channel, HK * sizeof(float));
  device_column_sum_add(per_channel, partial_da, row_blocks, HK);
  sum_heads_kernel<<<ceil_div(H, 64), 64, 0, device_stream()>>>(dA_log, per_channel, H, K);
  CUDA_CHECK_LAUNCH();
}
