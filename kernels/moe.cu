// MoE routing, the expert permutation and the grouped expert GEMMs on the GPU; see moe.h.
// Routing: one warp per token (each lane holds E/32 scores; top_k rounds of a warp argmax with the
// CPU's tie rule, the lower index wins); a thread per token past 256 experts. The plan is a stable
// radix sort (CUB) of the assignment ids keyed by expert. The row shuffles move 16-byte vectors when C
// and the pointers allow it, and are gathers (no atomics): deterministic.
//
// Expert GEMMs (KLT_MOE_GEMM). cublasGemmGroupedBatchedEx (CUDA >= 12.5) takes bf16 A/B/C with fp32
// compute, so it is here ("grouped"), but it does not take fp32 C from bf16 A/B in this cuBLAS (13.0),
// so the fp32 weight gradient falls back to a loop; and it measured slower than a plain loop. On an
// H100 at the small config (N = 16384 tokens, d = 1024, E = 64, top-8, F = 512; bench/bench_moe.c),
// all four expert GEMMs of a layer, forward + backward:
//   grouped (cublasGemmGroupedBatchedEx)                    299 TFLOP/s
//   loop of gemm_cuda (one stream)                           326 TFLOP/s
//   lt: cuBLASLt per expert, cached algorithms, 1 stream     325 TFLOP/s
//   lt over 2 side streams (the default)                     380 TFLOP/s   (3: 369, 4: 362, 8: 362)
// The per-expert products are small (2048 x 1024 x 1024; the w2 weight gradient has only 32 output
// tiles) and one at a time leave SMs idle; two streams let consecutive experts overlap. Also tried:
// cutting every expert into 128..1024-row pieces plus a binary split of the rest, so that all pieces
// of one size are one uniform batch of a single cublasGemmGroupedBatchedEx call (<= 9 groups): 268
// TFLOP/s for the w13 forward whatever the piece size (lt: 455), so that grouped kernel itself is
// the limit. A persistent grouped kernel (CUTLASS-style, wgmma) over all experts' tiles is the next step.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cub/device/device_radix_sort.cuh>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"
#include "kernels/moe.h"

#define MOE_WEIGHT_EPSILON 1e-20f
#define MAX_TOP_K 32                       // one lane per chosen expert
#define WARP_EXPERTS_PER_LANE 8            // the warp router takes E <= 256
#define MAX_GROUPED_EXPERTS 512            // the host offsets ride along as a kernel parameter

// ------------------------------------------------------------------------------------------------
// Router

static inline __device__ bool better(float value, int index, float best_value, int best_index) {
  return value > best_value || (value == best_value && index < best_index);
}

static __global__ void router_forward_warp_kernel(int *expert_index, float *expert_weight, float *scores,
                                                  const float *logits, const float *bias, int N, int E, int top_k,
                                                  float scaling) {
  const int lane = threadIdx.x & 31;
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (n >= N) return;
  float value[WARP_EXPERTS_PER_LANE], score[WARP_EXPERTS_PER_LANE];
  unsigned taken = 0;
#pragma unroll
  for (int i = 0; i < WARP_EXPERTS_PER_LANE; i++) {
    const int e = lane + 32 * i;
    value[i] = -INFINITY;
    score[i] = 0.0f;
    if (e < E) {
      const float s = 1.0f / (1.0f + expf(-logits[(size_t)n * E + e]));
      scores[(size_t)n * E + e] = s;
      score[i] = s;
      value[i] = s + (bias ? bias[e] : 0.0f);
    } else {
      taken |= 1u << i;
    }
  }
  int my_choice = -1;
  float my_score = 0.0f;
  for (int j = 0; j < top_k; j++) {
    float best_value = -INFINITY;
    int best_index = INT_MAX;
    float best_score = 0.0f;
#pragma unroll
    for (int i = 0; i < WARP_EXPERTS_PER_LANE; i++)  // increasing e: a strict > keeps the lower index
      if (!(taken >> i & 1u) && (best_index == INT_MAX || value[i] > best_value))
        best_value = value[i], best_index = lane + 32 * i, best_score = score[i];
    for (int o = 16; o > 0; o >>= 1) {
      const float other_value = __shfl_xor_sync(0xffffffffu, best_value, o);
      const int other_index = __shfl_xor_sync(0xffffffffu, best_index, o);
      const float other_score = __shfl_xor_sync(0xffffffffu, best_score, o);
      if (other_index != INT_MAX &&
          (best_index == INT_MAX || better(other_value, other_index, best_value, best_index)))
        best_value = other_value, best_index = other_index, best_score = other_score;
    }
    if ((best_index & 31) == lane) {
#pragma unroll
      for (int i = 0; i < WARP_EXPERTS_PER_LANE; i++)
        if (lane + 32 * i == best_index) taken |= 1u << i;
    }
    if (lane == j) my_choice = best_index, my_score = best_score;
  }
  const float sum = warp_sum(lane < top_k ? my_score : 0.0f);
  if (lane < top_k) {
    expert_index[(size_t)n * top_k + lane] = my_choice;
    expert_weight[(size_t)n * top_k + lane] = my_score / (sum + MOE_WEIGHT_EPSILON) * scaling;
  }
}

