// cuBLASLt GEMMs for the CUDA backend; see gemm.h. Row-major C = op(A) op(B) is computed as the
// column-major product C^T = op(B)^T op(A)^T, so the operands swap places.
#include <cublasLt.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cuda_common.cuh"
#include "kernels/gemm.h"


static cublasLtHandle_t lt_handle;
static void *lt_workspace;
static const size_t lt_workspace_bytes = 32u << 20;

static void lt_init(void) {
  if (lt_handle) return;
  CUBLAS_CHECK(cublasLtCreate(&lt_handle));
  lt_workspace = device_alloc(lt_workspace_bytes);
}

// Column-major layout of a stored row-major (rows, cols) matrix with leading dimension ld.
static cublasLtMatrixLayout_t lt_layout(cudaDataType_t type, int rows, int cols, int ld, long long stride,
                                        int batch) {
  cublasLtMatrixLayout_t layout;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, cols, rows, ld));
  if (batch > 1) {
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                  sizeof stride));
  }
  return layout;
}

// A plan per distinct GEMM (shapes, strides, transposes, output type): the descriptors and the
// heuristic's algorithm, built once; the model's GEMMs repeat every step. Expert GEMMs whose row counts
// change every step would fill the table; beyond it a GEMM runs unplanned (implicit heuristic).
typedef struct {
  long long key[16];
  bool used;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t a, b, c;
  cublasLtMatmulAlgo_t algo;
} GemmPlan;
#define GEMM_PLANS 1024
static GemmPlan plans[GEMM_PLANS];

// The largest power of two (up to 256) dividing a pointer's address: the heuristic picks algorithms
// for the alignment it is told, and an algorithm chosen for 256-byte-aligned operands refuses others.
static uint32_t alignment_of(const void *ptr) {
  uint32_t alignment = 256;
  while (alignment > 1 && ((uintptr_t)ptr % alignment) != 0) alignment /= 2;
  return alignment;
}

static void plan_build(GemmPlan *p, bool transpose_a, bool transpose_b, int M, int N, int K, int lda,
                       long long stride_a, int ldb, long long stride_b, int ldc, long long stride_c, bool c_is_float,
                       int batch, bool find_algo, uint32_t align_a, uint32_t align_b, uint32_t align_c) {
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // In the swapped column-major product the first operand is B, the second A.
  cublasOperation_t op_first = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t op_second = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof op_second));
  // Stored shapes (row-major): A is (M, K) or (K, M); B is (K, N) or (N, K); C is (M, N).
  p->a = lt_layout(CUDA_R_16BF, transpose_a ? K : M, transpose_a ? M : K, lda, stride_a, batch);
  p->b = lt_layout(CUDA_R_16BF, transpose_b ? N : K, transpose_b ? K : N, ldb, stride_b, batch);
  p->c = lt_layout(c_is_float ? CUDA_R_32F : CUDA_R_16BF, M, N, ldc, stride_c, batch);
  if (!find_algo) return;
  cublasLtMatmulPreference_t preference;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &lt_workspace_bytes, sizeof lt_workspace_bytes));
  // The swapped product's first operand is our B, its second our A.
  const cublasLtMatmulPreferenceAttributes_t which[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  const uint32_t alignments[4] = {align_b, align_a, align_c, align_c};
  for (int i = 0; i < 4; i++)
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, which[i], &alignments[i], sizeof alignments[i]));
  cublasLtMatmulHeuristicResult_t result;
  int found = 0;
  CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt_handle, p->desc, p->b, p->a, p->c, p->c, preference, 1, &result,
                                              &found));
  cublasLtMatmulPreferenceDestroy(preference);
  CHECK(found > 0, "cuBLASLt has no algorithm for a (%d, %d, %d) GEMM", M, N, K);
  p->algo = result.algo;
}

