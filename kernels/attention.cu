// Causal, document-masked softmax attention on the GPU, in query blocks; see attention.h.
// Per (row b, query block): S = scale Q K^T for the visible keys (cuBLASLt, batched over heads, fp32),
// then one thread block per (head, query) masks, reduces and writes P in bf16, then O = P V. The heads
// of one row are a strided batch: head h of q starts at column h * Dqk of the (T, H * Dqk) matrix.
#include <float.h>

#include "kernels/attention.h"
#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"

#define QUERY_BLOCK 512
#define SOFTMAX_THREADS 128

// doc_begin[b, t]: the first position of the document holding t.
static __global__ void doc_begin_kernel(int *doc_begin, const unsigned char *doc_start, int B, int T) {
  int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  int begin = 0;
  for (int t = 0; t < T; t++) {
    if (doc_start && t > 0 && doc_start[(size_t)b * T + t]) begin = t;
    doc_begin[(size_t)b * T + t] = begin;
  }
}

static inline __device__ void atomic_max_float(float *address, float value) {
  if (value >= 0.0f) atomicMax((int *)address, __float_as_int(value));
  else atomicMin((unsigned int *)address, __float_as_uint(value));
}

// Block (query i of the block, head h): P[h, i, j] = exp(S - lse) over the visible keys j, 0 elsewhere up
// to `keys`; lse and the head's max logit.
static __global__ void softmax_forward_kernel(bf16_t *P, float *lse, float *max_logit, const float *S,
                                              const int *doc_begin, int b, int q0, int rows, int keys, int T, int H) {
  __shared__ float shared[32];
  int i = blockIdx.x, h = blockIdx.y, t = q0 + i;
  const float *s = S + ((size_t)h * rows + i) * T;
  int first = doc_begin[(size_t)b * T + t], last = t;  // visible keys [first, last]
  float m = -FLT_MAX;
  for (int j = first + threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, s[j]);
  __shared__ float shared_max[32];
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) shared_max[threadIdx.x >> 5] = m;
  __syncthreads();
  m = shared_max[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, shared_max[w]);
  float sum = 0.0f;
  for (int j = first + threadIdx.x; j <= last; j += blockDim.x) sum += __expf(s[j] - m);
  sum = block_sum(sum, shared);
  float l = m + logf(sum);
  if (threadIdx.x == 0) {
    lse[((size_t)b * T + t) * H + h] = l;
    atomic_max_float(&max_logit[h], m);
  }
  bf16_t *p = P + ((size_t)h * rows + i) * T;
  for (int j = threadIdx.x; j < keys; j += blockDim.x)
    p[j] = __float2bfloat16(j >= first && j <= last ? __expf(s[j] - l) : 0.0f);
}

extern "C" void attention_forward_cuda(bf16 *out, float *lse, float *max_logit, const bf16 *q, const bf16 *k,
                                       const bf16 *v, const unsigned char *doc_start, float scale, int B, int T,
                                       int H, int Dqk, int Dv) {
  if (B == 0 || T == 0) return;
  const int Qb = T < QUERY_BLOCK ? T : QUERY_BLOCK;
  int *doc_begin = (int *)device_scratch(2, (size_t)B * T * sizeof(int));
  float *S = (float *)device_scratch(3, (size_t)H * Qb * T * sizeof(float));
  bf16 *P = (bf16 *)device_scratch(4, (size_t)H * Qb * T * sizeof(bf16));
  doc_begin_kernel<<<ceil_div(B, 32), 32, 0, device_stream()>>>(doc_begin, doc_start, B, T);
  CUDA_CHECK_LAUNCH();
  const int qk_row = H * Dqk, v_row = H * Dv;
  for (int b = 0; b < B; b++)
    for (int q0 = 0; q0 < T; q0 += Qb) {
      int rows = T - q0 < Qb ? T - q0 : Qb, keys = q0 + rows;
      const bf16 *qb = q + ((size_t)b * T + q0) * qk_row, *kb = k + (size_t)b * T * qk_row;
      gemm_cuda(false, true, rows, keys, Dqk, scale, qb, qk_row, Dqk, kb, qk_row, Dqk, 0.0f, S, T,
                (long long)rows * T, true, H);
      softmax_forward_kernel<<<dim3(rows, H), SOFTMAX_THREADS, 0, device_stream()>>>(
          (bf16_t *)P, lse, max_logit, S, doc_begin, b, q0, rows, keys, T, H);
      CUDA_CHECK_LAUNCH();
      gemm_cuda(false, false, rows, Dv, keys, 1.0f, P, T, (long long)rows * T, v + (size_t)b * T * v_row, v_row,
                Dv, 0.0f, out + ((size_t)b * T + q0) * v_row, v_row, Dv, false, H);
    }
}

// D[n, h] = dout . out over Dv (one warp per (n, h)).
static __global__ void row_dot_kernel(float *D, const bf16_t *dout, const bf16_t *out, size_t rows, int Dv) {
  size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float sum = 0.0f;
  for (int c = lane; c < Dv; c += 32) sum += __bfloat162float(dout[r * Dv + c]) * __bfloat162float(out[r * Dv + c]);
  sum = warp_sum(sum);
  if (lane == 0) D[r] = sum;
}

