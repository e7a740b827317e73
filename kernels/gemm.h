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