static void plan_destroy(GemmPlan *p) {
  cublasLtMatrixLayoutDestroy(p->a);
  cublasLtMatrixLayoutDestroy(p->b);
  cublasLtMatrixLayoutDestroy(p->c);
  cublasLtMatmulDescDestroy(p->desc);
}

extern "C" void gemm_cuda(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const bf16 *A,
                          int lda, long long stride_a, const bf16 *B, int ldb, long long stride_b, float beta,
                          void *C, int ldc, long long stride_c, bool c_is_float, int batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  lt_init();
  if (K == 0) {  // an empty sum: C = beta * C, which cuBLASLt may refuse
    CHECK(beta == 0.0f, "gemm_cuda with K = 0 and beta != 0 is not supported");
    for (int i = 0; i < batch; i++)
      CUDA_CHECK(cudaMemset2DAsync((char *)C + i * stride_c * (c_is_float ? 4 : 2), (size_t)ldc * (c_is_float ? 4 : 2),
                                   0, (size_t)N * (c_is_float ? 4 : 2), M, device_stream()));
    return;
  }
  const uint32_t align_a = alignment_of(A), align_b = alignment_of(B), align_c = alignment_of(C);
  const long long key[16] = {transpose_a, transpose_b, M,        N,          K,     lda,     ldb,     ldc,
                             stride_a,    stride_b,    stride_c, c_is_float, batch, align_a, align_b, align_c};
  unsigned long long hash = 1469598103934665603ull;
  for (int i = 0; i < 16; i++) hash = (hash ^ (unsigned long long)key[i]) * 1099511628211ull;
  GemmPlan *plan = NULL;
  for (int probe = 0; probe < 8; probe++) {
    GemmPlan *p = &plans[(hash + probe) % GEMM_PLANS];
    if (p->used && memcmp(p->key, key, sizeof key) == 0) {
      plan = p;
      break;
    }
    if (!p->used) {
      memcpy(p->key, key, sizeof key);
      plan_build(p, transpose_a, transpose_b, M, N, K, lda, stride_a, ldb, stride_b, ldc, stride_c, c_is_float,
                 batch, true, align_a, align_b, align_c);
      p->used = true;
      plan = p;
      break;
    }
  }
  if (plan) {
    cublasStatus_t status = cublasLtMatmul(lt_handle, plan->desc, &alpha, B, plan->b, A, plan->a, &beta, C, plan->c,
                                           C, plan->c, &plan->algo, lt_workspace, lt_workspace_bytes, device_stream());
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) {
      CUBLAS_CHECK(status);
      return;
    }
  }  // no plan, or the planned algorithm refused these operands: let cuBLASLt choose for this call
  GemmPlan once;
  plan_build(&once, transpose_a, transpose_b, M, N, K, lda, stride_a, ldb, stride_b, ldc, stride_c, c_is_float, batch,
             false, align_a, align_b, align_c);
  CUBLAS_CHECK(cublasLtMatmul(lt_handle, once.desc, &alpha, B, once.b, A, once.a, &beta, C, once.c, C, once.c, NULL,
                              lt_workspace, lt_workspace_bytes, device_stream()));
  plan_destroy(&once);
}

extern "C" void matmul_forward_cuda(bf16 *out, const bf16 *inp, const bf16 *weight, int N, int C, int OC) {
  gemm_cuda(false, true, N, OC, C, 1.0f, inp, C, 0, weight, C, 0, 0.0f, out, OC, 0, false, 1);
}

extern "C" void matmul_backward_cuda(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                     const bf16 *weight, int N, int C, int OC, bool accumulate_dinp) {
  if (dinp) gemm_cuda(false, false, N, C, OC, 1.0f, dout, OC, 0, weight, C, 0, accumulate_dinp ? 1.0f : 0.0f, dinp, C, 0, false, 1);
  if (dweight) gemm_cuda(true, false, OC, C, N, 1.0f, dout, OC, 0, inp, C, 0, 1.0f, dweight, C, 0, true, 1);
}