// The general form for E > 32 * WARP_EXPERTS_PER_LANE: one thread per token.
static __global__ void router_forward_thread_kernel(int *expert_index, float *expert_weight, float *scores,
                                                    const float *logits, const float *bias, int N, int E, int top_k,
                                                    float scaling) {
  int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float *s = scores + (size_t)n * E;
  for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-logits[(size_t)n * E + e]));
  int *chosen = expert_index + (size_t)n * top_k;
  for (int j = 0; j < top_k; j++) {
    int best = -1;
    float best_value = 0.0f;
    for (int e = 0; e < E; e++) {
      bool was_taken = false;
      for (int i = 0; i < j; i++) was_taken |= chosen[i] == e;
      if (was_taken) continue;
      float value = s[e] + (bias ? bias[e] : 0.0f);
      if (best < 0 || value > best_value) best = e, best_value = value;
    }
    chosen[j] = best;
  }
  float sum = 0.0f;
  for (int j = 0; j < top_k; j++) sum += s[chosen[j]];
  for (int j = 0; j < top_k; j++)
    expert_weight[(size_t)n * top_k + j] = s[chosen[j]] / (sum + MOE_WEIGHT_EPSILON) * scaling;
}

// One warp per token: zero the row, then lane j < top_k writes its chosen expert's gradient.
static __global__ void router_backward_kernel(float *dlogits, const float *dexpert_weight, const float *scores,
                                              const int *expert_index, int N, int E, int top_k, float scaling) {
  const int lane = threadIdx.x & 31;
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (n >= N) return;
  float *d = dlogits + (size_t)n * E;
  for (int e = lane; e < E; e += 32) d[e] = 0.0f;
  float total_s = 0.0f, total_ws = 0.0f;
  for (int j0 = 0; j0 < top_k; j0 += 32) {
    const int j = j0 + lane;
    float s = 0.0f, dw = 0.0f;
    if (j < top_k) {
      s = scores[(size_t)n * E + expert_index[(size_t)n * top_k + j]];
      dw = dexpert_weight[(size_t)n * top_k + j];
    }
    total_s += warp_sum(s);
    total_ws += warp_sum(dw * s);
  }
  __syncwarp();
  const float sum = total_s + MOE_WEIGHT_EPSILON;
  for (int j = lane; j < top_k; j += 32) {
    const int e = expert_index[(size_t)n * top_k + j];
    const float s = scores[(size_t)n * E + e];
    const float dscore = scaling / sum * (dexpert_weight[(size_t)n * top_k + j] - total_ws / sum);
    d[e] = dscore * s * (1.0f - s);
  }
}

extern "C" void moe_router_forward_cuda(int *expert_index, float *expert_weight, float *scores, const float *logits,
                                        const float *bias, int N, int E, int top_k, float routed_scaling) {
  CHECK(top_k > 0 && top_k <= MAX_TOP_K && top_k <= E, "router top_k %d of %d experts (at most %d)", top_k, E,
        MAX_TOP_K);
  if (N == 0) return;
  if (E <= 32 * WARP_EXPERTS_PER_LANE) {
    router_forward_warp_kernel<<<ceil_div((size_t)N * 32, 256), 256, 0, device_stream()>>>(
        expert_index, expert_weight, scores, logits, bias, N, E, top_k, routed_scaling);
  } else {
    router_forward_thread_kernel<<<ceil_div(N, 128), 128, 0, device_stream()>>>(expert_index, expert_weight, scores,
                                                                                logits, bias, N, E, top_k,
                                                                                routed_scaling);
  }
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_router_backward_cuda(float *dlogits, const float *dexpert_weight, const float *scores,
                                         const int *expert_index, int N, int E, int top_k, float routed_scaling) {
  if (N == 0) return;
  router_backward_kernel<<<ceil_div((size_t)N * 32, 256), 256, 0, device_stream()>>>(
      dlogits, dexpert_weight, scores, expert_index, N, E, top_k, routed_scaling);
  CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------------------------------------
// Plan

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
  // Radix sort is stable: within an expert the assignments keep their (token, slot) order.
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, expert_index, sorted_keys, ids, sorted_ids, rows, 0,
                                             bits, device_stream()));
  void *temp = device_scratch(6, temp_bytes);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, expert_index, sorted_keys, ids, sorted_ids, rows, 0,
                                             bits, device_stream()));
  place_kernel<<<ceil_div(rows, 256), 256, 0, device_stream()>>>(row_of_assignment, token_of_row, sorted_ids, rows,
                                                                 top_k);
  CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------------------------------------