// P from S and lse (masked), in place of P; then, once dP is in S: dS = P (dP - D) written over P.
static __global__ void probabilities_kernel(bf16_t *P, const float *S, const float *lse, const int *doc_begin, int b,
                                            int q0, int rows, int keys, int T, int H) {
  int i = blockIdx.x, h = blockIdx.y, t = q0 + i;
  int first = doc_begin[(size_t)b * T + t];
  float l = lse[((size_t)b * T + t) * H + h];
  const float *s = S + ((size_t)h * rows + i) * T;
  bf16_t *p = P + ((size_t)h * rows + i) * T;
  for (int j = threadIdx.x; j < keys; j += blockDim.x)
    p[j] = __float2bfloat16(j >= first && j <= t ? __expf(s[j] - l) : 0.0f);
}
static __global__ void score_grad_kernel(bf16_t *P, const float *dP, const float *D, int b, int q0, int rows,
                                         int keys, int T, int H) {
  int i = blockIdx.x, h = blockIdx.y, t = q0 + i;
  float d = D[((size_t)b * T + t) * H + h];
  const float *dp = dP + ((size_t)h * rows + i) * T;
  bf16_t *p = P + ((size_t)h * rows + i) * T;
  for (int j = threadIdx.x; j < keys; j += blockDim.x) p[j] = __float2bfloat16(__bfloat162float(p[j]) * (dp[j] - d));
}

extern "C" void attention_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const bf16 *out, const float *lse,
                                        const unsigned char *doc_start, float scale, int B, int T, int H, int Dqk,
                                        int Dv) {
  if (B == 0 || T == 0) return;
  const int Qb = T < QUERY_BLOCK ? T : QUERY_BLOCK;
  const size_t N = (size_t)B * T;
  int *doc_begin = (int *)device_scratch(2, N * sizeof(int));
  float *S = (float *)device_scratch(3, (size_t)H * Qb * T * sizeof(float));
  bf16 *P = (bf16 *)device_scratch(4, (size_t)H * Qb * T * sizeof(bf16));
  float *acc = (float *)device_scratch(5, N * H * (Dqk + Dv) * sizeof(float) + N * H * sizeof(float));
  float *dk_acc = acc, *dv_acc = acc + N * H * Dqk, *D = dv_acc + N * H * Dv;
  device_zero(acc, N * H * (Dqk + Dv) * sizeof(float));
  doc_begin_kernel<<<ceil_div(B, 32), 32, 0, device_stream()>>>(doc_begin, doc_start, B, T);
  CUDA_CHECK_LAUNCH();
  row_dot_kernel<<<ceil_div(N * H * 32, 256), 256, 0, device_stream()>>>(D, (const bf16_t *)dout,
                                                                          (const bf16_t *)out, N * H, Dv);
  CUDA_CHECK_LAUNCH();
  const int qk_row = H * Dqk, v_row = H * Dv;
  for (int b = 0; b < B; b++)
    for (int q0 = 0; q0 < T; q0 += Qb) {
      int rows = T - q0 < Qb ? T - q0 : Qb, keys = q0 + rows;
      const long long s_stride = (long long)rows * T;
      const bf16 *qb = q + ((size_t)b * T + q0) * qk_row, *kb = k + (size_t)b * T * qk_row;
      const bf16 *vb = v + (size_t)b * T * v_row, *dob = dout + ((size_t)b * T + q0) * v_row;
      gemm_cuda(false, true, rows, keys, Dqk, scale, qb, qk_row, Dqk, kb, qk_row, Dqk, 0.0f, S, T, s_stride, true, H);
      probabilities_kernel<<<dim3(rows, H), SOFTMAX_THREADS, 0, device_stream()>>>((bf16_t *)P, S, lse, doc_begin, b,
                                                                                   q0, rows, keys, T, H);
      CUDA_CHECK_LAUNCH();
      // dV += P^T dO; dP = dO V^T (into S); dS = P (dP - D) (into P).
      gemm_cuda(true, false, keys, Dv, rows, 1.0f, P, T, s_stride, dob, v_row, Dv, 1.0f,
                dv_acc + (size_t)b * T * v_row, v_row, Dv, true, H);
      gemm_cuda(false, true, rows, keys, Dv, 1.0f, dob, v_row, Dv, vb, v_row, Dv, 0.0f, S, T, s_stride, true, H);
      score_grad_kernel<<<dim3(rows, H), SOFTMAX_THREADS, 0, device_stream()>>>((bf16_t *)P, S, D, b, q0, rows, keys,
                                                                                T, H);
      CUDA_CHECK_LAUNCH();
      // dQ = scale dS K; dK += scale dS^T Q.
      gemm_cuda(false, false, rows, Dqk, keys, scale, P, T, s_stride, kb, qk_row, Dqk, 0.0f,
                dq + ((size_t)b * T + q0) * qk_row, qk_row, Dqk, false, H);
      gemm_cuda(true, false, keys, Dqk, rows, scale, P, T, s_stride, qb, qk_row, Dqk, 1.0f,
                dk_acc + (size_t)b * T * qk_row, qk_row, Dqk, true, H);
    }
  device_float_to_bf16(dk, dk_acc, N * H * Dqk);
  device_float_to_bf16(dv, dv_acc, N * H * Dv);
}
