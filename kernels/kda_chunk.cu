// KDA on the GPU in its recurrent form, parallel over (row, head, state slice); see kda.h.
// Thread a of a block owns row a of the (K, SLICE) state slice in registers. The state update
//   A = diag(exp g) S;  u = beta (v - A^T k);  S' = A + k u^T;  o = scale S'^T q = scale (A^T q + (q.k) u)
// needs the column sums A^T k and A^T q over the K threads: one halving shuffle reduction of 32 values per
// warp, then the K / 32 warps through shared memory. Per chunk of 32 tokens, q, k, g, v, beta and the
// document starts are staged in shared memory with coalesced loads, so the token loop touches no
// global memory on its critical path.
#include "kernels/cuda_common.cuh"
#include "kernels/kda.h"

#define SLICE 16       // state columns per block
#define CHUNK 32       // tokens staged in shared memory at a time; checkpoint / replay chunk of the backward
#define MAX_WARPS 4    // K <= 128

#define AT(b, t, h, X) ((((size_t)(b) * T + (t)) * H + (h)) * (X))

static inline __device__ bool resets(const unsigned char *doc_start, int b, int t, int T) {
  return doc_start && t > 0 && doc_start[(size_t)b * T + t];
}

// Reduces x[0..2*SLICE) over the warp's lanes by halving exchanges: afterwards lane L holds the warp
// sum of value L (31 shuffles instead of 32 * 5).
static inline __device__ float warp_reduce_32(float x[2 * SLICE]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int half = 16; half >= 1; half >>= 1) {
    const bool upper = lane & half;
#pragma unroll
    for (int i = 0; i < half; i++) {
      float send = upper ? x[i] : x[i + half], keep = upper ? x[i + half] : x[i];
      x[i] = keep + __shfl_xor_sync(0xffffffffu, send, half);
    }
  }
  return x[0];
}
// Same for SLICE values: lane L ends with the sum of value L >> 1.
static inline __device__ float warp_reduce_16(float x[SLICE]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int half = 16; half >= 2; half >>= 1) {
    const bool upper = lane & half;
    const int width = half / 2;
#pragma unroll
    for (int i = 0; i < width; i++) {
      float send = upper ? x[i] : x[i + width], keep = upper ? x[i + width] : x[i];
      x[i] = keep + __shfl_xor_sync(0xffffffffu, send, half);
    }
  }
  return x[0] + __shfl_xor_sync(0xffffffffu, x[0], 1);
}

// Forward over all tokens for one (b, h, slice). Writes out (if not NULL), the final state, and the state
// entering every CHUNK-token chunk (before that token's reset) to checkpoints (if not NULL).
// The tokens [t0, t0 + n) of (b, h) staged for the token loops: q, k in bf16, g, v (this slice), beta.
struct Staged {
  bf16_t q[CHUNK][32 * MAX_WARPS], k[CHUNK][32 * MAX_WARPS];
  float g[CHUNK][32 * MAX_WARPS], v[CHUNK][SLICE], beta[CHUNK];
  bool reset[CHUNK];
};

static inline __device__ void stage_chunk(Staged *st, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                                          const float *g, const float *beta, const unsigned char *doc_start, int b,
                                          int h, int t0, int n, int col0, int T, int H, int K, int V) {
  for (int i = threadIdx.x; i < n * K; i += blockDim.x) {
    int token = i / K, a = i % K;
    size_t at = AT(b, t0 + token, h, K) + a;
    if (q) st->q[token][a] = q[at];
    st->k[token][a] = k[at];
    st->g[token][a] = g[at];
  }
  for (int i = threadIdx.x; i < n * SLICE; i += blockDim.x)
    st->v[i / SLICE][i % SLICE] = __bfloat162float(v[AT(b, t0 + i / SLICE, h, V) + col0 + i % SLICE]);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    st->beta[i] = beta[((size_t)b * T + t0 + i) * H + h];
    st->reset[i] = resets(doc_start, b, t0 + i, T);
  }
}