// Row shuffles. VEC bf16 per thread: 8 (16-byte accesses) when every row start is 16-byte aligned.

template <int VEC>
struct Vec {
  float v[VEC];
  __device__ void load(const bf16_t *p) {
    if constexpr (VEC == 8) {
      uint4 raw = *(const uint4 *)p;
      const __nv_bfloat162 *h = (const __nv_bfloat162 *)&raw;
#pragma unroll
      for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; i++) v[i] = __bfloat162float(p[i]);
    }
  }
  __device__ void store(bf16_t *p) const {
    if constexpr (VEC == 8) {
      uint4 raw;
      __nv_bfloat162 *h = (__nv_bfloat162 *)&raw;
#pragma unroll
      for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      *(uint4 *)p = raw;
    } else {
#pragma unroll
      for (int i = 0; i < VEC; i++) p[i] = __float2bfloat16(v[i]);
    }
  }
};

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

template <int VEC>
static __global__ void permute_forward_kernel(bf16_t *sorted, const bf16_t *x, const int *token_of_row, int rows,
                                              int C) {
  const int chunks = C / VEC;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)rows * chunks) return;
  size_t r = i / chunks, c = (i % chunks) * VEC;
  const bf16_t *src = x + (size_t)token_of_row[r] * C + c;
  bf16_t *dst = sorted + r * C + c;
  if constexpr (VEC == 8) *(uint4 *)dst = *(const uint4 *)src;
  else
    for (int k = 0; k < VEC; k++) dst[k] = src[k];
}

template <int VEC>
static __global__ void permute_backward_kernel(bf16_t *dx, const bf16_t *dsorted, const int *row_of_assignment,
                                               int N, int top_k, int C, bool accumulate) {
  const int chunks = C / VEC;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * chunks) return;
  size_t n = i / chunks, c = (i % chunks) * VEC;
  Vec<VEC> sum, part;
  if (accumulate) sum.load(dx + n * C + c);
  else
    for (int k = 0; k < VEC; k++) sum.v[k] = 0.0f;
  for (int j = 0; j < top_k; j++) {
    part.load(dsorted + (size_t)row_of_assignment[n * top_k + j] * C + c);
#pragma unroll
    for (int k = 0; k < VEC; k++) sum.v[k] += part.v[k];
  }
  sum.store(dx + n * C + c);
}

template <int VEC>
static __global__ void unpermute_forward_kernel(bf16_t *out, const bf16_t *expert_out, const float *expert_weight,
                                                const int *row_of_assignment, const bf16_t *shared_out, int N,
                                                int top_k, int C) {
  const int chunks = C / VEC;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * chunks) return;
  size_t n = i / chunks, c = (i % chunks) * VEC;
  Vec<VEC> sum, part;
  if (shared_out) sum.load(shared_out + n * C + c);
  else
    for (int k = 0; k < VEC; k++) sum.v[k] = 0.0f;
  for (int j = 0; j < top_k; j++) {
    const float w = expert_weight[n * top_k + j];
    part.load(expert_out + (size_t)row_of_assignment[n * top_k + j] * C + c);
#pragma unroll
    for (int k = 0; k < VEC; k++) sum.v[k] += w * part.v[k];
  }
  sum.store(out + n * C + c);
}

// One warp per assignment (n, j): the weighted copy of dout and the dot product for the weight.
template <int VEC>
static __global__ void unpermute_backward_kernel(bf16_t *dexpert_out, float *dexpert_weight, const bf16_t *dout,
                                                 const bf16_t *expert_out, const float *expert_weight,
                                                 const int *row_of_assignment, int N, int top_k, int C) {
  size_t a = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (a >= (size_t)N * top_k) return;
  size_t n = a / top_k, r = (size_t)row_of_assignment[a];
  float w = expert_weight[a], dot = 0.0f;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    Vec<VEC> dy, y;
    dy.load(dout + n * C + c);
    y.load(expert_out + r * C + c);
#pragma unroll
    for (int k = 0; k < VEC; k++) dot += dy.v[k] * y.v[k], dy.v[k] *= w;
    if (dexpert_out) dy.store(dexpert_out + r * C + c);
  }
  dot = warp_sum(dot);
  if (lane == 0 && dexpert_weight) dexpert_weight[a] = dot;
}

