// AdamW on the GPU: one elementwise pass over fp32 master weights and states; see adamw.h.
#include <math.h>

#include "kernels/cuda_common.cuh"
#include "optim/adamw.h"

// The bias corrections are folded into two factors on the host (in double, as the CPU does):
// update = (m / c1) / (sqrt(v / c2) + eps) = m * step_scale / (sqrt(v) * root_scale + eps).
static __global__ void adamw_kernel(float *weight, bf16_t *weight_bf16, float *first_moment, float *second_moment,
                                    const float *grad, size_t n, float beta1, float beta2, float inverse_correction1,
                                    float inverse_root_correction2, float eps, float lr, float decay,
                                    float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float g = grad[i] * grad_scale;
    float m = beta1 * first_moment[i] + (1.0f - beta1) * g;
    float v = beta2 * second_moment[i] + (1.0f - beta2) * g * g;
    first_moment[i] = m;
    second_moment[i] = v;
    float update = (m * inverse_correction1) / (sqrtf(v) * inverse_root_correction2 + eps);
    float w = weight[i];
    w -= lr * (update + decay * w);
    weight[i] = w;
    if (weight_bf16) weight_bf16[i] = __float2bfloat16(w);
  }
}

extern "C" void adamw_step_cuda(float *weight, bf16 *weight_bf16, float *first_moment, float *second_moment,
                                const float *grad, size_t n, const AdamWConfig *config, float lr, long step,
                                float grad_scale) {
  CHECK(step >= 1, "AdamW step counter is 1-based, got %ld", step);
  if (n == 0) return;
  double correction1 = 1.0 - pow(config->beta1, (double)step);
  double correction2 = 1.0 - pow(config->beta2, (double)step);
  // One thread per element up to a grid the GPU holds many times over; beyond that grid-stride.
  size_t blocks = (n + 255) / 256;
  if (blocks > 65536) blocks = 65536;
  adamw_kernel<<<(unsigned)blocks, 256, 0, device_stream()>>>(
      weight, (bf16_t *)weight_bf16, first_moment, second_moment, grad, n, (float)config->beta1, (float)config->beta2,
      (float)(1.0 / correction1), (float)(1.0 / sqrt(correction2)), (float)config->eps, lr,
      (float)config->weight_decay, grad_scale);
  CUDA_CHECK_LAUNCH();
}
