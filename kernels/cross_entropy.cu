// The fused lm head + cross-entropy on the GPU; see cross_entropy.h. Rows go in blocks: one cuBLASLt
// GEMM writes the block's logits in fp32, one thread block per row makes a single online pass for
// the max, the argmax and the sum of exponentials (float4 loads) and a second pass for the bf16
// gradient row, then two GEMMs give dx and add into dweight. No (N, V) matrix is ever whole in memory:
// the scratch is (row block, V), the row block sized so that its fp32 logits stay near 512 MB.
#include <float.h>
#include <stdint.h>

#include "kernels/cross_entropy.h"
#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"

#define CE_LOGITS_BUDGET (128ll << 20)  // fp32 logits of one row block, in elements (512 MB)
#define CE_MAX_ROWS 4096
#define CE_MIN_ROWS 128
// Wide rows get 1024 threads, so that few rows (2 per SM) are in flight and the gradient pass finds
// them in L2 rather than reading them from memory again.
#define CE_WIDE_VOCAB 8192

// Online softmax state of a run of logits: max m, sum of exp(x - m), first index of the max.
struct Online {
  float max, sum;
  int index;
};

static inline __device__ void online_add(Online &s, float x, int v) {
  if (x > s.max) {  // increasing v within a thread: a strict > keeps the first of equal values
    s.sum = s.sum * __expf(s.max - x) + 1.0f;
    s.max = x, s.index = v;
  } else {
    s.sum += __expf(x - s.max);
  }
}

// Four consecutive logits v..v+3: one rescale at most, four independent exponentials.
static inline __device__ void online_add4(Online &s, float4 x, int v) {
  const float m4 = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
  if (m4 > s.max) {
    s.sum *= __expf(s.max - m4);  // 0 while s.max is still -inf
    s.max = m4;
    s.index = x.x == m4 ? v : x.y == m4 ? v + 1 : x.z == m4 ? v + 2 : v + 3;
  }
  s.sum += (__expf(x.x - s.max) + __expf(x.y - s.max)) + (__expf(x.z - s.max) + __expf(x.w - s.max));
}

static inline __device__ Online online_merge(Online a, Online b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  Online r;
  r.max = fmaxf(a.max, b.max);
  r.sum = a.sum * __expf(a.max - r.max) + b.sum * __expf(b.max - r.max);
  r.index = a.max > b.max ? a.index : b.max > a.max ? b.index : min(a.index, b.index);
  return r;
}