extern "C" void moe_permute_forward_cuda(bf16 *sorted, const bf16 *x, const int *token_of_row, int rows, int C) {
  if ((size_t)rows * C == 0) return;
  if (C % 8 == 0 && aligned16(sorted) && aligned16(x)) {
    size_t n = (size_t)rows * (C / 8);
    permute_forward_kernel<8><<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)sorted, (const bf16_t *)x,
                                                                             token_of_row, rows, C);
  } else {
    size_t n = (size_t)rows * C;
    permute_forward_kernel<1><<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)sorted, (const bf16_t *)x,
                                                                             token_of_row, rows, C);
  }
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_permute_backward_cuda(bf16 *dx, const bf16 *dsorted, const int *row_of_assignment, int N,
                                          int top_k, int C, bool accumulate) {
  if ((size_t)N * C == 0) return;
  if (C % 8 == 0 && aligned16(dx) && aligned16(dsorted)) {
    size_t n = (size_t)N * (C / 8);
    permute_backward_kernel<8><<<ceil_div(n, 256), 256, 0, device_stream()>>>(
        (bf16_t *)dx, (const bf16_t *)dsorted, row_of_assignment, N, top_k, C, accumulate);
  } else {
    size_t n = (size_t)N * C;
    permute_backward_kernel<1><<<ceil_div(n, 256), 256, 0, device_stream()>>>(
        (bf16_t *)dx, (const bf16_t *)dsorted, row_of_assignment, N, top_k, C, accumulate);
  }
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_unpermute_forward_cuda(bf16 *out, const bf16 *expert_out, const float *expert_weight,
                                           const int *row_of_assignment, const bf16 *shared_out, int N, int top_k,
                                           int C) {
  if ((size_t)N * C == 0) return;
  if (C % 8 == 0 && aligned16(out) && aligned16(expert_out) && (!shared_out || aligned16(shared_out))) {
    size_t n = (size_t)N * (C / 8);
    unpermute_forward_kernel<8><<<ceil_div(n, 256), 256, 0, device_stream()>>>(
        (bf16_t *)out, (const bf16_t *)expert_out, expert_weight, row_of_assignment, (const bf16_t *)shared_out, N,
        top_k, C);
  } else {
    size_t n = (size_t)N * C;
    unpermute_forward_kernel<1><<<ceil_div(n, 256), 256, 0, device_stream()>>>(
        (bf16_t *)out, (const bf16_t *)expert_out, expert_weight, row_of_assignment, (const bf16_t *)shared_out, N,
        top_k, C);
  }
  CUDA_CHECK_LAUNCH();
}

extern "C" void moe_unpermute_backward_cuda(bf16 *dexpert_out, float *dexpert_weight, const bf16 *dout,
                                            const bf16 *expert_out, const float *expert_weight,
                                            const int *row_of_assignment, int N, int top_k, int C) {
  size_t warps = (size_t)N * top_k;
  if (!warps) return;
  if (C % 8 == 0 && (!dexpert_out || aligned16(dexpert_out)) && aligned16(dout) && aligned16(expert_out)) {
    unpermute_backward_kernel<8><<<ceil_div(warps * 32, 256), 256, 0, device_stream()>>>(
        (bf16_t *)dexpert_out, dexpert_weight, (const bf16_t *)dout, (const bf16_t *)expert_out, expert_weight,
        row_of_assignment, N, top_k, C);
  } else {
    unpermute_backward_kernel<1><<<ceil_div(warps * 32, 256), 256, 0, device_stream()>>>(
        (bf16_t *)dexpert_out, dexpert_weight, (const bf16_t *)dout, (const bf16_t *)expert_out, expert_weight,
        row_of_assignment, N, top_k, C);
  }
  CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------------------------------------
// Grouped expert GEMMs. Row-major products map onto column-major cuBLAS as in gemm.cu:
//   out_e (rows, OC) = inp_e W_e^T      -> m = OC, n = rows, k = C,    A = W_e (T, ld C),  B = inp_e (N, ld C)
//   dinp_e (rows, C) = dout_e W_e       -> m = C,  n = rows, k = OC,   A = W_e (N, ld C),  B = dout_e (N, ld OC)
//   dW_e (OC, C) += dout_e^T inp_e      -> m = C,  n = OC,   k = rows, A = inp_e (N, ld C), B = dout_e (T, ld OC)


static cublasHandle_t grouped_handle;

static cublasHandle_t grouped_cublas(void) {
  if (!grouped_handle) {
    CUBLAS_CHECK(cublasCreate(&grouped_handle));
    CUBLAS_CHECK(cublasSetMathMode(grouped_handle, CUBLAS_DEFAULT_MATH));
  }
  CUBLAS_CHECK(cublasSetStream(grouped_handle, device_stream()));
  return grouped_handle;
}

// Which form the expert GEMMs take, from KLT_MOE_GEMM once: "lt" (default), "grouped" or "loop".
enum { MODE_UNSET, MODE_LT, MODE_GROUPED, MODE_LOOP };
static int gemm_mode;
static int weight_grad_grouped = -1;  // -1 not yet probed, 0 refused (loop), 1 grouped

static int moe_gemm_mode(void) {
  if (!gemm_mode) {
    const char *env = getenv("KLT_MOE_GEMM");
    gemm_mode = !env || !strcmp(env, "lt") ? MODE_LT : !strcmp(env, "grouped") ? MODE_GROUPED
              : !strcmp(env, "loop") ? MODE_LOOP : MODE_UNSET;
    CHECK(gemm_mode != MODE_UNSET, "KLT_MOE_GEMM=%s: expected lt, grouped or loop", env);
  }
  return gemm_mode;
}

// ---- The "lt" form: one cuBLASLt matmul per non-empty expert, spread over side streams forked from
// and joined back into the op stream, with the descriptors made once and the algorithm chosen once
// per (product, shape, row bucket). The bucket (8 per octave of rows) and the row count the heuristic
// is asked about (the bucket's top) make the algorithm a function of the shape alone, so a run
// computes the same bits whatever came before (a resumed run included).

#define LT_STREAMS_MAX 8
#define LT_WORKSPACE_BYTES (8u << 20)
#define LT_CACHE_SLOTS 1024

enum { KIND_FORWARD, KIND_DINP, KIND_DWEIGHT, KINDS };

static cublasLtHandle_t lt_handle;
static cublasLtMatmulDesc_t lt_desc[KINDS];
static cudaStream_t lt_streams[LT_STREAMS_MAX];
static void *lt_workspace[LT_STREAMS_MAX];
static cudaEvent_t lt_fork, lt_join[LT_STREAMS_MAX];
static int lt_stream_count;

struct LtAlgo {
  int used, kind, C, OC, bucket;
  cublasLtMatmulAlgo_t algo;
};
static LtAlgo lt_cache[LT_CACHE_SLOTS];

static void lt_setup(void) {
  if (lt_handle) return;
  CUBLAS_CHECK(cublasLtCreate(&lt_handle));
  const cublasOperation_t ops[KINDS][2] = {{CUBLAS_OP_T, CUBLAS_OP_N}, {CUBLAS_OP_N, CUBLAS_OP_N},
                                           {CUBLAS_OP_N, CUBLAS_OP_T}};
  for (int k = 0; k < KINDS; k++) {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&lt_desc[k], CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(lt_desc[k], CUBLASLT_MATMUL_DESC_TRANSA, &ops[k][0], sizeof ops[k][0]));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(lt_desc[k], CUBLASLT_MATMUL_DESC_TRANSB, &ops[k][1], sizeof ops[k][1]));
  }
  const char *env = getenv("KLT_MOE_STREAMS");
  lt_stream_count = env ? atoi(env) : 2;  // 2 measured best on an H100 (bench/bench_moe.c)
  CHECK(lt_stream_count >= 1 && lt_stream_count <= LT_STREAMS_MAX, "KLT_MOE_STREAMS=%s: 1 to %d", env,
        LT_STREAMS_MAX);
  for (int i = 0; i < lt_stream_count; i++) {
    CUDA_CHECK(cudaStreamCreateWithFlags(&lt_streams[i], cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&lt_join[i], cudaEventDisableTiming));
    lt_workspace[i] = device_alloc(LT_WORKSPACE_BYTES);
  }
  CUDA_CHECK(cudaEventCreateWithFlags(&lt_fork, cudaEventDisableTiming));
}

