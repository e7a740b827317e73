// CPU GEMM through OpenBLAS, in the precision `real` is compiled with.
#include "kernels/gemm.h"

#include <cblas.h>

#include "common/check.h"

void gemm(bool transpose_a, bool transpose_b, int M, int N, int K, real alpha, const real *A, int lda,
          const real *B, int ldb, real beta, real *C, int ldc) {
  CHECK(M >= 0 && N >= 0 && K >= 0, "gemm with negative size M=%d N=%d K=%d", M, N, K);
  if (M == 0 || N == 0) return;
#ifdef KLT_FP64
  cblas_dgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans, transpose_b ? CblasTrans : CblasNoTrans,
              M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
  cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans, transpose_b ? CblasTrans : CblasNoTrans,
              M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

void matmul_forward(real *out, const real *inp, const real *weight, int N, int C, int OC) {
  gemm(false, true, N, OC, C, 1, inp, C, weight, C, 0, out, OC);
}

void matmul_backward(real *dinp, real *dweight, const real *dout, const real *inp, const real *weight,
                     int N, int C, int OC) {
  if (dinp) gemm(false, false, N, C, OC, 1, dout, OC, weight, C, 1, dinp, C);
  if (dweight) gemm(true, false, OC, C, N, 1, dout, OC, inp, C, 1, dweight, C);
}