// Forward over all tokens for one (b, h, slice). Writes out (if not NULL), the final state, and the state
// entering every CHUNK-token chunk (before that token's reset) to checkpoints (if not NULL).
static __global__ void kda_forward_kernel(bf16_t *out, float *final_state, float *checkpoints, const bf16_t *q,
                                          const bf16_t *k, const bf16_t *v, const float *g, const float *beta,
                                          const float *initial_state, const unsigned char *doc_start, float scale,
                                          int T, int H, int K, int V) {
  __shared__ float reduced[2][MAX_WARPS][2 * SLICE + 1];
  __shared__ Staged st;
  const int slices = V / SLICE, slice = blockIdx.x % slices, h = (blockIdx.x / slices) % H;
  const int b = blockIdx.x / (slices * H), a = threadIdx.x, lane = a & 31, warp = a >> 5, warps = K / 32;
  const int col0 = slice * SLICE;
  const size_t state_base = (((size_t)b * H + h) * K + a) * V + col0;
  float S[SLICE];
#pragma unroll
  for (int c = 0; c < SLICE; c++) S[c] = initial_state ? initial_state[state_base + c] : 0.0f;
  for (int t0 = 0; t0 < T; t0 += CHUNK) {
    const int n = min(CHUNK, T - t0);
    if (checkpoints) {
      float *ck = checkpoints + ((((size_t)b * H + h) * ((T + CHUNK - 1) / CHUNK) + t0 / CHUNK) * K + a) * V + col0;
#pragma unroll
      for (int c = 0; c < SLICE; c++) ck[c] = S[c];
    }
    __syncthreads();
    stage_chunk(&st, out ? q : NULL, k, v, g, beta, doc_start, b, h, t0, n, col0, T, H, K, V);
    __syncthreads();
    for (int i = 0; i < n; i++) {
      const int t = t0 + i, parity = t & 1;
      if (st.reset[i])
#pragma unroll
        for (int c = 0; c < SLICE; c++) S[c] = 0.0f;
      const float ka = __bfloat162float(st.k[i][a]), qa = out ? __bfloat162float(st.q[i][a]) : 0.0f;
      const float decay = __expf(st.g[i][a]);
      float x[2 * SLICE];
#pragma unroll
      for (int c = 0; c < SLICE; c++) {
        S[c] *= decay;
        x[c] = ka * S[c];
        x[SLICE + c] = qa * S[c];
      }
      float mine = warp_reduce_32(x), qk = warp_sum(qa * ka);
      reduced[parity][warp][lane] = mine;
      if (lane == 0) reduced[parity][warp][2 * SLICE] = qk;
      __syncthreads();
      float kA[SLICE], qA_lane = 0.0f, qk_all = 0.0f;
#pragma unroll
      for (int c = 0; c < SLICE; c++) kA[c] = 0.0f;
      for (int w = 0; w < warps; w++) {
#pragma unroll
        for (int c = 0; c < SLICE; c++) kA[c] += reduced[parity][w][c];
        qk_all += reduced[parity][w][2 * SLICE];
      }
      const float bt = st.beta[i];
#pragma unroll
      for (int c = 0; c < SLICE; c++) S[c] += ka * bt * (st.v[i][c] - kA[c]);
      if (out && a < SLICE) {
        for (int w = 0; w < warps; w++) qA_lane += reduced[parity][w][SLICE + a];
        float u = bt * (st.v[i][a] - kA[a]);
        out[AT(b, t, h, V) + col0 + a] = __float2bfloat16(scale * (qA_lane + qk_all * u));
      }
    }
  }
  if (final_state)
#pragma unroll
    for (int c = 0; c < SLICE; c++) final_state[state_base + c] = S[c];
}