static int row_bucket(int rows) {  // the top of rows' bucket: 8 buckets per octave
  if (rows <= 64) return 64;
  int shift = 31 - __builtin_clz((unsigned)rows) - 3;
  return ((rows + (1 << shift) - 1) >> shift) << shift;
}

// Column-major operands of product `kind` for `rows` rows (see the table above).
struct LtLayouts {
  cublasLtMatrixLayout_t a, b, d;
};
static LtLayouts lt_layouts(int kind, int rows, int C, int OC) {
  LtLayouts l;
  if (kind == KIND_FORWARD) {  // m = OC, n = rows, k = C
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.a, CUDA_R_16BF, C, OC, C));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.b, CUDA_R_16BF, C, rows, C));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.d, CUDA_R_16BF, OC, rows, OC));
  } else if (kind == KIND_DINP) {  // m = C, n = rows, k = OC
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.a, CUDA_R_16BF, C, OC, C));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.b, CUDA_R_16BF, OC, rows, OC));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.d, CUDA_R_16BF, C, rows, C));
  } else {  // m = C, n = OC, k = rows
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.a, CUDA_R_16BF, C, rows, C));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.b, CUDA_R_16BF, OC, rows, OC));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.d, CUDA_R_32F, C, OC, C));
  }
  return l;
}
static void lt_layouts_free(LtLayouts l) {
  cublasLtMatrixLayoutDestroy(l.a);
  cublasLtMatrixLayoutDestroy(l.b);
  cublasLtMatrixLayoutDestroy(l.d);
}

