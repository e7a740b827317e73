// Muon on the GPU for a batch of equal-shaped matrices anywhere in the weight, momentum and gradient
// arrays (every expert of every layer, or every layer's q projection: one call each); see muon.h. Per step:
//   1. momentum and the Nesterov look-ahead U in fp32, with per-matrix partial sums of U^2;
//   2. X = U / (||U||_F + 1e-7) per matrix in fp32 (partials added in a fixed order), stored in bf16;
//   3. Newton-Schulz: three strided-batched cuBLASLt GEMMs per iteration, bf16 operands and outputs,
//      fp32 accumulation. The b A and a X terms enter through the GEMMs' beta, from the same bf16 A
//      and X that the products use: near convergence a X and B X nearly cancel (B ~ (1 - a) I), so
//      adding an fp32 a X to a B X computed from the bf16 X leaves (a - 1) times X's rounding error
//      behind. Against the fp64 CPU step that mixed version (fp32 X between GEMMs) was off by
//      1.6-2.4e-2 relative in the weight update, this consistent one by 1.0-1.2e-2, and it moves
//      fewer bytes;
//   4. weight -= lr (0.2 sqrt(max(rows, cols)) X + weight_decay weight).
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
// Matrices per group of batched GEMMs: a group's two bf16 iterates hold at most this many elements
// each (512 MiB together), so a layer of many large experts does not need scratch for all at once.
#define MUON_GROUP_ELEMENTS ((size_t)1 << 27)

// Blocks per matrix for the elementwise passes: enough to fill the GPU for one large matrix; fixed
// by the shape alone, so the sums of squares (and the whole step) are deterministic.
static int blocks_per_matrix(size_t n) {
  size_t blocks = (n + 8 * MUON_THREADS - 1) / (8 * MUON_THREADS);
  return blocks < 1 ? 1 : blocks > 1024 ? 1024 : (int)blocks;
}

// Grid (chunks, batch); matrix b starts at element offsets[b]. momentum = mu momentum + s g;
// partial[b, chunk] = the chunk's sum of U^2, U = s g + mu momentum (Nesterov) or momentum.
static __global__ void muon_momentum_kernel(float *partial, float *momentum, const float *grad, size_t n,
                                            const long long *offsets, float mu, bool nesterov, float grad_scale) {
  __shared__ float shared[32];
  const size_t b = blockIdx.y;
  float *mom = momentum + offsets[b];
  const float *g = grad + offsets[b];
  float sum = 0.0f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i] * grad_scale, m = mu * mom[i] + gi;
    mom[i] = m;
    float u = nesterov ? gi + mu * m : m;
    sum += u * u;
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
}

// Grid (chunks, batch). x = bf16(U / (||U||_F + 1e-7)), U recomputed from the new momentum; every
// block adds the same partials in the same order.
static __global__ void muon_normalize_kernel(bf16_t *x, const float *partial, const float *momentum, const float *grad,
                                             size_t n, const long long *offsets, float mu, bool nesterov,
                                             float grad_scale) {
  __shared__ float inverse_norm;
  const size_t b = blockIdx.y;
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (unsigned c = 0; c < gridDim.x; c++) sum += partial[b * gridDim.x + c];
    inverse_norm = 1.0f / (sqrtf(sum) + 1e-7f);
  }
  __syncthreads();
  const float scale = inverse_norm;
  const float *mom = momentum + offsets[b], *g = grad + offsets[b];
  bf16_t *out = x + b * n;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float m = mom[i], u = nesterov ? g[i] * grad_scale + mu * m : m;
    out[i] = __float2bfloat16(u * scale);
  }
}

// Grid (chunks, batch). weight -= lr (scale X + decay weight), also into weight_bf16 when not NULL.
static __global__ void muon_apply_kernel(float *weight, bf16_t *weight_bf16, const bf16_t *x, size_t n,
                                         const long long *offsets, float lr, float scale, float decay) {
  const size_t b = blockIdx.y;
  float *w = weight + offsets[b];
  bf16_t *w16 = weight_bf16 ? weight_bf16 + offsets[b] : NULL;
  const bf16_t *u = x + b * n;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float wi = w[i];
    wi -= lr * (scale * __bfloat162float(u[i]) + decay * wi);
    w[i] = wi;
    if (w16) w16[i] = __float2bfloat16(wi);
  }
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