// Backward for one (b, h, slice): chunks in reverse; each is replayed from its checkpoint (states entering
// each token to `replay`, r = v - A^T k to shared memory), then walked backwards carrying dS.
static __global__ void kda_backward_kernel(float *dq_part, float *dk_part, float *dg_part, float *dbeta_part,
                                           bf16_t *dv, float *dinitial_state, float *replay, const float *checkpoints,
                                           const bf16_t *dout, const float *dfinal_state, const bf16_t *q,
                                           const bf16_t *k, const bf16_t *v, const float *g, const float *beta,
                                           const unsigned char *doc_start, float scale, int T, int H, int K, int V) {
  __shared__ float reduced[2][MAX_WARPS][2 * SLICE + 1];
  __shared__ Staged st;
  __shared__ float r_chunk[CHUNK][SLICE], do_chunk[CHUNK][SLICE], du_shared[2][SLICE];
  const int slices = V / SLICE, slice = blockIdx.x % slices, h = (blockIdx.x / slices) % H;
  const int b = blockIdx.x / (slices * H), a = threadIdx.x, lane = a & 31, warp = a >> 5, warps = K / 32;
  const int col0 = slice * SLICE, chunks = (T + CHUNK - 1) / CHUNK;
  const size_t state_base = (((size_t)b * H + h) * K + a) * V + col0;
  float *my_replay = replay + ((size_t)blockIdx.x * CHUNK * K + a) * SLICE;  // token i at + i * K * SLICE
  float dS[SLICE];
#pragma unroll
  for (int c = 0; c < SLICE; c++) dS[c] = dfinal_state ? dfinal_state[state_base + c] : 0.0f;
  for (int chunk = chunks - 1; chunk >= 0; chunk--) {
    const int t0 = chunk * CHUNK, n = min(CHUNK, T - t0);
    __syncthreads();
    stage_chunk(&st, q, k, v, g, beta, doc_start, b, h, t0, n, col0, T, H, K, V);
    for (int i = a; i < n * SLICE; i += blockDim.x)
      do_chunk[i / SLICE][i % SLICE] = __bfloat162float(dout[AT(b, t0 + i / SLICE, h, V) + col0 + i % SLICE]);
    __syncthreads();
    // Replay: the state entering each token (after its reset) and r.
    float S[SLICE];
    const float *ck = checkpoints + ((((size_t)b * H + h) * chunks + chunk) * K + a) * V + col0;
#pragma unroll
    for (int c = 0; c < SLICE; c++) S[c] = ck[c];
    for (int i = 0; i < n; i++) {
      const int parity = (t0 + i) & 1;
      if (st.reset[i])
#pragma unroll
        for (int c = 0; c < SLICE; c++) S[c] = 0.0f;
      float *slot = my_replay + (size_t)i * K * SLICE;
#pragma unroll
      for (int c = 0; c < SLICE; c++) slot[c] = S[c];
      const float ka = __bfloat162float(st.k[i][a]), decay = __expf(st.g[i][a]);
      float x[SLICE];
#pragma unroll
      for (int c = 0; c < SLICE; c++) {
        S[c] *= decay;
        x[c] = ka * S[c];
      }
      float mine = warp_reduce_16(x);
      if ((lane & 1) == 0) reduced[parity][warp][lane >> 1] = mine;
      __syncthreads();
      const float bt = st.beta[i];
#pragma unroll
      for (int c = 0; c < SLICE; c++) {
        float kA = 0.0f;
        for (int w = 0; w < warps; w++) kA += reduced[parity][w][c];
        float r = st.v[i][c] - kA;
        if (a == 0) r_chunk[i][c] = r;
        S[c] += ka * bt * r;
      }
    }
    __syncthreads();
    // Reverse walk.
    for (int i = n - 1; i >= 0; i--) {
      const int t = t0 + i, parity = t & 1;
      const float *slot = my_replay + (size_t)i * K * SLICE;
      const float ka = __bfloat162float(st.k[i][a]), qa = __bfloat162float(st.q[i][a]);
      const float decay = __expf(st.g[i][a]), bt = st.beta[i];
      float A[SLICE], u[SLICE], dq_sum = 0.0f;
#pragma unroll
      for (int c = 0; c < SLICE; c++) {
        A[c] = decay * slot[c];
        u[c] = bt * r_chunk[i][c];
        float St = A[c] + ka * u[c], dout_c = do_chunk[i][c];
        dS[c] += scale * qa * dout_c;
        dq_sum += St * dout_c;
      }
      float x[SLICE];
#pragma unroll
      for (int c = 0; c < SLICE; c++) x[c] = dS[c] * ka;
      float mine = warp_reduce_16(x);
      if ((lane & 1) == 0) reduced[parity][warp][lane >> 1] = mine;
      __syncthreads();
      if (a < SLICE) {
        float du = 0.0f;
        for (int w = 0; w < warps; w++) du += reduced[parity][w][a];
        du_shared[parity][a] = du;
      }
      __syncthreads();
      float du[SLICE], dk_sum = 0.0f, dg_sum = 0.0f;
#pragma unroll
      for (int c = 0; c < SLICE; c++) du[c] = du_shared[parity][c];
#pragma unroll
      for (int c = 0; c < SLICE; c++) {
        dk_sum += dS[c] * u[c] - bt * A[c] * du[c];
        dS[c] -= bt * ka * du[c];
        dg_sum += dS[c] * A[c];
        dS[c] *= decay;
      }
      const size_t part = (((size_t)b * T + t) * H + h) * slices + slice;
      dq_part[part * K + a] = scale * dq_sum;
      dk_part[part * K + a] = dk_sum;
      dg_part[part * K + a] = dg_sum;
      if (a < SLICE) dv[AT(b, t, h, V) + col0 + a] = __float2bfloat16(bt * du[a]);
      if (a == 0) {
        float db = 0.0f;
        for (int c = 0; c < SLICE; c++) db += du[c] * r_chunk[i][c];
        dbeta_part[part] = db;
      }
      if (st.reset[i])
#pragma unroll
        for (int c = 0; c < SLICE; c++) dS[c] = 0.0f;
    }
  }
  if (dinitial_state)
#pragma unroll
    for (int c = 0; c < SLICE; c++) dinitial_state[state_base + c] = dS[c];
}

