/* The GPU side's plumbing, shared by every CUDA op: the bf16 storage type as C sees it, the CUDA
 * check macro, device memory (allocation, copies, fills), precision conversions, and the one stream
 * and cuBLASLt handle of the process. Only kernels/ and dist/ include this (DESIGN section 2).
 * Precision contract of the CUDA backend: weights and activations in bf16, accumulation in fp32,
 * master weights, weight gradients and optimizer state in fp32, KDA gates and states in fp32. */
#pragma once
#ifdef KLT_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/check.h"

// The CUDA sections of the op headers are C functions also when a .cu file includes them.
#ifdef __cplusplus
#define KLT_C_BEGIN extern "C" {
#define KLT_C_END }
#else
#define KLT_C_BEGIN
#define KLT_C_END
#endif

KLT_C_BEGIN

// bf16 as stored: the upper 16 bits of an IEEE float. .cu files reinterpret it as __nv_bfloat16.
typedef uint16_t bf16;

static inline bf16 bf16_from_float(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
static inline float bf16_to_float(bf16 h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// CUDA_CHECK(cudaMemcpy(...)): a failed CUDA runtime call is a bug; stop naming the call and the error.
#define CUDA_CHECK(call)                                                                         \
  do {                                                                                           \
    cudaError_t klt_cuda_status_ = (call);                                                       \
    CHECK(klt_cuda_status_ == cudaSuccess, "CUDA: %s", cudaGetErrorString(klt_cuda_status_));    \
  } while (0)
// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface at
// the next synchronizing call).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

// The process's compute stream; every op launches on it. Created on first use.
cudaStream_t device_stream(void);
// Selects the GPU (by node-local rank under MPI) before anything else touches CUDA.
void device_select(int ordinal);
// Blocks until the stream is done; surfaces asynchronous kernel faults with the caller's location.
void device_synchronize(void);

// Allocations are zeroed; a failed allocation is a user-facing out-of-memory message naming the size.
void *device_alloc(size_t bytes);
void device_free(void *ptr);
void device_upload(void *dst, const void *src, size_t bytes);    // host -> device, synchronous
void device_download(void *dst, const void *src, size_t bytes);  // device -> host, synchronous
void device_zero(void *ptr, size_t bytes);                        // asynchronous on the stream
void device_copy(void *dst, const void *src, size_t bytes);       // device -> device, asynchronous
// rows x width_bytes from src (row pitch src_pitch bytes) to dst (dst_pitch), device -> device, async.
void device_copy_2d(void *dst, size_t dst_pitch, const void *src, size_t src_pitch, size_t width_bytes, size_t rows);

// Temporary device memory for ops: buffer `slot` (0..7) of at least `bytes`, kept and grown on demand
// (only the first calls allocate; a larger request frees and reallocates, so never hold two requests
// of one slot at once). Slots: 0-1 the reductions below and the pointwise ops, 2-7 free for op families.
void *device_scratch(int slot, size_t bytes);
// out (C) fp32 += the sum over rows of in (rows, C) fp32, in a fixed order (deterministic).
void device_column_sum_add(float *out, const float *in, size_t rows, size_t C);

// Conversions on the device (asynchronous).
void device_float_to_bf16(bf16 *out, const float *inp, size_t n);
void device_bf16_to_float(float *out, const bf16 *inp, size_t n);

// Bytes in use on the whole device, as cudaMemGetInfo sees them.
size_t device_memory_used(void);

KLT_C_END
#endif