// One group of `batch` matrices at element offsets (device array).
static void muon_group(float *weight, bf16 *weight_bf16, float *momentum, const float *grad, const long long *offsets,
                       int rows, int cols, int batch, const MuonConfig *config, float lr, float grad_scale) {
  const size_t n = (size_t)rows * cols, total = n * batch;
  const int m = rows < cols ? rows : cols;
  const size_t mm = (size_t)m * m;
  const int chunks = blocks_per_matrix(n);
  size_t at_x_next = aligned(total * 2), at_gram = 2 * at_x_next, at_poly = at_gram + aligned(mm * batch * 2);
  size_t at_partial = at_poly + aligned(mm * batch * 2);
  char *base = (char *)muon_scratch(at_partial + aligned((size_t)batch * chunks * 4));
  bf16 *x = (bf16 *)base;                       // (batch, rows, cols) iterate
  bf16 *x_next = (bf16 *)(base + at_x_next);    // (batch, rows, cols)
  bf16 *gram = (bf16 *)(base + at_gram);        // (batch, m, m) A
  bf16 *poly = (bf16 *)(base + at_poly);        // (batch, m, m) B = b A + c A A
  float *partial = (float *)(base + at_partial);

  const dim3 grid(chunks, batch);
  const float mu = (float)config->momentum;
  muon_momentum_kernel<<<grid, MUON_THREADS, 0, device_stream()>>>(partial, momentum, grad, n, offsets, mu,
                                                                   config->nesterov, grad_scale);
  CUDA_CHECK_LAUNCH();
  muon_normalize_kernel<<<grid, MUON_THREADS, 0, device_stream()>>>((bf16_t *)x, partial, momentum, grad, n, offsets,
                                                                    mu, config->nesterov, grad_scale);
  CUDA_CHECK_LAUNCH();

  // As on the CPU, iterate on the wide orientation: a tall X uses A = X^T X and X' = a X + X B^T.
  const bool tall = rows > cols;
  const long long sn = (long long)n, smm = (long long)mm;
  for (int step = 0; step < config->ns_steps; step++) {
    if (tall) gemm_cuda(true, false, m, m, rows, 1.0f, x, cols, sn, x, cols, sn, 0.0f, gram, m, smm, false, batch);
    else gemm_cuda(false, true, m, m, cols, 1.0f, x, cols, sn, x, cols, sn, 0.0f, gram, m, smm, false, batch);
    device_copy(poly, gram, mm * batch * sizeof(bf16));
    gemm_cuda(false, false, m, m, m, NS_C, gram, m, smm, gram, m, smm, NS_B, poly, m, smm, false, batch);
    device_copy(x_next, x, total * sizeof(bf16));
    if (tall)
      gemm_cuda(false, true, rows, cols, cols, 1.0f, x, cols, sn, poly, m, smm, NS_A, x_next, cols, sn, false, batch);
    else gemm_cuda(false, false, rows, cols, rows, 1.0f, poly, m, smm, x, cols, sn, NS_A, x_next, cols, sn, false, batch);
    bf16 *swap = x;
    x = x_next;
    x_next = swap;
  }
  const float scale = (float)(MUON_UPDATE_RMS * sqrt((double)(rows > cols ? rows : cols)));
  muon_apply_kernel<<<grid, MUON_THREADS, 0, device_stream()>>>(weight, (bf16_t *)weight_bf16, (const bf16_t *)x, n, offsets, lr, scale,
                                                                (float)config->weight_decay);
  CUDA_CHECK_LAUNCH();
}

extern "C" void muon_step_cuda(float *weight, bf16 *weight_bf16, float *momentum, const float *grad, const long long *offsets,
                               int rows, int cols, int batch, const MuonConfig *config, float lr, float grad_scale) {
  CHECK(rows > 0 && cols > 0 && batch > 0 && config->ns_steps >= 0, "bad Muon shape (%d, %d) x %d or steps %d",
        rows, cols, batch, config->ns_steps);
  const size_t n = (size_t)rows * cols;
  size_t group = MUON_GROUP_ELEMENTS / n;
  if (group < 1) group = 1;
  if (group > 65535) group = 65535;  // the grid's y dimension
  for (int first = 0; first < batch; first += (int)group) {
    int count = batch - first < (int)group ? batch - first : (int)group;
    muon_group(weight, weight_bf16, momentum, grad, offsets + first, rows, cols, count, config, lr, grad_scale);
  }
}