// Sums the per-slice partials in slice order.
static __global__ void kda_sum_slices_kernel(bf16_t *dq, bf16_t *dk, float *dg, float *dbeta, const float *dq_part,
                                             const float *dk_part, const float *dg_part, const float *dbeta_part,
                                             size_t rows, int slices, int K) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;  // (row = (b, t, h), a)
  if (i >= rows * K) return;
  size_t row = i / K;
  int a = (int)(i % K);
  float sq = 0.0f, sk = 0.0f, sg = 0.0f;
  for (int s = 0; s < slices; s++) {
    size_t at = (row * slices + s) * K + a;
    sq += dq_part[at];
    sk += dk_part[at];
    sg += dg_part[at];
  }
  dq[i] = __float2bfloat16(sq);
  dk[i] = __float2bfloat16(sk);
  dg[i] = sg;
  if (a == 0) {
    float sb = 0.0f;
    for (int s = 0; s < slices; s++) sb += dbeta_part[row * slices + s];
    dbeta[row] = sb;
  }
}

static void check_shape(int K, int V) {
  CHECK(K % 32 == 0 && K <= 32 * MAX_WARPS && V % SLICE == 0 && V > 0,
        "KDA on the GPU needs K a multiple of 32 up to %d and V a multiple of %d (got K %d, V %d)", 32 * MAX_WARPS,
        SLICE, K, V);
}

extern "C" void kda_chunk_forward_cuda(bf16 *out, float *final_state, const bf16 *q, const bf16 *k, const bf16 *v,
                                       const float *g, const float *beta, const float *initial_state,
                                       const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                                       int V) {
  check_shape(K, V);
  if (B == 0 || T == 0) return;
  kda_forward_kernel<<<B * H * (V / SLICE), K, 0, device_stream()>>>(
      (bf16_t *)out, final_state, NULL, (const bf16_t *)q, (const bf16_t *)k, (const bf16_t *)v, g, beta,
      initial_state, doc_start, scale, T, H, K, V);
  CUDA_CHECK_LAUNCH();
}

extern "C" void kda_chunk_backward_cuda(bf16 *dq, bf16 *dk, bf16 *dv, float *dg, float *dbeta, float *dinitial_state,
                                        const bf16 *dout, const float *dfinal_state, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const float *g, const float *beta, const float *initial_state,
                                        const unsigned char *doc_start, float scale, int B, int T, int H, int K,
                                        int V) {
  check_shape(K, V);
  if (B == 0 || T == 0) return;
  const int slices = V / SLICE, blocks = B * H * slices, chunks = (T + CHUNK - 1) / CHUNK;
  const size_t rows = (size_t)B * T * H;
  float *checkpoints = (float *)device_scratch(2, (size_t)B * H * chunks * K * V * sizeof(float));
  float *replay = (float *)device_scratch(3, (size_t)blocks * CHUNK * K * SLICE * sizeof(float));
  float *parts = (float *)device_scratch(4, rows * slices * (3 * (size_t)K + 1) * sizeof(float));
  float *dq_part = parts, *dk_part = dq_part + rows * slices * K, *dg_part = dk_part + rows * slices * K;
  float *dbeta_part = dg_part + rows * slices * K;
  kda_forward_kernel<<<blocks, K, 0, device_stream()>>>(NULL, NULL, checkpoints, (const bf16_t *)q, (const bf16_t *)k,
                                                        (const bf16_t *)v, g, beta, initial_state, doc_start, scale,
                                                        T, H, K, V);
  CUDA_CHECK_LAUNCH();
  kda_backward_kernel<<<blocks, K, 0, device_stream()>>>(
      dq_part, dk_part, dg_part, dbeta_part, (bf16_t *)dv, dinitial_state, replay, checkpoints, (const bf16_t *)dout,
      dfinal_state, (const bf16_t *)q, (const bf16_t *)k, (const bf16_t *)v, g, beta, doc_start, scale, T, H, K, V);
  CUDA_CHECK_LAUNCH();
  kda_sum_slices_kernel<<<ceil_div(rows * K, 256), 256, 0, device_stream()>>>(
      (bf16_t *)dq, (bf16_t *)dk, dg, dbeta, dq_part, dk_part, dg_part, dbeta_part, rows, slices, K);
  CUDA_CHECK_LAUNCH();
}