template <bool VEC4, int THREADS>
static __global__ void __launch_bounds__(THREADS) softmax_loss_kernel(float *losses, int *argmax, bf16_t *dlogits,
                                                                         const float *logits, const int *targets,
                                                                         float loss_weight, int V) {
  __shared__ Online shared[32];
  __shared__ Online total;
  const float *row = logits + (size_t)blockIdx.x * V;
  Online s = {-INFINITY, 0.0f, -1};
  if (VEC4) {
    const float4 *row4 = (const float4 *)row;
#pragma unroll 4
    for (int i = threadIdx.x; i < V / 4; i += THREADS) online_add4(s, row4[i], 4 * i);
  } else {
    for (int v = threadIdx.x; v < V; v += THREADS) online_add(s, row[v], v);
  }
  for (int o = 16; o > 0; o >>= 1) {
    Online other = {__shfl_xor_sync(0xffffffffu, s.max, o), __shfl_xor_sync(0xffffffffu, s.sum, o),
                    __shfl_xor_sync(0xffffffffu, s.index, o)};
    s = online_merge(s, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Online t = shared[0];
    for (int w = 1; w < THREADS / 32; w++) t = online_merge(t, shared[w]);  // fixed order: deterministic
    total = t;
  }
  __syncthreads();
  const float lse = total.max + logf(total.sum);
  const int target = targets[blockIdx.x];
  if (threadIdx.x == 0) {
    losses[blockIdx.x] = target >= 0 ? lse - row[target] : 0.0f;
    if (argmax) argmax[blockIdx.x] = total.index;
  }
  if (!dlogits) return;
  bf16_t *drow = dlogits + (size_t)blockIdx.x * V;
  const float scale = target >= 0 ? loss_weight : 0.0f;
  if (VEC4) {
    const float4 *row4 = (const float4 *)row;
    for (int i = threadIdx.x; i < V / 4; i += THREADS) {
      const float4 x = row4[i];
      const int v = 4 * i;
      float g0 = (__expf(x.x - lse) - (v == target)) * scale, g1 = (__expf(x.y - lse) - (v + 1 == target)) * scale;
      float g2 = (__expf(x.z - lse) - (v + 2 == target)) * scale, g3 = (__expf(x.w - lse) - (v + 3 == target)) * scale;
      uint2 packed;
      *(__nv_bfloat162 *)&packed.x = __floats2bfloat162_rn(g0, g1);
      *(__nv_bfloat162 *)&packed.y = __floats2bfloat162_rn(g2, g3);
      ((uint2 *)drow)[i] = packed;
    }
  } else {
    for (int v = threadIdx.x; v < V; v += THREADS)
      drow[v] = __float2bfloat16((__expf(row[v] - lse) - (v == target ? 1.0f : 0.0f)) * scale);
  }
}

template <bool VEC4, int THREADS>
static void ce_launch(int rows, float *losses, int *argmax, int r, bf16 *dlogits, const float *logits,
                      const int *targets, float loss_weight, int V) {
  softmax_loss_kernel<VEC4, THREADS><<<rows, THREADS, 0, device_stream()>>>(
      losses, argmax ? argmax + r : NULL, (bf16_t *)dlogits, logits, targets, loss_weight, V);
}

extern "C" void lm_head_cross_entropy_cuda(float *losses, int *argmax, bf16 *dx, float *dweight, const bf16 *x,
                                           const bf16 *weight, const int *targets, float loss_weight, int N, int C,
                                           int V) {
  CHECK(N >= 0 && C > 0 && V > 0, "lm head shape N=%d C=%d V=%d", N, C, V);
  if (N == 0) return;
  long long block_rows = CE_LOGITS_BUDGET / V;
  block_rows = block_rows > CE_MAX_ROWS ? CE_MAX_ROWS : block_rows < CE_MIN_ROWS ? CE_MIN_ROWS : block_rows & ~63ll;
  const int rows_max = N < block_rows ? N : (int)block_rows;
  float *logits = (float *)device_scratch(7, (size_t)rows_max * V * sizeof(float));
  bf16 *dlogits = dx ? (bf16 *)device_scratch(6, (size_t)rows_max * V * sizeof(bf16)) : NULL;
  const bool vec4 = V % 4 == 0;  // row starts of logits (16 B) and dlogits (8 B) stay aligned
  for (int r = 0; r < N; r += rows_max) {
    const int rows = N - r < rows_max ? N - r : rows_max;
    const bf16 *xb = x + (size_t)r * C;
    gemm_cuda(false, true, rows, V, C, 1.0f, xb, C, 0, weight, C, 0, 0.0f, logits, V, 0, true, 1);
    if (V >= CE_WIDE_VOCAB) {
      if (vec4) ce_launch<true, 1024>(rows, losses + r, argmax, r, dlogits, logits, targets + r, loss_weight, V);
      else ce_launch<false, 1024>(rows, losses + r, argmax, r, dlogits, logits, targets + r, loss_weight, V);
    } else {
      if (vec4) ce_launch<true, 256>(rows, losses + r, argmax, r, dlogits, logits, targets + r, loss_weight, V);
      else ce_launch<false, 256>(rows, losses + r, argmax, r, dlogits, logits, targets + r, loss_weight, V);
    }
    CUDA_CHECK_LAUNCH();
    if (!dx) continue;
    gemm_cuda(false, false, rows, C, V, 1.0f, dlogits, V, 0, weight, C, 0, 0.0f, dx + (size_t)r * C, C, 0, false, 1);
    if (dweight) gemm_cuda(true, false, V, C, rows, 1.0f, dlogits, V, 0, xb, C, 0, 1.0f, dweight, C, 0, true, 1);
  }
}
