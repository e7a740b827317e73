// MLA k/v assembly and its backward; see mla_layout.h. One thread per output element: these are pure
// copies (and one small sum over heads), bound by memory bandwidth.
#include "kernels/cuda_common.cuh"
#include "kernels/mla_layout.h"

static __global__ void split_kv_kernel(bf16_t *k, bf16_t *v, const bf16_t *kv, const bf16_t *compressed, int N,
                                       int H, int Dn, int Dr, int Dv, int R) {
  const int Dqk = Dn + Dr, width = Dqk + Dv;  // per (n, h): k columns then v columns
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * H * width) return;
  int c = (int)(i % width);
  size_t nh = i / width, n = nh / H;
  const bf16_t *kv_row = kv + nh * (Dn + Dv);
  if (c < Dn) k[nh * Dqk + c] = kv_row[c];
  else if (c < Dqk) k[nh * Dqk + c] = compressed[n * (R + Dr) + R + (c - Dn)];
  else v[nh * Dv + (c - Dqk)] = kv_row[Dn + (c - Dqk)];
}

static __global__ void merge_kv_grad_kernel(bf16_t *dkv, bf16_t *dcompressed, const bf16_t *dk, const bf16_t *dv,
                                            int N, int H, int Dn, int Dr, int Dv, int R) {
  const int Dqk = Dn + Dr, per_token = H * (Dn + Dv) + Dr;  // dkv columns of all heads, then dk_pe
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= (size_t)N * per_token) return;
  int c = (int)(i % per_token);
  size_t n = i / per_token;
  if (c < H * (Dn + Dv)) {
    int h = c / (Dn + Dv), j = c % (Dn + Dv);
    size_t nh = n * H + h;
    dkv[nh * (Dn + Dv) + j] = j < Dn ? dk[nh * Dqk + j] : dv[nh * Dv + (j - Dn)];
  } else {
    int j = c - H * (Dn + Dv);
    float sum = 0.0f;
    for (int h = 0; h < H; h++) sum += __bfloat162float(dk[(n * H + h) * Dqk + Dn + j]);
    dcompressed[n * (R + Dr) + R + j] = __float2bfloat16(sum);
  }
}

extern "C" void mla_split_kv_cuda(bf16 *k, bf16 *v, const bf16 *kv, const bf16 *compressed, int N, int H, int Dn,
                                  int Dr, int Dv, int R) {
  size_t total = (size_t)N * H * (Dn + Dr + Dv);
  if (total == 0) return;
  split_kv_kernel<<<ceil_div(total, 256), 256, 0, device_stream()>>>((bf16_t *)k, (bf16_t *)v, (const bf16_t *)kv,
                                                                     (const bf16_t *)compressed, N, H, Dn, Dr, Dv, R);
  CUDA_CHECK_LAUNCH();
}

extern "C" void mla_merge_kv_grad_cuda(bf16 *dkv, bf16 *dcompressed, const bf16 *dk, const bf16 *dv, int N, int H,
                                       int Dn, int Dr, int Dv, int R) {
  size_t total = (size_t)N * (H * (Dn + Dv) + Dr);
  if (total == 0) return;
  merge_kv_grad_kernel<<<ceil_div(total, 256), 256, 0, device_stream()>>>(
      (bf16_t *)dkv, (bf16_t *)dcompressed, (const bf16_t *)dk, (const bf16_t *)dv, N, H, Dn, Dr, Dv, R);
  CUDA_CHECK_LAUNCH();
}
