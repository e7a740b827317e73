/* Matrix products: the one GEMM every CPU op uses (attention blocks, KDA chunks, Newton-Schulz),
 * and the linear layer built on it. Row-major throughout. CPU implementation through OpenBLAS. */
#pragma once
#include <stdbool.h>

#include "common/real.h"

// C (M, N) = alpha * op(A) @ op(B) + beta * C, all row-major.
// op(A) is (M, K): A is (M, K) with leading dimension lda, or (K, M) if transpose_a.
// op(B) is (K, N): B is (K, N) with leading dimension ldb, or (N, K) if transpose_b.
void gemm(bool transpose_a, bool transpose_b, int M, int N, int K, real alpha, const real *A, int lda,
          const real *B, int ldb, real beta, real *C, int ldc);

// Linear layer without bias, weight stored (out, in) as in PyTorch / Hugging Face checkpoints.
// out (N, OC) = inp (N, C) @ weight^T; overwrites out.
void matmul_forward(real *out, const real *inp, const real *weight, int N, int C, int OC);
// Backward: dinp (N, C) += dout @ weight; dweight (OC, C) += dout^T @ inp. Either may be NULL.
void matmul_backward(real *dinp, real *dweight, const real *dout, const real *inp, const real *weight,
                     int N, int C, int OC);

#ifdef KLT_HAVE_CUDA
/* CUDA: bf16 operands, fp32 accumulation, through cuBLASLt. Row-major like the CPU versions. */
#include "kernels/device.h"
KLT_C_BEGIN

// C (M, N) = alpha * op(A) @ op(B) + beta * C for `batch` matrices at the given element strides
// (0 for one matrix shared by all). A and B bf16; C bf16, or fp32 when c_is_float.
void gemm_cuda(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const bf16 *A, int lda,
               long long stride_a, const bf16 *B, int ldb, long long stride_b, float beta, void *C, int ldc,
               long long stride_c, bool c_is_float, int batch);
// out (N, OC) = inp (N, C) @ weight^T, weight (OC, C); overwrites out.
void matmul_forward_cuda(bf16 *out, const bf16 *inp, const bf16 *weight, int N, int C, int OC);
// dinp (N, C) = dout @ weight, or += when accumulate_dinp; dweight (OC, C) fp32 += dout^T @ inp.
// Either output may be NULL.
void matmul_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp, const bf16 *weight,
                          int N, int C, int OC, bool accumulate_dinp);
KLT_C_END
#endif