static bool lt_heuristic(int kind, LtLayouts l, cublasLtMatmulAlgo_t *algo) {
  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t bytes = LT_WORKSPACE_BYTES;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                                    sizeof bytes));
  cublasLtMatmulHeuristicResult_t result;
  int found = 0;
  cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(lt_handle, lt_desc[kind], l.a, l.b, l.d, l.d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
  *algo = result.algo;
  return true;
}

static const cublasLtMatmulAlgo_t *lt_cached_algo(int kind, int rows, int C, int OC) {
  const int bucket = row_bucket(rows);
  unsigned h = ((unsigned)kind * 2654435761u) ^ ((unsigned)C * 40503u) ^ ((unsigned)OC * 9973u) ^ (unsigned)bucket;
  for (int probe = 0; probe < LT_CACHE_SLOTS; probe++) {
    LtAlgo *slot = &lt_cache[(h + probe) % LT_CACHE_SLOTS];
    if (slot->used && slot->kind == kind && slot->C == C && slot->OC == OC && slot->bucket == bucket)
      return &slot->algo;
    if (!slot->used) {
      LtLayouts l = lt_layouts(kind, bucket, C, OC);
      bool ok = lt_heuristic(kind, l, &slot->algo);
      lt_layouts_free(l);
      CHECK(ok, "cuBLASLt has no algorithm for the expert GEMM (kind %d, C %d, OC %d, rows %d)", kind, C, OC, bucket);
      slot->used = 1, slot->kind = kind, slot->C = C, slot->OC = OC, slot->bucket = bucket;
      return &slot->algo;
    }
  }
  return NULL;  // table full: ask the heuristic each time
}

static void lt_expert_gemm(int kind, int rows, int C, int OC, const void *a, const void *b, void *d, int stream) {
  const float alpha = 1.0f, beta = kind == KIND_DWEIGHT ? 1.0f : 0.0f;
  LtLayouts l = lt_layouts(kind, rows, C, OC);
  const cublasLtMatmulAlgo_t *algo = lt_cached_algo(kind, rows, C, OC);
  cublasStatus_t status = CUBLAS_STATUS_NOT_SUPPORTED;
  if (algo)
    status = cublasLtMatmul(lt_handle, lt_desc[kind], &alpha, a, l.a, b, l.b, &beta, d, l.d, d, l.d, algo,
                            lt_workspace[stream], LT_WORKSPACE_BYTES, lt_streams[stream]);
  if (status != CUBLAS_STATUS_SUCCESS)  // the bucket's algorithm does not take this row count or alignment:
    CUBLAS_CHECK(cublasLtMatmul(lt_handle, lt_desc[kind], &alpha, a, l.a, b, l.b, &beta, d, l.d, d, l.d, NULL,
                                lt_workspace[stream], LT_WORKSPACE_BYTES, lt_streams[stream]));  // implicit heuristic
  lt_layouts_free(l);
}

static void lt_fork_streams(void) {
  CUDA_CHECK(cudaEventRecord(lt_fork, device_stream()));
  for (int i = 0; i < lt_stream_count; i++) CUDA_CHECK(cudaStreamWaitEvent(lt_streams[i], lt_fork, 0));
}
static void lt_join_streams(void) {
  for (int i = 0; i < lt_stream_count; i++) {
    CUDA_CHECK(cudaEventRecord(lt_join[i], lt_streams[i]));
    CUDA_CHECK(cudaStreamWaitEvent(device_stream(), lt_join[i], 0));
  }
}

// The largest experts first, so the streams end together: a fixed order (count, then index).
static int lt_order(const int *offsets_host, int E, int *order) {
  int n = 0;
  for (int e = 0; e < E; e++)
    if (offsets_host[e + 1] > offsets_host[e]) order[n++] = e;
  for (int i = 1; i < n; i++) {
    int e = order[i], rows = offsets_host[e + 1] - offsets_host[e], j = i - 1;
    while (j >= 0 && offsets_host[order[j] + 1] - offsets_host[order[j]] < rows) order[j + 1] = order[j], j--;
    order[j + 1] = e;
  }
  return n;
}

