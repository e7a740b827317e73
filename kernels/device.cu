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

extern "C" void *device_scratch(int slot, size_t bytes) {
  static void *buffers[8];
  static size_t sizes[8];
  CHECK(slot >= 0 && slot < 8, "scratch slot %d", slot);
  if (bytes > sizes[slot]) {
    device_synchronize();  // the old buffer may still be in use by queued work
    device_free(buffers[slot]);
    buffers[slot] = device_alloc(bytes);
    sizes[slot] = bytes;
  }
  return buffers[slot];
}

// Rows per partial sum of device_column_sum_add.
#define COLUMN_SUM_ROWS 256

static __global__ void column_partial_kernel(float *partial, const float *in, size_t rows, size_t C) {
  __shared__ float sums[8][33];
  size_t c = blockIdx.x * (size_t)32 + threadIdx.x;
  size_t begin = blockIdx.y * (size_t)COLUMN_SUM_ROWS, end = min(begin + COLUMN_SUM_ROWS, rows);
  float sum = 0.0f;
  if (c < C)
    for (size_t r = begin + threadIdx.y; r < end; r += 8) sum += in[r * C + c];
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.0f;
    for (int i = 0; i < 8; i++) total += sums[i][threadIdx.x];
    partial[blockIdx.y * C + c] = total;
  }
}

static __global__ void column_final_kernel(float *out, const float *partial, size_t blocks, size_t C) {
  size_t c = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float total = 0.0f;
  for (size_t b = 0; b < blocks; b++) total += partial[b * C + c];
  out[c] += total;
}

extern "C" void device_column_sum_add(float *out, const float *in, size_t rows, size_t C) {
  if (rows == 0 || C == 0) return;
  size_t blocks = (rows + COLUMN_SUM_ROWS - 1) / COLUMN_SUM_ROWS;
  float *partial = (float *)device_scratch(0, blocks * C * sizeof(float));
  column_partial_kernel<<<dim3(ceil_div(C, 32), (unsigned)blocks), dim3(32, 8), 0, device_stream()>>>(partial, in,
                                                                                                      rows, C);
  CUDA_CHECK_LAUNCH();
  column_final_kernel<<<ceil_div(C, 256), 256, 0, device_stream()>>>(out, partial, blocks, C);
  CUDA_CHECK_LAUNCH();
}

extern "C" size_t device_memory_used(void) {
  size_t free_bytes = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  return total - free_bytes;
}
