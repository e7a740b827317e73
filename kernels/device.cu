// Device memory, the stream and precision conversions; see device.h.
#include <stdio.h>

#include "kernels/cuda_common.cuh"

static cudaStream_t the_stream;
static bool have_stream;

extern "C" cudaStream_t device_stream(void) {
  if (!have_stream) {
    CUDA_CHECK(cudaStreamCreateWithFlags(&the_stream, cudaStreamNonBlocking));
    have_stream = true;
  }
  return the_stream;
}

extern "C" void device_select(int ordinal) {
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  if (ordinal >= count)
    klt_user_error("this node has %d GPU(s) but rank needs GPU %d: start at most %d ranks per node", count,
                   ordinal, count);
  CUDA_CHECK(cudaSetDevice(ordinal));
}

extern "C" void device_synchronize(void) { CUDA_CHECK(cudaStreamSynchronize(device_stream())); }

extern "C" void *device_alloc(size_t bytes) {
  void *p = NULL;
  if (bytes == 0) bytes = 1;
  cudaError_t status = cudaMalloc(&p, bytes);
  if (status != cudaSuccess) {
    size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    klt_user_error("GPU out of memory: %.2f GiB more were needed with %.2f of %.2f GiB free; use a smaller "
                   "train.micro_batch or seq_len",
                   bytes / 1073741824.0, free_bytes / 1073741824.0, total / 1073741824.0);
  }
  CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, device_stream()));
  return p;
}

extern "C" void device_free(void *ptr) {
  if (ptr) CUDA_CHECK(cudaFree(ptr));
}
extern "C" void device_upload(void *dst, const void *src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, device_stream()));
  device_synchronize();
}
extern "C" void device_download(void *dst, const void *src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, device_stream()));
  device_synchronize();
}
extern "C" void device_zero(void *ptr, size_t bytes) {
  CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, device_stream()));
}
extern "C" void device_copy(void *dst, const void *src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, device_stream()));
}

extern "C" void device_copy_2d(void *dst, size_t dst_pitch, const void *src, size_t src_pitch, size_t width_bytes,
                               size_t rows) {
  if (rows == 0 || width_bytes == 0) return;
  CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width_bytes, rows, cudaMemcpyDeviceToDevice,
                               device_stream()));
}

static __global__ void float_to_bf16_kernel(bf16_t *out, const float *inp, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16(inp[i]);
}
static __global__ void bf16_to_float_kernel(float *out, const bf16_t *inp, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) out[i] = __bfloat162float(inp[i]);
}
extern "C" void device_float_to_bf16(bf16 *out, const float *inp, size_t n) {
  if (n == 0) return;
  float_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>((bf16_t *)out, inp, n);
  CUDA_CHECK_LAUNCH();
}
extern "C" void device_bf16_to_float(float *out, const bf16 *inp, size_t n) {
  if (n == 0) return;
  bf16_to_float_kernel<<<ceil_div(n, 256), 256, 0, device_stream()>>>(out, (const bf16_t *)inp, n);
  CUDA_CHECK_LAUNCH();
}

extern "C" size_t device_memory_used(void) {
  size_t free_bytes = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  return total - free_bytes;
}
