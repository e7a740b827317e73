// QK-Clip on the GPU: the host decides from the (host) max logits which heads to clip, then one
// launch per clipped head scales its rows of q_proj and kv_b_proj; see qk_clip.h.
#include <math.h>

#include "kernels/cuda_common.cuh"
#include "optim/qk_clip.h"

// Head h: q rows [0, Dn) by root, q rows [Dn, Dn + Dr) by gamma (one contiguous (Dn + Dr, C) block),
// then the Dn k_nope rows of kv_b_proj by root (a contiguous (Dn, L) block).
static __global__ void qk_clip_head_kernel(float *q_head, float *kv_head, size_t q_nope, size_t q_total,
                                           size_t kv_nope, float root, float gamma) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < q_total + kv_nope; i += stride) {
    if (i < q_total) q_head[i] *= i < q_nope ? root : gamma;
    else kv_head[i - q_total] *= root;
  }
}

extern "C" int qk_clip_apply_cuda(float *q_proj, float *kv_b_proj, const float *max_logit, float tau, int H, int Dn,
                                  int Dr, int Dv, int C, int L) {
  CHECK(tau > 0, "QK-Clip threshold must be positive, got %g", (double)tau);
  CHECK(H > 0 && Dn >= 0 && Dr >= 0 && Dv >= 0 && C > 0 && L > 0, "bad QK-Clip shape");
  int clipped = 0;
  for (int h = 0; h < H; h++) {
    if (!(max_logit[h] > tau)) continue;
    double gamma = (double)tau / (double)max_logit[h];
    clipped++;
    // A NULL matrix (owned by another rank of the sharded optimizer) is left out.
    float *q_head = q_proj ? q_proj + (size_t)h * (Dn + Dr) * C : NULL;         // (Dn + Dr, C)
    float *kv_head = kv_b_proj ? kv_b_proj + (size_t)h * (Dn + Dv) * L : NULL;  // (Dn + Dv, L)
    size_t q_nope = q_proj ? (size_t)Dn * C : 0, q_total = q_proj ? (size_t)(Dn + Dr) * C : 0;
    size_t kv_nope = kv_b_proj ? (size_t)Dn * L : 0;
    if (q_total + kv_nope == 0) continue;
    size_t blocks = (q_total + kv_nope + 255) / 256;
    if (blocks > 1024) blocks = 1024;
    if (blocks == 0) blocks = 1;
    qk_clip_head_kernel<<<(unsigned)blocks, 256, 0, device_stream()>>>(q_head, kv_head, q_nope, q_total, kv_nope,
                                                                        (float)sqrt(gamma), (float)gamma);
    CUDA_CHECK_LAUNCH();
  }
  return clipped;
}