// Enqueues every non-empty expert's product(s) on the side streams (between a fork and a join).
static void lt_enqueue(bf16 *out_or_dinp, float *dweight, const bf16 *dout, const bf16 *inp, const bf16 *weight,
                       long long weight_stride, const int *offsets_host, int E, int C, int OC, bool forward) {
  static int order[MAX_GROUPED_EXPERTS];
  CHECK(E <= MAX_GROUPED_EXPERTS, "grouped GEMM over %d experts (at most %d)", E, MAX_GROUPED_EXPERTS);
  const int n = lt_order(offsets_host, E, order);
  for (int i = 0; i < n; i++) {
    const int e = order[i], begin = offsets_host[e], rows = offsets_host[e + 1] - begin, stream = i % lt_stream_count;
    const bf16 *w = weight + e * weight_stride;
    if (forward) {
      lt_expert_gemm(KIND_FORWARD, rows, C, OC, w, inp + (size_t)begin * C, out_or_dinp + (size_t)begin * OC, stream);
      continue;
    }
    if (out_or_dinp)
      lt_expert_gemm(KIND_DINP, rows, C, OC, w, dout + (size_t)begin * OC, out_or_dinp + (size_t)begin * C, stream);
    if (dweight)
      lt_expert_gemm(KIND_DWEIGHT, rows, C, OC, inp + (size_t)begin * C, dout + (size_t)begin * OC,
                     dweight + e * weight_stride, stream);
  }
}

static void lt_grouped(bf16 *out_or_dinp, float *dweight, const bf16 *dout, const bf16 *inp, const bf16 *weight,
                       long long weight_stride, const int *offsets_host, int E, int C, int OC, bool forward) {
  lt_setup();
  lt_fork_streams();
  lt_enqueue(out_or_dinp, dweight, dout, inp, weight, weight_stride, offsets_host, E, C, OC, forward);
  lt_join_streams();
}

// The three pointer arrays of a grouped call, computed on the device from the host offsets (passed by
// value): group g is the g-th non-empty expert.
struct GroupedPointers {
  int expert[MAX_GROUPED_EXPERTS];
  int begin[MAX_GROUPED_EXPERTS];
};

static __global__ void grouped_pointers_kernel(const void **pointers, const __grid_constant__ GroupedPointers p,
                                               int groups, const char *a, long long a_expert, long long a_row,
                                               const char *b, long long b_expert, long long b_row, char *c,
                                               long long c_expert, long long c_row) {
  int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const long long e = p.expert[g], r = p.begin[g];
  pointers[g] = a + e * a_expert + r * a_row;
  pointers[groups + g] = b + e * b_expert + r * b_row;
  pointers[2 * groups + g] = c + e * c_expert + r * c_row;
}

// One grouped GEMM over the non-empty experts. The operand addresses of group g are base + expert *
// *_expert + begin * *_row (bytes); m, n, k per group from the role of `rows` (which_rows: 0 = m, 1 = n,
// 2 = k). Returns false when cuBLAS refuses the type combination.
static bool grouped_gemm(const int *offsets_host, int E, cublasOperation_t op_a, cublasOperation_t op_b, int m,
                         int n, int k, int which_rows, const void *a, long long a_expert, long long a_row, int lda,
                         const void *b, long long b_expert, long long b_row, int ldb, float beta, void *c,
                         long long c_expert, long long c_row, int ldc, cudaDataType_t c_type) {
  CHECK(E <= MAX_GROUPED_EXPERTS, "grouped GEMM over %d experts (at most %d)", E, MAX_GROUPED_EXPERTS);
  static GroupedPointers p;
  static int m_array[MAX_GROUPED_EXPERTS], n_array[MAX_GROUPED_EXPERTS], k_array[MAX_GROUPED_EXPERTS];
  static int lda_array[MAX_GROUPED_EXPERTS], ldb_array[MAX_GROUPED_EXPERTS], ldc_array[MAX_GROUPED_EXPERTS];
  static int group_size[MAX_GROUPED_EXPERTS];
  static float alpha_array[MAX_GROUPED_EXPERTS], beta_array[MAX_GROUPED_EXPERTS];
  static cublasOperation_t ta[MAX_GROUPED_EXPERTS], tb[MAX_GROUPED_EXPERTS];
  int groups = 0;
  for (int e = 0; e < E; e++) {
    const int rows = offsets_host[e + 1] - offsets_host[e];
    if (rows <= 0) continue;
    p.expert[groups] = e;
    p.begin[groups] = offsets_host[e];
    m_array[groups] = which_rows == 0 ? rows : m;
    n_array[groups] = which_rows == 1 ? rows : n;
    k_array[groups] = which_rows == 2 ? rows : k;
    lda_array[groups] = lda, ldb_array[groups] = ldb, ldc_array[groups] = ldc;
    group_size[groups] = 1;
    alpha_array[groups] = 1.0f, beta_array[groups] = beta;
    ta[groups] = op_a, tb[groups] = op_b;
    groups++;
  }
  if (!groups) return true;
  const void **pointers = (const void **)device_scratch(4, 3 * sizeof(void *) * MAX_GROUPED_EXPERTS);
  grouped_pointers_kernel<<<ceil_div(groups, 128), 128, 0, device_stream()>>>(
      pointers, p, groups, (const char *)a, a_expert, a_row, (const char *)b, b_expert, b_row, (char *)c, c_expert,
      c_row);
  CUDA_CHECK_LAUNCH();
  cublasStatus_t status = cublasGemmGroupedBatchedEx(
      grouped_cublas(), ta, tb, m_array, n_array, k_array, alpha_array, pointers, CUDA_R_16BF, lda_array,
      pointers + groups, CUDA_R_16BF, ldb_array, beta_array, (void *const *)(pointers + 2 * groups), c_type,
      ldc_array, groups, group_size, CUBLAS_COMPUTE_32F);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) return false;
  CUBLAS_CHECK(status);
  return true;
}


