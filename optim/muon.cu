// Muon on the GPU for one matrix or a batch of equal-shaped matrices at a fixed element stride (a
// layer's experts); see muon.h. Per step:
//   1. momentum and the Nesterov look-ahead in fp32, with per-matrix partial sums of squares;
//   2. the Frobenius normalization per matrix in fp32 (partials added in a fixed order);
//   3. Newton-Schulz: three strided-batched cuBLASLt GEMMs per iteration with bf16 operands and fp32
//      outputs. The iterate X and the Gram matrix A stay in fp32 between GEMMs (cuBLASLt adds the
//      a X and b A terms in fp32 through beta, in place); only their copies fed to the next GEMM are
//      rounded to bf16. Rounding the iterate itself to bf16 every step (as bf16-only versions do)
//      roughly doubles the error against the fp64 reference;
//   4. weight -= lr (0.2 sqrt(max(rows, cols)) X + weight_decay weight), X in fp32.
#include <math.h>

#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"
#include "optim/muon.h"

// As in optim/muon.c.
#define NS_A 3.4445f
#define NS_B (-4.7750f)
#define NS_C 2.0315f
#define MUON_UPDATE_RMS 0.2

#define MUON_THREADS 256
// Matrices per group of batched GEMMs: a group's iterate holds at most this many elements (fp32 +
// bf16 copies: 384 MiB), so a layer of many large experts does not need scratch for all at once.
#define MUON_GROUP_ELEMENTS ((size_t)1 << 26)

// Blocks per matrix for the elementwise passes: enough to fill the GPU for one large matrix; fixed
// by the shape alone, so the sums of squares (and the whole step) are deterministic.
static int blocks_per_matrix(size_t n) {
  size_t blocks = (n + 8 * MUON_THREADS - 1) / (8 * MUON_THREADS);
  return blocks < 1 ? 1 : blocks > 1024 ? 1024 : (int)blocks;
}

// Grid (chunks, batch). momentum = mu momentum + s g; u = s g + mu momentum (Nesterov) or momentum,
// packed (batch, n) into x; partial[b, chunk] = the chunk's sum of u^2.
static __global__ void muon_momentum_kernel(float *x, float *partial, float *momentum, const float *grad, size_t n,
                                            long long stride, float mu, bool nesterov, float grad_scale) {
  __shared__ float shared[32];
  const size_t b = blockIdx.y;
  float *mom = momentum + b * stride;
  const float *g = grad + b * stride;
  float *u = x + b * n;
  float sum = 0.0f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i] * grad_scale, m = mu * mom[i] + gi;
    mom[i] = m;
    float ui = nesterov ? gi + mu * m : m;
    u[i] = ui;
    sum += ui * ui;
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
}

// Grid (chunks, batch). x /= (||x||_F + 1e-7) per matrix, and its bf16 copy. Every block adds the
// same partials in the same order.
static __global__ void muon_normalize_kernel(float *x, bf16_t *x_bf16, const float *partial, size_t n) {
  __shared__ float inverse_norm;
  const size_t b = blockIdx.y;
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (unsigned c = 0; c < gridDim.x; c++) sum += partial[b * gridDim.x + c];
    inverse_norm = 1.0f / (sqrtf(sum) + 1e-7f);
  }
  __syncthreads();
  const float scale = inverse_norm;
  float *u = x + b * n;
  bf16_t *out = x_bf16 + b * n;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = u[i] * scale;
    u[i] = v;
    out[i] = __float2bfloat16(v);
  }
}

static __global__ void to_bf16_kernel(bf16_t *out, const float *in, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

// Grid (chunks, batch). weight -= lr (scale X + decay weight).
static __global__ void muon_apply_kernel(float *weight, const float *x, size_t n, long long stride, float lr,
                                         float scale, float decay) {
  const size_t b = blockIdx.y;
  float *w = weight + b * stride;
  const float *u = x + b * n;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float wi = w[i];
    w[i] = wi - lr * (scale * u[i] + decay * wi);
  }
}

static void launch_to_bf16(bf16 *out, const float *in, size_t n) {
  size_t blocks = (n + MUON_THREADS - 1) / MUON_THREADS;
  if (blocks > 65536) blocks = 65536;
  to_bf16_kernel<<<(unsigned)blocks, MUON_THREADS, 0, device_stream()>>>((bf16_t *)out, in, n);
  CUDA_CHECK_LAUNCH();
}

// Scratch of the process, grown on demand (the old buffer may still be read by queued work: sync).
static void *muon_scratch(size_t bytes) {
  static void *buffer;
  static size_t size;
  if (bytes > size) {
    device_synchronize();
    device_free(buffer);
    buffer = device_alloc(bytes);
    size = bytes;
  }
  return buffer;
}
static size_t aligned(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

// One group of `batch` matrices (stride > 0 between them).
static void muon_group(float *weight, float *momentum, const float *grad, int rows, int cols, long long stride,
                       int batch, const MuonConfig *config, float lr, float grad_scale) {
  const size_t n = (size_t)rows * cols, total = n * batch;
  const int m = rows < cols ? rows : cols;
  const size_t mm = (size_t)m * m;
  const int chunks = blocks_per_matrix(n);
  size_t at_x = 0, at_xb = at_x + aligned(total * 4), at_gram = at_xb + aligned(total * 2);
  size_t at_gram_b = at_gram + aligned(mm * batch * 4), at_partial = at_gram_b + aligned(mm * batch * 2);
  char *base = (char *)muon_scratch(at_partial + aligned((size_t)batch * chunks * 4));
  float *x = (float *)(base + at_x);           // (batch, rows, cols) fp32 iterate
  bf16 *xb = (bf16 *)(base + at_xb);           // its bf16 copy
  float *gram = (float *)(base + at_gram);     // (batch, m, m) A, then B = b A + c A A, fp32
  bf16 *gram_b = (bf16 *)(base + at_gram_b);   // bf16 copy of A, then of B
  float *partial = (float *)(base + at_partial);

  const dim3 grid(chunks, batch);
  muon_momentum_kernel<<<grid, MUON_THREADS, 0, device_stream()>>>(x, partial, momentum, grad, n, stride,
                                                                   (float)config->momentum, config->nesterov,
                                                                   grad_scale);
  CUDA_CHECK_LAUNCH();
  muon_normalize_kernel<<<grid, MUON_THREADS, 0, device_stream()>>>(x, (bf16_t *)xb, partial, n);
  CUDA_CHECK_LAUNCH();

  // As on the CPU, iterate on the wide orientation: a tall X uses A = X^T X and X' = a X + X B^T.
  const bool tall = rows > cols;
  const long long sn = (long long)n, smm = (long long)mm;
  for (int step = 0; step < config->ns_steps; step++) {
    if (tall) gemm_cuda(true, false, m, m, rows, 1.0f, xb, cols, sn, xb, cols, sn, 0.0f, gram, m, smm, true, batch);
    else gemm_cuda(false, true, m, m, cols, 1.0f, xb, cols, sn, xb, cols, sn, 0.0f, gram, m, smm, true, batch);
    launch_to_bf16(gram_b, gram, mm * batch);
    gemm_cuda(false, false, m, m, m, NS_C, gram_b, m, smm, gram_b, m, smm, NS_B, gram, m, smm, true, batch);
    launch_to_bf16(gram_b, gram, mm * batch);
    if (tall) gemm_cuda(false, true, rows, cols, cols, 1.0f, xb, cols, sn, gram_b, m, smm, NS_A, x, cols, sn, true, batch);
    else gemm_cuda(false, false, rows, cols, rows, 1.0f, gram_b, m, smm, xb, cols, sn, NS_A, x, cols, sn, true, batch);
    if (step + 1 < config->ns_steps) launch_to_bf16(xb, x, total);
  }
  const float scale = (float)(MUON_UPDATE_RMS * sqrt((double)(rows > cols ? rows : cols)));
  muon_apply_kernel<<<grid, MUON_THREADS, 0, device_stream()>>>(weight, x, n, stride, lr, scale,
                                                                (float)config->weight_decay);
  CUDA_CHECK_LAUNCH();
}

extern "C" void muon_step_cuda(float *weight, float *momentum, const float *grad, int rows, int cols,
                               long long stride, int batch, const MuonConfig *config, float lr, float grad_scale) {
  CHECK(rows > 0 && cols > 0 && batch > 0 && config->ns_steps >= 0, "bad Muon shape (%d, %d) x %d or steps %d",
        rows, cols, batch, config->ns_steps);
  const size_t n = (size_t)rows * cols;
  if (batch == 1) stride = (long long)n;
  CHECK(stride >= (long long)n, "Muon batch stride %lld is below the matrix size %zu", stride, n);
  size_t group = MUON_GROUP_ELEMENTS / n;
  if (group < 1) group = 1;
  if (group > 65535) group = 65535;  // the grid's y dimension
  for (int first = 0; first < batch; first += (int)group) {
    int count = batch - first < (int)group ? batch - first : (int)group;
    size_t offset = (size_t)first * stride;
    muon_group(weight + offset, momentum + offset, grad + offset, rows, cols, stride, count, config, lr, grad_scale);
  }
}