extern "C" void moe_grouped_matmul_forward_cuda(bf16 *out, const bf16 *inp, const bf16 *weight,
                                                long long weight_stride, const int *offsets_host, int E, int C,
                                                int OC) {
  const int mode = moe_gemm_mode();
  if (mode == MODE_LT) {
    lt_grouped(out, NULL, NULL, inp, weight, weight_stride, offsets_host, E, C, OC, true);
    return;
  }
  if (mode == MODE_GROUPED) {
    bool ok = grouped_gemm(offsets_host, E, CUBLAS_OP_T, CUBLAS_OP_N, OC, 0, C, 1, weight, weight_stride * 2, 0, C,
                           inp, 0, (long long)C * 2, C, 0.0f, out, 0, (long long)OC * 2, OC, CUDA_R_16BF);
    CHECK(ok, "cublasGemmGroupedBatchedEx refused bf16 -> bf16 with fp32 compute");
    return;
  }
  for (int e = 0; e < E; e++) {
    int begin = offsets_host[e], rows = offsets_host[e + 1] - begin;
    if (rows > 0)
      matmul_forward_cuda(out + (size_t)begin * OC, inp + (size_t)begin * C, weight + e * weight_stride, rows, C, OC);
  }
}

extern "C" void moe_grouped_matmul_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                                 const bf16 *weight, long long weight_stride, const int *offsets_host,
                                                 int E, int C, int OC) {
  const int mode = moe_gemm_mode();
  if (mode == MODE_LT) {
    lt_grouped(dinp, dweight, dout, inp, weight, weight_stride, offsets_host, E, C, OC, false);
    return;
  }
  if (mode == MODE_GROUPED) {
    if (dinp) {
      bool ok = grouped_gemm(offsets_host, E, CUBLAS_OP_N, CUBLAS_OP_N, C, 0, OC, 1, weight, weight_stride * 2, 0, C,
                             dout, 0, (long long)OC * 2, OC, 0.0f, dinp, 0, (long long)C * 2, C, CUDA_R_16BF);
      CHECK(ok, "cublasGemmGroupedBatchedEx refused bf16 -> bf16 with fp32 compute");
    }
    if (dweight && weight_grad_grouped != 0) {
      bool ok = grouped_gemm(offsets_host, E, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, 0, 2, inp, 0, (long long)C * 2, C,
                             dout, 0, (long long)OC * 2, OC, 1.0f, dweight, weight_stride * 4, 0, C, CUDA_R_32F);
      if (!ok) fprintf(stderr, "moe: cublasGemmGroupedBatchedEx refuses bf16 x bf16 -> fp32; weight gradients by loop\n");
      weight_grad_grouped = ok;
      if (ok) return;
    }
    if (!dweight) return;
    dinp = NULL;  // done above; the loop below only adds the weight gradients
  }
  for (int e = 0; e < E; e++) {
    int begin = offsets_host[e], rows = offsets_host[e + 1] - begin;
    if (rows > 0)
      matmul_backward_cuda(dinp ? dinp + (size_t)begin * C : NULL, dweight ? dweight + e * weight_stride : NULL,
                           dout + (size_t)begin * OC, inp + (size_t)begin * C, weight + e * weight_stride, rows, C,
                           OC, false);
  }
}
